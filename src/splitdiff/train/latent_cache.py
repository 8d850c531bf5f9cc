"""Cached training data for the U-Nets: VAE latents and MiniLM encodings of world renders.

Encoding is the expensive part of a latent-diffusion training step on a CPU, and it
never changes, so it is done once per (VAE, size) and kept as safetensors.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..io import load_tensors, save_tensors
from ..text import default_encoder
from ..world import render, sample_scene, scene_to_prompt, to_array


@torch.no_grad()
def build_cache(vae, n: int, size: int, seed: int, chunk: int = 64) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    encoder = default_encoder()
    latents, embeds, masks = [], [], []
    for _ in tqdm(range(0, n, chunk), desc=f"latent cache {size}px"):
        scenes = [sample_scene(rng) for _ in range(chunk)]
        x = torch.from_numpy(np.stack([to_array(render(s, size, rng.getrandbits(32))) for s in scenes]))
        latents.append((vae.encode(x).latent_dist.mean * vae.config.scaling_factor).half())
        h, m = encoder([scene_to_prompt(s) for s in scenes])
        embeds.append(h.half())
        masks.append(m.to(torch.uint8))
    return {"latents": torch.cat(latents)[:n], "embeds": torch.cat(embeds)[:n], "masks": torch.cat(masks)[:n]}


def load_or_build(path: Path, vae, n: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    if path.exists():
        tensors, meta = load_tensors(path)
        if meta.get("n") == n and meta.get("size") == size and meta.get("seed") == seed:
            return tensors
    tensors = build_cache(vae, n, size, seed)
    save_tensors(path, tensors, {"n": n, "size": size, "seed": seed})
    return tensors
