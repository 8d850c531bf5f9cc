"""`splitdiff train unet --role cloud`: the family's cloud U-Net on cached latents.

A diffusers UNet2DConditionModel cross-attending to MiniLM token states, trained with
Stable Diffusion's noise schedule and epsilon prediction (the facts measured before
this model: SD's schedule beats the cosine one at 25 sampling steps), Min-SNR loss
weighting, 10% prompt dropout for classifier-free guidance, and an EMA of weights.
Three steps in four see 64 px images (16x16 latents), one in four 128 px (32x32),
so the model is in distribution at both sizes (the share is an option).

Every trainer runs on the CPU or, given `device="cuda"`, on a GPU with bf16 autocast
over fp32 weights; the random draws of each step are made on the CPU from the step's
own seed either way, so a run resumes bit-identically wherever it runs.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr

from ..core.devices import resolve_device
from ..core.registry import load_vae
from ..core.schedulers import SD_NOISE_SCHEDULE
from ..text import CONTEXT_DIM, default_encoder
from .card import write_card
from .export import export_diffusers
from .latent_cache import load_or_build
from .loop import LoopConfig, optimize, run_training, set_cosine_lr

UNET_CONFIGS = {
    "cloud": dict(block_out_channels=(32, 64, 128), layers_per_block=2),
}
PROMPT_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
# Offset noise (a per-sample, per-channel constant added to the training noise). SD's
# schedule never reaches zero SNR, so without it the mean of x_T still carries the image's
# mean colour in training, and at sampling time the model reads a random background off
# the initial noise. The Shapes world's backgrounds are solid colours: the worst case.
NOISE_OFFSET = 0.15


def unet_from_config(block_out_channels, layers_per_block) -> UNet2DConditionModel:
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=8,
    )


def noise_schedule() -> DDPMScheduler:
    return DDPMScheduler.from_config(SD_NOISE_SCHEDULE)


def autocast(device: torch.device):
    """bf16 autocast on a GPU (weights and optimizer stay fp32); full fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class DenoisingData:
    """Batches of (noisy latents, timesteps, noise, context, mask) from the two caches, on `device`.

    Step i is a 128 px step when `i % 4 >= 4 - quarters_128` (default: one step in four), with
    `batch_size_128` samples (default a quarter of `batch_size`: the same latent pixels).
    """

    def __init__(self, caches: dict[int, dict[str, torch.Tensor]], batch_size: int, device: str | torch.device = "cpu",
                 batch_size_128: int | None = None, quarters_128: int = 1):
        self.device = torch.device(device)
        self.caches = {size: {k: v.to(self.device) for k, v in c.items()} for size, c in caches.items()}
        self.batch_size = batch_size
        self.batch_size_128 = batch_size_128 or max(1, batch_size // 4)
        self.quarters_128 = quarters_128
        self.sched = noise_schedule()
        empty, empty_mask = default_encoder()([""])
        self.empty, self.empty_mask = empty[0].to(self.device), empty_mask[0].to(self.device)

    def batch(self, i: int, rng: random.Random, g: torch.Generator):
        size = 128 if i % 4 >= 4 - self.quarters_128 and 128 in self.caches else 64
        cache = self.caches[size]
        bs = self.batch_size if size == 64 else self.batch_size_128
        idx = torch.tensor([rng.randrange(len(cache["latents"])) for _ in range(bs)], device=self.device)
        x0 = cache["latents"][idx].float()
        ctx, mask = cache["embeds"][idx].float(), cache["masks"][idx].long()
        drop = (torch.rand(bs, generator=g) < PROMPT_DROPOUT).to(self.device)
        ctx[drop], mask[drop] = self.empty, self.empty_mask
        t = torch.randint(0, self.sched.config.num_train_timesteps, (bs,), generator=g)
        noise = torch.randn(x0.shape, generator=g) + NOISE_OFFSET * torch.randn(bs, x0.shape[1], 1, 1, generator=g)
        noise = noise.to(self.device)
        t = t.to(self.device)
        return self.sched.add_noise(x0, noise, t), t, noise, ctx, mask

    def min_snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023), on diffusers' compute_snr."""
        snr = compute_snr(self.sched, t)
        return snr.clamp(max=MIN_SNR_GAMMA) / snr


def load_caches(cache_dir: Path, vae_source: str, n64: int, n128: int,
                device: torch.device = torch.device("cpu")) -> dict[int, dict[str, torch.Tensor]]:
    from ..text import TextEncoder

    vae = load_vae(vae_source).to(device)
    encoder = TextEncoder(device=str(device)) if device.type != "cpu" else default_encoder()
    caches = {64: load_or_build(cache_dir / "cache64.safetensors", vae, n64, 64, seed=64, encoder=encoder)}
    if n128:
        caches[128] = load_or_build(cache_dir / "cache128.safetensors", vae, n128, 128, seed=128, encoder=encoder)
    vae.to("cpu")
    return caches


def train_unet(run_dir: Path, out: Path, role: str = "cloud", steps: int = 8000, batch_size: int = 32,
               lr: float = 4e-4, max_minutes: float | None = None, vae: str = "vae", cache_dir: Path | None = None,
               n64: int = 30000, n128: int = 8000, seed: int = 0, device: str = "auto",
               batch_size_128: int | None = None, quarters_128: int = 1, config: dict | None = None,
               checkpoint_every: int = 200, record: dict | None = None) -> None:
    """`config` (block_out_channels, layers_per_block) replaces UNET_CONFIGS[role]; `record` goes into every export."""
    torch.manual_seed(seed)
    dev = resolve_device(device)
    unet = unet_from_config(**(config or UNET_CONFIGS[role])).to(dev)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    caches = load_caches(cache_dir or run_dir.parent / "latent-cache", vae, n64, n128, dev)
    data = DenoisingData(caches, batch_size, dev, batch_size_128, quarters_128)

    def step(i: int) -> float:
        rng = random.Random(seed * 1_000_003 + i)
        g = torch.Generator().manual_seed(seed * 7919 + i)
        xt, t, noise, ctx, mask = data.batch(i, rng, g)
        set_cosine_lr(opt, i, steps, lr, warmup=300)
        with autocast(dev):
            pred = unet(xt, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        loss = (F.mse_loss(pred.float(), noise, reduction="none").mean((1, 2, 3)) * data.min_snr_weights(t)).mean()
        return optimize(opt, loss, clip=1.0)

    cfg = LoopConfig(run_dir, steps, max_minutes, checkpoint_every=checkpoint_every, ema_decay=0.999, warm_start=out,
                     record=record or {})
    run_training(cfg, unet, opt, step,
                 lambda state, model: (export_diffusers(model, out, state), write_card(role, out, run_dir)),
                 desc=f"unet-{role}")
