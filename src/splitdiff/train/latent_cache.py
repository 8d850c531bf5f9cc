"""Cached training data for the U-Nets: VAE latents and MiniLM encodings of world renders.

Encoding is the expensive part of a latent-diffusion training step on a CPU, and it
never changes, so it is done once per (VAE, size) and kept as safetensors. Scenes and
render seeds come from one seeded stream in this process, so the cache is the same
whether the renders are drawn here or by a pool of worker processes, and the VAE and
text encoder run wherever they were put (a GPU makes a large cache a matter of minutes).
"""

from __future__ import annotations

import os
import random
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..io import load_tensors, save_tensors
from ..text import default_encoder
from ..world import render, sample_scene, scene_to_prompt, to_array


def _render_array(args) -> np.ndarray:
    scene, size, seed = args
    return to_array(render(scene, size, seed))


def _workers() -> int:
    return max(1, min(16, (os.cpu_count() or 1) - 1))


@torch.no_grad()
def build_cache(vae, n: int, size: int, seed: int, chunk: int | None = None, encoder=None,
                workers: int | None = None) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    encoder = encoder or default_encoder()
    device, dtype = vae.device, vae.dtype
    chunk = chunk or (512 if device.type == "cuda" else 64)  # a GPU wants larger batches
    workers = _workers() if workers is None else workers
    pool = get_context("fork").Pool(workers) if workers > 1 else None
    latents, embeds, masks = [], [], []
    try:
        for _ in tqdm(range(0, n, chunk), desc=f"latent cache {size}px"):
            jobs = [(sample_scene(rng), size, rng.getrandbits(32)) for _ in range(chunk)]
            scenes = [scene for scene, _, _ in jobs]
            arrays = pool.map(_render_array, jobs) if pool else [_render_array(j) for j in jobs]
            x = torch.from_numpy(np.stack(arrays)).to(device, dtype)
            latents.append((vae.encode(x).latent_dist.mean * vae.config.scaling_factor).half().cpu())
            h, m = encoder.encode_batch([scene_to_prompt(s) for s in scenes])
            embeds.append(h.half())
            masks.append(m.to(torch.uint8))
    finally:
        if pool:
            pool.close()
    return {"latents": torch.cat(latents)[:n], "embeds": torch.cat(embeds)[:n], "masks": torch.cat(masks)[:n]}


def load_or_build(path: Path, vae, n: int, size: int, seed: int, encoder=None) -> dict[str, torch.Tensor]:
    if path.exists():
        tensors, meta = load_tensors(path)
        if meta.get("n") == n and meta.get("size") == size and meta.get("seed") == seed:
            return tensors
    tensors = build_cache(vae, n, size, seed, encoder=encoder)
    save_tensors(path, tensors, {"n": n, "size": size, "seed": seed})
    return tensors
