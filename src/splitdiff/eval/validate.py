"""Does the evaluator measure what it claims? Figures on renders, noise and two render sets."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..world import prompt_set
from .metrics import default_evaluator, reference_renders


def validate(n: int = 512, seed: int = 2024) -> dict[str, float]:
    ev = default_evaluator()
    prompts = prompt_set(n, seed)
    r64, r128 = reference_renders(prompts, 64, seed), reference_renders(prompts, 128, seed + n)
    other = reference_renders(prompt_set(n, seed + 1), 64, seed + 2 * n)
    noise = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    return {
        "n": n,
        "adherence_renders_64": ev.adherence(r64, prompts)[1],
        "adherence_renders_128": ev.adherence(r128, prompts)[1],
        "adherence_noise": ev.adherence(noise, prompts)[1],
        # chance: renders scored against other prompts, under the same object matching
        "adherence_chance": ev.adherence(r64, prompts[1:] + prompts[:1])[1],
        "fsd_render_sets": ev.fsd(other, r64),
        "fsd_noise_vs_renders": ev.fsd(noise, r64),
    }


def print_validation(figures: dict[str, float], out: Path | None = None) -> None:
    for key, value in figures.items():
        print(f"{key:24s} {value:.4f}" if isinstance(value, float) else f"{key:24s} {value}")
    if out:
        out.write_text(json.dumps(figures, indent=2) + "\n")
