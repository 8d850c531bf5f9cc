"""Scenes to one image tensor: the one way the world's images are batched."""

from __future__ import annotations

import random
from typing import Iterable

import numpy as np
import torch

from .concepts import render_scene
from .render import to_array


def render_images(scenes: Iterable, size: int, seeds: Iterable[int] | random.Random) -> torch.Tensor:
    """B x 3 x size x size in [-1, 1], scene i drawn with seed i (base and private objects alike).

    `seeds` may be a Random: each scene then takes `getrandbits(32)` from it, in order,
    which is what the training batches draw (so their data stays the same, step by step).
    """
    scenes = list(scenes)
    if isinstance(seeds, random.Random):
        seeds = [seeds.getrandbits(32) for _ in scenes]
    return torch.from_numpy(np.stack([to_array(render_scene(s, size, seed)) for s, seed in zip(scenes, seeds)]))
