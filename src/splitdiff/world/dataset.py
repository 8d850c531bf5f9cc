"""Endless, seeded batches of (image, prompt, scene) for training."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import torch

from .grammar import scene_to_prompt
from .batch import render_images
from .scene import Scene, sample_scene


@dataclass
class Batch:
    images: torch.Tensor  # B x 3 x H x W in [-1, 1]
    prompts: list[str]
    scenes: list[Scene]


def sample_batch(rng: random.Random, batch_size: int, size: int) -> Batch:
    scenes = [sample_scene(rng) for _ in range(batch_size)]
    return Batch(render_images(scenes, size, rng), [scene_to_prompt(s) for s in scenes], scenes)


def batches(batch_size: int, size: int = 64, seed: int = 0) -> Iterator[Batch]:
    """Infinite batches; the same seed gives the same sequence."""
    rng = random.Random(seed)
    while True:
        yield sample_batch(rng, batch_size, size)


def prompt_set(n: int, seed: int = 1234) -> list[str]:
    """A fixed evaluation prompt set, a third each with 1, 2 and 3 objects."""
    rng = random.Random(seed)
    return [scene_to_prompt(sample_scene(rng, 1 + i % 3)) for i in range(n)]
