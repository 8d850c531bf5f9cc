"""`splitdiff bench family`: the embedded models' size and speed, side by side in one run.

Edge vs cloud U-Net (parameters, seconds per step), tiny vs full decoder (seconds per
decode, PSNR of the tiny decoder's images against the full decoder's), and the
adherence ceiling the autoencoder sets: the evaluator's score on renders passed
through the VAE (and decoded by each decoder). No U-Net can do better than that.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from . import write_csv
from ..core.registry import load_unet, load_vae
from ..core.runner import decode
from ..text import default_encoder
from ..train.vae import render_batch


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


@torch.no_grad()
def _seconds(fn, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):  # best of: the least disturbed by other work on the machine
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(4.0 / mse) if mse > 0 else math.inf


def bench_family(out_dir: Path, repeats: int = 10, threads: int | None = None, cloud: str = "cloud",
                 edge: str = "edge", vae: str = "vae", tiny: str = "tiny-decoder",
                 ceiling_prompts: int = 300) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    cloud, edge = load_unet(cloud), load_unet(edge)
    emb, mask = default_encoder()(["a large red circle at the top left, on a navy background"])
    for batch, side in ((1, 16), (8, 16), (1, 32)):
        x = torch.randn(2 * batch, 4, side, side)
        t = torch.full((2 * batch,), 500.0)
        ctx, m = emb.expand(2 * batch, -1, -1), mask.expand(2 * batch, -1)
        secs = {name: _seconds(lambda u=u: u(x, t, ctx, encoder_attention_mask=m), repeats)
                for name, u in (("cloud", cloud), ("edge", edge))}
        rows.append({"what": f"U-Net step, batch {batch} (CFG x2), {side * 4} px", "large": "cloud",
                     "small": "edge", "large_params": _params(cloud), "small_params": _params(edge),
                     "param_ratio": _params(edge) / _params(cloud), "large_s": secs["cloud"],
                     "small_s": secs["edge"], "speedup": secs["cloud"] / secs["edge"], "psnr_db": ""})
    vae, tiny = load_vae(vae), load_vae(tiny)
    images = render_batch(random.Random(7), 64)
    z = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    full_img, tiny_img = decode(vae, z), decode(tiny, z)
    for batch in (1, 8):
        zb = z[:batch]
        secs = {"full": _seconds(lambda: decode(vae, zb), repeats), "tiny": _seconds(lambda: decode(tiny, zb),
                                                                                  repeats)}
        rows.append({"what": f"decode, batch {batch}, 64 px", "large": "vae", "small": "tiny-decoder",
                     "large_params": _params(vae.decoder), "small_params": _params(tiny.decoder),
                     "param_ratio": _params(tiny.decoder) / _params(vae.decoder), "large_s": secs["full"],
                     "small_s": secs["tiny"], "speedup": secs["full"] / secs["tiny"],
                     "psnr_db": psnr(tiny_img, full_img)})
    write_csv(out_dir / "family.csv", rows)
    ceiling = adherence_ceiling(vae, tiny, ceiling_prompts)
    write_csv(out_dir / "ceiling.csv", ceiling)
    for r in ceiling:
        print(f"adherence ceiling, {r['size']} px, {r['images']:28s} {r['adherence']:.3f}")
    for r in rows:
        print(f"{r['what']:40s} params {r['param_ratio']:.3f}  {r['large_s'] * 1e3:8.2f} ms vs "
              f"{r['small_s'] * 1e3:7.2f} ms  speed-up {r['speedup']:.2f}x"
              + (f"  PSNR {r['psnr_db']:.1f} dB" if r["psnr_db"] != "" else ""))
    return rows


@torch.no_grad()
def adherence_ceiling(vae, tiny, n_prompts: int, sizes: tuple[int, ...] = (64, 128)) -> list[dict]:
    """Adherence of the evaluation prompts' renders, raw and through the autoencoder."""
    from ..eval import default_evaluator, reference_renders
    from ..world import prompt_set

    evaluator, prompts = default_evaluator(), prompt_set(n_prompts)
    rows = []
    for size in sizes:
        renders = reference_renders(prompts, size, seed=10_000)
        z = torch.cat([vae.encode(renders[i:i + 64]).latent_dist.mean for i in range(0, n_prompts, 64)])
        z = z * vae.config.scaling_factor
        for name, images in (("renders", renders), ("VAE round trip", decode(vae, z)),
                             ("encoder + tiny decoder", decode(tiny, z))):
            rows.append({"size": size, "images": name, "prompts": n_prompts,
                         "adherence": evaluator.adherence(images, prompts)[1]})
    return rows
