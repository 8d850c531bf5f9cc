"""`splitdiff bench family`: the embedded models' size and speed, side by side in one run.

Edge vs cloud U-Net (parameters, seconds per step), tiny vs full decoder (seconds per
decode, PSNR of the tiny decoder's images against the full decoder's).
"""

from __future__ import annotations

import csv
import math
import random
import time
from pathlib import Path

import torch

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
                 edge: str = "edge", vae: str = "vae", tiny: str = "tiny-decoder") -> list[dict]:
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
    with open(out_dir / "family.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(f"{r['what']:40s} params {r['param_ratio']:.3f}  {r['large_s'] * 1e3:8.2f} ms vs "
              f"{r['small_s'] * 1e3:7.2f} ms  speed-up {r['speedup']:.2f}x"
              + (f"  PSNR {r['psnr_db']:.1f} dB" if r["psnr_db"] != "" else ""))
    return rows
