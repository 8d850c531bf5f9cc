"""Many prompts through one plan, batched: the shape of a benchmark or a demo run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..core.plan import Plan, check_plan
from ..core.runner import advance, decode
from .pipeline import HybridPipeline


@dataclass
class BatchResult:
    latents: torch.Tensor
    unet_seconds: dict[str, float] = field(default_factory=dict)  # per model, summed over batches


def run_many(pipe: HybridPipeline, prompts: list[str], plan: Plan, *, steps: int = 25,
             scheduler: str = "dpmsolver++", guidance_scale: float = 5.0, size: int = 64, batch_size: int = 32,
             seed: int = 0) -> BatchResult:
    """Run every prompt (seed = seed + index) through `plan`, `batch_size` trajectories per U-Net call."""
    check_plan(plan, steps)
    result, latents = BatchResult(torch.empty(0)), []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        trajs = pipe.start_many(chunk, [seed + i + k for k in range(len(chunk))], steps=steps,
                                scheduler=scheduler, guidance_scale=guidance_scale, size=size)
        for seg in plan:
            seconds = advance(pipe.unets[seg.model], trajs, seg.steps, seg.model)
            result.unet_seconds[seg.model] = result.unet_seconds.get(seg.model, 0.0) + seconds
        latents.append(torch.cat([t.latents for t in trajs]))
    result.latents = torch.cat(latents)
    return result


def decode_many(vae, latents: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    images = torch.cat([decode(vae, latents[i:i + batch_size]) for i in range(0, len(latents), batch_size)])
    return images, time.perf_counter() - start
