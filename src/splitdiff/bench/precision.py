"""`splitdiff bench precision`: what fp16 and bf16 models cost in quality against fp32, side by side.

The same prompts, seeds and plan run with the models in each dtype (trajectories stay
float32 in every case); the table gives wall time, the final latents' mean relative error
against the fp32 run and the decoded images' PSNR against the fp32 images.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import write_csv

DTYPES = ("fp32", "bf16", "fp16")


def _psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def bench_precision(out: Path, *, models: dict[str, str] | None = None, vae: str | None = None,
                    plan: str = "cloud:10,edge:15", steps: int = 25, prompts: int = 24, size: int = 64,
                    device: str = "cpu") -> list[dict]:
    from ..pipeline import SplitPipeline
    from ..world import prompt_set

    texts = prompt_set(prompts)
    rows, reference = [], None
    for dtype in DTYPES:
        pipe = SplitPipeline.from_pretrained(models or {"cloud": "cloud", "edge": "edge"}, vae=vae,
                                             torch_dtype=dtype, device=device)
        start = time.perf_counter()
        result = pipe(texts, plan=plan, steps=steps, seed=0, size=size)
        seconds = time.perf_counter() - start
        reference = reference or result
        errors = [float((a.latents - b.latents).abs().mean() / b.latents.abs().mean())
                  for a, b in zip(result.trajectories, reference.trajectories)]
        psnr = [_psnr(a, b) for a, b in zip(result.images, reference.images)]
        rows.append({"dtype": dtype, "device": str(pipe.device), "images": len(texts), "seconds": seconds,
                     "latent_rel_error_mean": float(np.mean(errors)), "latent_rel_error_max": float(np.max(errors)),
                     "psnr_median_db": float(np.median(psnr)), "psnr_min_db": float(np.min(psnr))})
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
              flush=True)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "precision.csv", rows)
    return rows
