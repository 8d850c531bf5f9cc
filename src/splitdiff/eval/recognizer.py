"""The attribute recognizer: a small CNN that reads a Shapes image back into a scene.

It predicts the background colour and, for each of the 3x3 cells, the shape there
("empty" included), its colour and its size. Its 256-d penultimate features are the
feature space of FSD, as Inception's are for FID.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..world.scene import BACKGROUND_NAMES, COLOR_NAMES, N_CELLS, SHAPES, SIZES, Scene

INPUT_SIZE = 64
FEATURE_DIM = 256


def _block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class Recognizer(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _block(3, w, 1), _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1), _block(4 * w, 6 * w, 2), _block(6 * w, 6 * w, 1),
        )
        c = 6 * w
        self.cells = nn.AdaptiveAvgPool2d(3)
        self.features = nn.Sequential(nn.Linear(c * (N_CELLS + 1), FEATURE_DIM), nn.SiLU())
        self.background = nn.Linear(FEATURE_DIM, len(BACKGROUND_NAMES))
        self.cell_mlp = nn.Sequential(nn.Linear(c + FEATURE_DIM, 192), nn.SiLU())
        self.shape = nn.Linear(192, len(SHAPES) + 1)
        self.color = nn.Linear(192, len(COLOR_NAMES))
        self.size = nn.Linear(192, len(SIZES))

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Any-resolution images in [-1, 1] -> INPUT_SIZE, anti-aliased."""
        if images.shape[-1] != INPUT_SIZE or images.shape[-2] != INPUT_SIZE:
            images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                                   align_corners=False)
        return images

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x FEATURE_DIM image features, B x 9 x 192 cell features): what every head reads."""
        h = self.body(self.prepare(images))
        cells = self.cells(h).flatten(2).transpose(1, 2)  # B x 9 x C
        glob = h.mean((2, 3))
        feats = self.features(torch.cat([glob, cells.flatten(1)], 1))
        return feats, self.cell_mlp(torch.cat([cells, feats[:, None].expand(-1, N_CELLS, -1)], 2))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats, per_cell = self.encode(images)
        return {
            "features": feats,
            "background": self.background(feats),
            "shape": self.shape(per_cell),
            "color": self.color(per_cell),
            "size": self.size(per_cell),
        }


def scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Class targets; colour and size are -100 (ignored) where a cell is empty."""
    b = len(scenes)
    shape = torch.zeros(b, N_CELLS, dtype=torch.long)
    color = torch.full((b, N_CELLS), -100, dtype=torch.long)
    size = torch.full((b, N_CELLS), -100, dtype=torch.long)
    for i, s in enumerate(scenes):
        for o in s.objects:
            shape[i, o.cell] = SHAPES.index(o.shape) + 1
            color[i, o.cell] = COLOR_NAMES.index(o.color)
            size[i, o.cell] = SIZES.index(o.size)
    background = torch.tensor([BACKGROUND_NAMES.index(s.background) for s in scenes])
    return {"background": background, "shape": shape, "color": color, "size": size}


def recognition_loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.cross_entropy(out["background"], targets["background"])
    for k in ("shape", "color", "size"):
        loss = loss + F.cross_entropy(out[k].flatten(0, 1), targets[k].flatten(), ignore_index=-100)
    return loss
