"""The concept recognizer: does an image show a user's private concept, and where?

A separate small CNN, so the shipped evaluator (and every figure measured with it)
stays as it is. It is the evaluator's network with a wider shape head (the six base
shapes and the private ones) and a texture head, and it starts from the evaluator's
weights: the world it reads is the same, only the vocabulary grows. Per cell of the
3x3 grid it reads the shape ("empty" included), texture, colour and size; per image
the background.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..io import load_tensors
from ..world.concepts import ALL_SHAPES, ALL_TEXTURES, Concept, ConceptObject
from ..world.scene import BACKGROUND_NAMES, COLOR_NAMES, N_CELLS, SHAPES, SIZES, Scene
from .recognizer import Recognizer

WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "concept-recognizer.safetensors"


class ConceptRecognizer(Recognizer):
    """The evaluator's network, reading private shapes and textures too."""

    def __init__(self, width: int = 32):
        super().__init__(width)
        self.shape = nn.Linear(192, len(ALL_SHAPES) + 1)
        self.texture = nn.Linear(192, len(ALL_TEXTURES))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats, per_cell = self.encode(images)
        return {"features": feats, "background": self.background(feats), "shape": self.shape(per_cell),
                "texture": self.texture(per_cell), "color": self.color(per_cell), "size": self.size(per_cell)}

    def start_from_evaluator(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the evaluator's weights: all of them, and its shape head's rows for 'empty' and the base shapes."""
        own = self.state_dict()
        for key, value in tensors.items():
            if key.startswith("shape."):
                own[key][: value.shape[0]] = value.float()
            elif key in own and own[key].shape == value.shape:
                own[key] = value.float()
        self.load_state_dict(own)


def concept_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Class targets; texture, colour and size are -100 (ignored) where a cell is empty."""
    b = len(scenes)
    shape = torch.zeros(b, N_CELLS, dtype=torch.long)
    texture, color, size = (torch.full((b, N_CELLS), -100, dtype=torch.long) for _ in range(3))
    for i, s in enumerate(scenes):
        for o in s.objects:
            shape[i, o.cell] = ALL_SHAPES.index(o.shape) + 1
            texture[i, o.cell] = ALL_TEXTURES.index(getattr(o, "texture", "plain"))
            color[i, o.cell] = COLOR_NAMES.index(o.color)
            size[i, o.cell] = SIZES.index(o.size)
    background = torch.tensor([BACKGROUND_NAMES.index(s.background) for s in scenes])
    return {"background": background, "shape": shape, "texture": texture, "color": color, "size": size}


def concept_loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.cross_entropy(out["background"], targets["background"])
    for k in ("shape", "texture", "color", "size"):
        loss = loss + F.cross_entropy(out[k].flatten(0, 1), targets[k].flatten(), ignore_index=-100)
    return loss


@dataclass(frozen=True)
class SeenObject:
    shape: str
    texture: str
    color: str
    size: str
    cell: int

    @property
    def private(self) -> bool:
        """An object the base world never draws."""
        return self.shape not in SHAPES or self.texture != "plain"


@dataclass(frozen=True)
class Reading:
    background: str
    objects: tuple[SeenObject, ...]

    def at(self, cell: int) -> SeenObject | None:
        return next((o for o in self.objects if o.cell == cell), None)


class ConceptReader:
    """The shipped concept recognizer and the presence score built on it."""

    def __init__(self, weights: Path = WEIGHTS, batch_size: int = 128):
        if not Path(weights).exists():
            raise UserError(f"the concept recognizer is not in this installation (no {weights}); "
                            f"train it with `splitdiff train concept-recognizer`")
        tensors, meta = load_tensors(weights)
        self.model = ConceptRecognizer(**meta.get("config", {})).eval()
        self.model.load_state_dict({k: v.float() for k, v in tensors.items()})
        self.batch_size = batch_size

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[Reading]:
        """What each image shows; images B x 3 x H x W in [-1, 1], any H = W."""
        outs = [self.model(images[i:i + self.batch_size].float()) for i in range(0, len(images), self.batch_size)]
        out = {k: torch.cat([o[k] for o in outs]).argmax(-1) for k in outs[0] if k != "features"}
        readings = []
        for i in range(len(images)):
            objs = tuple(SeenObject(ALL_SHAPES[out["shape"][i, c] - 1], ALL_TEXTURES[out["texture"][i, c]],
                                    COLOR_NAMES[out["color"][i, c]], SIZES[out["size"][i, c]], c)
                         for c in range(N_CELLS) if out["shape"][i, c] > 0)
            readings.append(Reading(BACKGROUND_NAMES[out["background"][i]], objs))
        return readings

    def presence(self, images: torch.Tensor, concept: Concept, scenes: list[Scene] | None = None,
                 readings: list[Reading] | None = None) -> list[bool]:
        """Does each image show the concept? With `scenes`, at every cell its scene puts the concept;
        without, anywhere. `readings`: the images' readings, when already made."""
        result = []
        for i, reading in enumerate(readings if readings is not None else self.read(images)):
            if scenes is None:
                seen = list(reading.objects)
            else:
                cells = [o.cell for o in scenes[i].objects if isinstance(o, ConceptObject)]
                seen = [reading.at(c) for c in cells]
                if not cells or any(o is None for o in seen):
                    result.append(False)
                    continue
            hits = [o is not None and concept.matches(o.shape, o.texture, o.color) for o in seen]
            result.append(all(hits) if scenes is not None else any(hits))
        return result


@lru_cache(maxsize=1)
def default_reader() -> ConceptReader:
    return ConceptReader()
