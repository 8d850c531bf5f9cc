"""One generation with a patch-parallel U-Net: the same call on every rank.

The core's trajectory and runner do the sampling, untouched: every rank starts the
same seeded trajectory and takes the same steps, and each U-Net call underneath is
cut into patches and gathered back. The CLI and the benchmark run this on each rank.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import UserError
from .unet import parallelize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class RankJob:
    """One generation, as every rank of a patch-parallel run sees it (the serving engine's unit is serve.batching.Job)."""

    prompt: str | tuple[str, ...]  # several prompts: one batch, prompt i seeded with seed + i
    unet: str = "cloud"  # a registry name or diffusers folder; "tiny" for a random tiny U-Net
    size: int = 32  # latent side (the image's side divided by the VAE's factor)
    steps: int = 20
    scheduler: str = "ddim"
    guidance: float = 5.0
    seed: int = 0
    negative: str = ""
    mode: str | None = "pcpp"  # None: the stock U-Net on one device, the reference
    band: float = 0.3
    warmup_steps: int = 4
    groupnorm: str = "sync"
    split_cfg: bool = False
    out: str | None = None  # rank 0 writes latents (.safetensors) or, with a VAE, an image here
    vae: str | None = None  # registry name or folder; "tiny" for a random tiny VAE

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def load_unet(spec: str):
    if spec == "tiny":
        from ..testing import tiny_unet

        return tiny_unet(channels=(32, 64))
    from ..core.registry import load_unet as load

    return load(spec)


def load_vae(spec: str):
    if spec == "tiny":
        from ..testing import tiny_vae

        return tiny_vae()
    from ..core.registry import load_vae as load

    return load(spec)


def run(job: RankJob) -> dict:
    """Generate on this rank (call it on every rank): its U-Net seconds, and every rank's stats."""
    from ..core.registry import noise_schedule
    from ..core.runner import advance
    from ..core.trajectory import new_trajectory

    if job.out and Path(job.out).suffix.lower() in IMAGE_SUFFIXES and job.vae is None:
        raise UserError(f"writing an image ({job.out}) needs a VAE; pass one, or write .safetensors latents")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    unet = load_unet(job.unet).to(device)
    handle = None
    if job.mode is not None:
        handle = parallelize(unet, job.mode, band=job.band, warmup_steps=job.warmup_steps,
                             groupnorm=job.groupnorm, split_cfg=job.split_cfg)  # fmt: skip
        handle.split(job.size, job.size)  # fail before the slow part if the latent cannot be cut
    embeds, mask = encode(job)
    if embeds.shape[-1] != unet.config.cross_attention_dim:
        raise UserError(f"the U-Net cross-attends to width {unet.config.cross_attention_dim}, "
                        f"but the text encoder gives {embeds.shape[-1]}")  # fmt: skip
    prompts = job.prompts()
    trajs = [
        new_trajectory(
            embeds[i], embeds[-1], latent_shape=(unet.config.in_channels, job.size, job.size),
            scheduler=job.scheduler, steps=job.steps, seed=job.seed + i, guidance_scale=job.guidance,
            prompt_mask=None if mask is None else mask[i], negative_mask=None if mask is None else mask[-1],
            noise_schedule=noise_schedule(job.unet), prompt=prompt, negative_prompt=job.negative,
        )
        for i, prompt in enumerate(prompts)
    ]  # fmt: skip
    started = time.perf_counter()
    advance(unet, trajs, job.steps, model_name=job.unet)
    seconds = time.perf_counter() - started
    stats = []
    if handle is not None:
        stats = handle.gather_stats()
        handle.remove()

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and job.out:
        write(job, torch.cat([t.latents for t in trajs]))
    return {"rank": rank, "seconds": seconds, "stats": stats}


def encode(job: RankJob):
    """(prompt and negative-prompt embeddings, mask). Encodings are cached: a launcher that
    calls this before forking its ranks spares each of them loading the text encoder."""
    from ..text import prompt_encoder_for

    return prompt_encoder_for(job.unet)([*job.prompts(), job.negative])


def write(job: RankJob, latents: torch.Tensor) -> None:
    """Latents of the whole batch, or the first prompt's image."""
    from ..io import atomic_save_image, save_tensors

    if Path(job.out).suffix.lower() in IMAGE_SUFFIXES:
        from ..core.runner import decode, to_pil

        made = json.dumps({"job": asdict(job), "degraded": False})  # as `generate` marks its images
        atomic_save_image(to_pil(decode(load_vae(job.vae), latents[:1]))[0], job.out,
                          text={"splitdiff.degraded": "false", "splitdiff.provenance": made})
    else:
        save_tensors(job.out, {"latents": latents}, meta={"job": asdict(job)})
