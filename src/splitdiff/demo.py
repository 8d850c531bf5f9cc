"""`make demo`: the main job on the embedded default.

With the embedded family installed: hybrid generation (cloud then edge) of a few
prompts, an image grid and the cost table. Without it: a grid of world renders with
their prompts, scored by the evaluator.
"""

from __future__ import annotations

from pathlib import Path

import torch
from .grid import image_grid
from .io import atomic_save_image
from .world import prompt_set

DEMO_PROMPTS = 8


def world_demo(out: Path) -> None:
    from .core.runner import to_pil
    from .eval import adherence, reference_renders

    prompts = prompt_set(DEMO_PROMPTS, seed=7)
    images = reference_renders(prompts, 128)
    scores, mean = adherence(images, prompts)
    grid = image_grid(to_pil(images), rows=2, cols=(len(prompts) + 1) // 2,
                      captions=[f"{s:.2f} {p}" for s, p in zip(scores, prompts)], cell=128, lines=3)
    atomic_save_image(grid, out / "world_grid.png")
    for p, s in zip(prompts, scores):
        print(f"{s:.2f}  {p}")
    print(f"mean adherence {mean:.3f}; wrote {out / 'world_grid.png'}")


def run_demo(out: Path) -> None:
    from .core.registry import family_available

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if family_available():
        from .hybrid.demo import hybrid_demo

        hybrid_demo(out)
    else:
        world_demo(out)
