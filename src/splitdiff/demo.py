"""`make demo`: the main job on the embedded default.

With the embedded family installed: hybrid generation (cloud then edge) of a few
prompts, an image grid and the cost table. Without it: a grid of world renders with
their prompts, scored by the evaluator.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .io import atomic_save_image
from .world import prompt_set

DEMO_PROMPTS = 8


def image_grid(images: list[Image.Image], captions: list[str], cols: int = 4, caption_h: int = 28) -> Image.Image:
    w, h = images[0].size
    w = max(w, 128)
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * (h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * w, (i // cols) * (h + caption_h)
        grid.paste(img, (x, y))
        words, line, lines = cap.split(), "", []
        for word in words:
            if len(line) + len(word) > w // 6:
                lines.append(line)
                line = ""
            line += word + " "
        lines.append(line)
        draw.multiline_text((x + 2, y + h + 1), "\n".join(lines[:3]), fill="black", spacing=0,
                            font_size=8)
    return grid


def world_demo(out: Path) -> None:
    from .core.runner import to_pil
    from .eval import adherence, reference_renders

    prompts = prompt_set(DEMO_PROMPTS, seed=7)
    images = reference_renders(prompts, 128)
    scores, mean = adherence(images, prompts)
    grid = image_grid(to_pil(images), [f"{s:.2f} {p}" for s, p in zip(scores, prompts)])
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
