"""The Shapes world's vocabulary and its structured scenes.

A scene is what a prompt means: a background colour and 1 to 3 objects, each with
a shape, a colour, a size and a cell of a 3x3 grid. Objects never share a cell and
never take the background's colour, so every attribute a prompt names is visible.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "brown": (125, 80, 40),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUNDS = {
    "light gray": (200, 200, 200),
    "dark gray": (70, 70, 70),
    "white": COLORS["white"],
    "black": COLORS["black"],
    "beige": (235, 220, 180),
    "navy": (20, 30, 90),
    "teal": (30, 130, 130),
    "olive": (120, 120, 40),
}
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
MAX_OBJECTS = 3
N_CELLS = len(ROWS) * len(COLS)

COLOR_NAMES = tuple(COLORS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)


def cell_name(cell: int) -> str:
    """'top left' ... 'center' ... 'bottom right' for cells 0..8 (row-major)."""
    row, col = divmod(cell, 3)
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return f"middle {COLS[col]}"
    if col == 1:
        return f"{ROWS[row]} center"
    return f"{ROWS[row]} {COLS[col]}"


CELL_NAMES = tuple(cell_name(c) for c in range(N_CELLS))


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cell: int

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        check_placement(self.color, self.size, self.cell)


def check_placement(color: str, size: str, cell: int) -> None:
    """ValueError unless colour, size and cell are the world's."""
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}")
    if not 0 <= cell < N_CELLS:
        raise ValueError(f"cell {cell} is outside the 3x3 grid")


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, not {len(self.objects)}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError("two objects share a cell")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(d["background"], tuple(SceneObject(**o) for o in d["objects"]))


def sample_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    """A uniformly random scene; object colours differ from the background's."""
    n = n_objects or rng.randint(1, MAX_OBJECTS)
    background = rng.choice(BACKGROUND_NAMES)
    cells = rng.sample(range(N_CELLS), n)
    palette = [c for c in COLOR_NAMES if COLORS[c] != BACKGROUNDS[background]]
    objects = tuple(
        SceneObject(rng.choice(SHAPES), rng.choice(palette), rng.choice(SIZES), cell) for cell in cells
    )
    return Scene(background, objects)
