"""Anti-aliased rendering of scenes at any resolution.

Shapes are drawn with PIL at 4x the target size and box-filtered down, which gives
clean anti-aliased edges. Position and size get a small jitter drawn from the seed,
so one seed always gives the same image, and different seeds differ slightly.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from .scene import BACKGROUNDS, COLORS, Scene, SceneObject

SUPERSAMPLE = 4
RADIUS = {"small": 0.075, "large": 0.135}  # fraction of the image side
POSITION_JITTER = 0.035
SIZE_JITTER = 0.10


def _polygon(cx, cy, radii, n_points, phase=-math.pi / 2):
    pts = []
    for i in range(n_points):
        r = radii[i % len(radii)]
        a = phase + 2 * math.pi * i / n_points
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject, cx: float, cy: float, r: float, fill=None):
    """One base shape; `fill` replaces the object's colour (255 draws it into a mask)."""
    fill = COLORS[o.color] if fill is None else fill
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(0.42 * r)))
    elif o.shape == "square":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif o.shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, [1.1 * r], 3), fill=fill)
    elif o.shape == "star":
        draw.polygon(_polygon(cx, cy + 0.05 * r, [1.1 * r, 0.45 * r], 10), fill=fill)
    elif o.shape == "cross":
        w = 0.32 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # pragma: no cover - Scene validates shapes
        raise ValueError(o.shape)


def render(scene: Scene, size: int = 64, seed: int = 0, draw_object=_draw_object) -> Image.Image:
    """The scene as an RGB image of size x size pixels, deterministic for (scene, seed).

    `draw_object(draw, o, cx, cy, r)` draws one object at its jittered place and radius
    (in supersampled pixels); private concepts (world/concepts.py) bring their own.
    """
    if size < 16:
        raise ValueError("render size must be at least 16 px")
    rng = random.Random(seed)
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        row, col = divmod(o.cell, 3)
        cx = ((col + 0.5) / 3 + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * big
        cy = ((row + 0.5) / 3 + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * big
        r = RADIUS[o.size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) * big
        draw_object(draw, o, cx, cy, r)
    return img.resize((size, size), Image.Resampling.BOX)


def to_array(img: Image.Image) -> np.ndarray:
    """HWC uint8 -> CHW float32 in [-1, 1], the range diffusers' VAEs expect."""
    a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return a.transpose(2, 0, 1).copy()
