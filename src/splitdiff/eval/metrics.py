"""Quality metrics on the Shapes world: prompt adherence and FSD.

adherence: the fraction of a prompt's attributes (background, and each object's
shape, colour, size and position) that the recognizer finds in the image. Prompt
objects are matched to recognised objects by the assignment that agrees on the
most attributes, so the order of objects in the prompt does not matter.

fsd: the Fréchet distance between Gaussians fitted to recognizer features of two
image sets: the FID protocol with a feature network that knows this world.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from scipy.optimize import linear_sum_assignment

from ..io import load_tensors
from ..world import parse_prompt
from ..world.scene import BACKGROUND_NAMES, COLOR_NAMES, N_CELLS, SHAPES, SIZES, Scene
from .recognizer import Recognizer

WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "evaluator.safetensors"


@dataclass(frozen=True)
class Recognised:
    background: str
    objects: tuple[tuple[str, str, str, int], ...]  # (shape, color, size, cell)


def scene_adherence(scene: Scene, seen: Recognised) -> float:
    """Fraction of the scene's attributes found in the recognised image."""
    total = 1 + 4 * len(scene.objects)
    hits = float(scene.background == seen.background)
    if seen.objects:
        agree = np.array([[float(o.shape == s[0]) + float(o.color == s[1]) + float(o.size == s[2])
                           + float(o.cell == s[3]) for s in seen.objects] for o in scene.objects])
        rows, cols = linear_sum_assignment(agree, maximize=True)
        hits += agree[rows, cols].sum()
    return hits / total


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class Evaluator:
    """The shipped recognizer and the metrics built on it."""

    def __init__(self, weights: Path = WEIGHTS, batch_size: int = 128):
        tensors, meta = load_tensors(weights)
        self.model = Recognizer(**meta.get("config", {})).eval()
        self.model.load_state_dict({k: v.float() for k, v in tensors.items()})
        self.batch_size = batch_size

    @torch.no_grad()
    def _run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = [self.model(images[i:i + self.batch_size].float()) for i in range(0, len(images), self.batch_size)]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def recognise(self, images: torch.Tensor) -> list[Recognised]:
        out = self._run(images)
        bg, shape = out["background"].argmax(-1), out["shape"].argmax(-1)
        color, size = out["color"].argmax(-1), out["size"].argmax(-1)
        result = []
        for i in range(len(images)):
            objs = tuple((SHAPES[shape[i, c] - 1], COLOR_NAMES[color[i, c]], SIZES[size[i, c]], c)
                         for c in range(N_CELLS) if shape[i, c] > 0)
            result.append(Recognised(BACKGROUND_NAMES[bg[i]], objs))
        return result

    def adherence(self, images: torch.Tensor, prompts: list[str]) -> tuple[list[float], float]:
        """Per-image adherence and its mean; images B x 3 x H x W in [-1, 1], any H = W."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = [scene_adherence(parse_prompt(p), r) for p, r in zip(prompts, self.recognise(images))]
        return scores, float(np.mean(scores))

    def features(self, images: torch.Tensor) -> np.ndarray:
        return self._run(images)["features"].double().numpy()

    def fsd(self, images: torch.Tensor, reference: torch.Tensor) -> float:
        return frechet_distance(self.features(images), self.features(reference))


@lru_cache(maxsize=1)
def default_evaluator() -> Evaluator:
    return Evaluator()


def adherence(images: torch.Tensor, prompts: list[str]) -> tuple[list[float], float]:
    return default_evaluator().adherence(images, prompts)


def fsd(images: torch.Tensor, reference: torch.Tensor) -> float:
    return default_evaluator().fsd(images, reference)


def reference_renders(prompts: list[str], size: int, seed: int = 999) -> torch.Tensor:
    """The world's own renders of the prompts: the FSD reference set."""
    from ..world import render_images

    return render_images([parse_prompt(p) for p in prompts], size, range(seed, seed + len(prompts)))
