"""`splitdiff train vae`: a diffusers AutoencoderKL, 4 latent channels, 4x downsampling.

Trained on world renders: half whole 64 px images, half 64 px crops of 128 px images,
so that the latent space serves both resolutions the U-Nets use.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..core.devices import resolve_device
from ..world import render, sample_scene, to_array
from .card import write_card
from .export import export_diffusers
from .loop import LoopConfig, optimize, run_training, set_cosine_lr
from .unet import autocast

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, sample_size=64,
)


def render_batch(rng: random.Random, batch_size: int, crop: int = 64) -> torch.Tensor:
    """Whole 64 px renders and random 64 px crops of 128 px renders, half and half."""
    out = []
    for k in range(batch_size):
        scene = sample_scene(rng)
        if k % 2 == 0:
            out.append(to_array(render(scene, crop, rng.getrandbits(32))))
        else:
            a = to_array(render(scene, 2 * crop, rng.getrandbits(32)))
            y, x = rng.randrange(crop + 1), rng.randrange(crop + 1)
            out.append(a[:, y:y + crop, x:x + crop])
    return torch.from_numpy(np.stack(out))


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, n: int = 256, seed: int = 4242) -> float:
    """1 / std of the latents, as Stable Diffusion's 0.18215 was chosen."""
    x = render_batch(random.Random(seed), n).to(vae.device)
    z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean.float() for i in range(0, n, 64)])
    return float(1.0 / z.std())


def foreground_weights(x: torch.Tensor, weight: float = 10.0) -> torch.Tensor:
    """1 on the background, `weight` on objects and their edges.

    Objects cover a few percent of the pixels; an unweighted loss lets the VAE blur a
    small star into a blob of the wrong colour, and the U-Nets cannot undo that.
    The background is each image's median colour (it covers most of every image).
    """
    bg = x.flatten(2).median(dim=2).values[:, :, None, None]
    fg = ((x - bg).abs().amax(1, keepdim=True) > 0.03).float()
    return 1 + (weight - 1) * fg


def train_vae(run_dir: Path, out: Path, steps: int = 4000, batch_size: int = 16, lr: float = 1e-3,
              kl_weight: float = 1e-6, max_minutes: float | None = None, seed: int = 0, config: dict | None = None,
              device: str = "cpu", checkpoint_every: int = 250, record: dict | None = None) -> None:
    """`config` overrides VAE_CONFIG's entries (a wider VAE); `record` goes into every checkpoint and export."""
    torch.manual_seed(seed)
    dev = resolve_device(device)
    vae = AutoencoderKL(**{**VAE_CONFIG, **(config or {})}).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)

    def step(i: int) -> float:
        rng = random.Random(seed * 1_000_003 + i)
        torch.manual_seed(seed * 7919 + i)
        x = render_batch(rng, batch_size).to(dev)
        set_cosine_lr(opt, i, steps, lr)
        with autocast(dev):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        w = foreground_weights(x)
        err = (rec - x).abs()
        loss = (w * (err + err ** 2)).mean() / w.mean() + kl_weight * post.kl().float().mean()
        return optimize(opt, loss, clip=1.0)

    def export(state, model):
        model.eval()
        export_diffusers(model, out, state, scaling_factor=latent_scaling_factor(model))
        write_card("vae", out, run_dir)

    cfg = LoopConfig(run_dir, steps, max_minutes, checkpoint_every=checkpoint_every, warm_start=out,
                     record=record or {})
    run_training(cfg, vae, opt, step, export, desc="vae")
