"""`splitdiff train tiny-decoder`: a TAESD-style AutoencoderTiny decoder distilled from the VAE's.

Hybrid SD's edge device decodes with a tiny VAE; ours learns to reproduce the full
decoder's output (the teacher) from the same scaled latents the U-Nets produce.
Only the decoder half of AutoencoderTiny is trained and used.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny

from ..core.devices import resolve_device
from ..core.registry import load_vae
from .card import write_card
from .loop import LoopConfig, optimize, run_training, set_cosine_lr
from .export import export_diffusers
from .unet import autocast
from .vae import render_batch

# No block at the output resolution and one at the middle one (num_decoder_blocks
# (2, 1, 0)): at 64 px the full-resolution stage was most of the decoder's time, and
# small-channel convolutions there cost more than their arithmetic on a CPU. With
# (2, 2, 1) the decoder was only 3.4-3.9x faster than the family's VAE decoder; this one
# is 6.0x (one image) to 9.8x (eight), at 30.5 dB against it after 8,000 steps (bench family).
TINY_CONFIG = dict(
    encoder_block_out_channels=(8, 8, 8), num_encoder_blocks=(1, 1, 1),
    decoder_block_out_channels=(12, 12, 12), num_decoder_blocks=(2, 1, 0),
    latent_channels=4, scaling_factor=1.0,  # it decodes the U-Nets' (already scaled) latents directly
)


def train_tiny_decoder(run_dir: Path, out: Path, teacher: str = "vae", steps: int = 8000, batch_size: int = 16,
                       lr: float = 2e-3, max_minutes: float | None = None, seed: int = 0, device: str = "cpu",
                       checkpoint_every: int = 250, record: dict | None = None) -> None:
    torch.manual_seed(seed)
    dev = resolve_device(device)
    vae = load_vae(teacher).to(dev)
    vae.requires_grad_(False)
    tiny = AutoencoderTiny(**TINY_CONFIG).to(dev)
    opt = torch.optim.AdamW(tiny.decoder.parameters(), lr=lr)

    def step(i: int) -> float:
        rng = random.Random(seed * 1_000_003 + i)
        with torch.no_grad(), autocast(dev):
            x = render_batch(rng, batch_size).to(dev)
            z = vae.encode(x).latent_dist.mean.float() * vae.config.scaling_factor
            target = vae.decode(z / vae.config.scaling_factor).sample.float().clamp(-1, 1)
        set_cosine_lr(opt, i, steps, lr)
        with autocast(dev):
            pred = tiny.decode(z).sample.float()
        loss = F.l1_loss(pred, target) + F.mse_loss(pred, target)
        return optimize(opt, loss)

    cfg = LoopConfig(run_dir, steps, max_minutes, checkpoint_every=checkpoint_every, ema_decay=0.999, warm_start=out,
                     record=record or {})
    run_training(cfg, tiny, opt, step,
                 lambda state, model: (export_diffusers(model, out, state), write_card("tiny-decoder", out, run_dir)),
                 desc="tiny-decoder")
