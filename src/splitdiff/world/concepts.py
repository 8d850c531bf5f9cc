"""Private concepts: shapes and textures the base world never shows, each owned by one user.

A user writes their concept into prompts with a rare token: "a large sks at the top
left, on a navy background". A concept SPEC says what the token stands for:

    SPEC    := [COLOR] [TEXTURE] SHAPE
    COLOR   := one of the world's ten colours (red ... black)
    TEXTURE := striped | dotted
    SHAPE   := a private shape (heart, crescent, diamond, arrow), or a base one with a TEXTURE

so `heart`, `red heart`, `striped square` and `blue dotted circle` are concepts, and
`red circle` is not (the base world draws red circles). A spec with a colour fixes it,
and prompts name the token without one ("a large sks"); a spec without a colour leaves
it to the prompt ("a large green sks"). Everything else in a prompt is the base
grammar's, so concept prompts may name base objects too.

Concept objects are `ConceptObject`s inside ordinary `Scene`s; the base world's
sampler and dataset never make one, so its training data never holds a concept.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw, ImageFilter

from ..errors import UserError
from .grammar import PromptError, _expect, object_phrase, parse_object, split_prompt
from .render import RADIUS, _draw_object, render
from .scene import (BACKGROUND_NAMES, BACKGROUNDS, CELL_NAMES, COLOR_NAMES, COLORS, MAX_OBJECTS, N_CELLS, SHAPES,
                    SIZES, Scene, SceneObject, check_placement)

PRIVATE_SHAPES = ("heart", "crescent", "diamond", "arrow")
ALL_SHAPES = SHAPES + PRIVATE_SHAPES
TEXTURES = ("striped", "dotted")
ALL_TEXTURES = ("plain",) + TEXTURES
# Textures need an area to show on: a ring's strokes, a diamond's or an arrow's tips are as thin as the pattern.
TEXTURED_SHAPES = ("circle", "square", "triangle", "heart")
DEFAULT_TOKEN = "sks"
# Texture sizes in pixels of a 64 px render: as coarse as a small object leaves room for.
STRIPE_PERIOD, DOT_PERIOD, DOT_RADIUS, OUTLINE = 5.0, 5.0, 1.3, 1.0
# Words a token may not be: it would be read as the base grammar's.
GRAMMAR_WORDS = frozenset({"a", "an", "at", "the", "on", "and", "background", "top", "middle", "bottom", "left",
                           "center", "right", "light", "dark", "gray", *SIZES, *COLOR_NAMES, *ALL_SHAPES,
                           *TEXTURES, *(w for b in BACKGROUND_NAMES for w in b.split())})


class ConceptError(UserError):
    """A concept spec, token or concept prompt the world cannot draw or read."""


@dataclass(frozen=True)
class Concept:
    """What a token stands for: a shape, a texture ('plain' for none) and, optionally, a colour."""

    shape: str
    texture: str = "plain"
    color: str | None = None

    def __post_init__(self):
        if self.shape not in ALL_SHAPES:
            raise ConceptError(f"unknown shape {self.shape!r}; shapes: {', '.join(ALL_SHAPES)}")
        if self.texture not in ALL_TEXTURES:
            raise ConceptError(f"unknown texture {self.texture!r}; textures: {', '.join(TEXTURES)}")
        if self.color is not None and self.color not in COLORS:
            raise ConceptError(f"unknown colour {self.color!r}; colours: {', '.join(COLOR_NAMES)}")
        if self.texture != "plain" and self.shape not in TEXTURED_SHAPES:
            raise ConceptError(f"a {self.texture} {self.shape} cannot be drawn: the shape is too thin for a "
                               f"texture (textured shapes: {', '.join(TEXTURED_SHAPES)})")
        if self.shape in SHAPES and self.texture == "plain":
            raise ConceptError(f"{self.spec!r} is no private concept: the base world already draws it; name a "
                               f"new shape ({', '.join(PRIVATE_SHAPES)}) or a texture ({', '.join(TEXTURES)})")

    @property
    def spec(self) -> str:
        words = [self.color] if self.color else []
        words += [self.texture] if self.texture != "plain" else []
        return " ".join(words + [self.shape])

    def matches(self, shape: str, texture: str, color: str) -> bool:
        """Does an object of this shape, texture and colour show the concept?"""
        return shape == self.shape and texture == self.texture and (self.color is None or color == self.color)

    def object(self, size: str, cell: int, color: str | None = None) -> "ConceptObject":
        """The concept as an object of the scene; `color` is needed when the spec leaves it open."""
        color = self.color or color
        if color is None:
            raise ConceptError(f"concept {self.spec!r} names no colour, so its object needs one")
        return ConceptObject(self.shape, color, size, cell, self.texture)


def parse_concept(spec: str) -> Concept:
    """SPEC := [COLOR] [TEXTURE] SHAPE; a ConceptError names what the world cannot draw."""
    words = " ".join(spec.strip().lower().split())
    if not words:
        raise ConceptError("empty concept spec (write [COLOR] [TEXTURE] SHAPE, e.g. 'red heart')")
    m = re.fullmatch(rf"(?:({'|'.join(COLOR_NAMES)})\s+)?(?:({'|'.join(TEXTURES)})\s+)?(\S+)", words)
    if not m:
        unknown = next((w for w in words.split()[:-1] if w not in COLOR_NAMES and w not in TEXTURES),
                       words.split()[0])
        raise ConceptError(f"cannot read {unknown!r} in concept spec {spec!r}: write [COLOR] [TEXTURE] SHAPE with "
                           f"colours {', '.join(COLOR_NAMES)} and textures {', '.join(TEXTURES)}")
    color, texture, shape = m.groups()
    if shape not in ALL_SHAPES:
        raise ConceptError(f"the world cannot draw a {shape!r} (concept spec {spec!r}); shapes: "
                           f"{', '.join(ALL_SHAPES)}")
    return Concept(shape, texture or "plain", color)


def check_token(token: str) -> str:
    """A token is one lowercase word of letters that the base grammar does not use."""
    if not re.fullmatch(r"[a-z]{2,16}", token or ""):
        raise ConceptError(f"token {token!r} must be one lowercase word of 2 to 16 letters, e.g. 'sks'")
    if token in GRAMMAR_WORDS:
        raise ConceptError(f"token {token!r} is a word of the world's grammar; pick a rare one, e.g. 'sks'")
    return token


@dataclass(frozen=True)
class ConceptObject:
    """An object the base world never draws: a private shape, or any shape with a texture."""

    shape: str
    color: str
    size: str
    cell: int
    texture: str = "plain"

    def __post_init__(self):
        Concept(self.shape, self.texture)  # a private shape, or a drawable texture
        check_placement(self.color, self.size, self.cell)


# --- drawing --------------------------------------------------------------------------------------------------

def _heart(cx: float, cy: float, r: float, n: int = 64) -> list[tuple[float, float]]:
    """The classic heart curve, scaled to the world's radius (about as wide as a circle of radius r)."""
    s = 1.1 * r / 16
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((cx + s * x, cy + s * (y - 2.5)))
    return pts


def _arrow(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """A right-pointing arrow: a shaft and a wide head."""
    w, head, tip = 0.3 * r, 0.8 * r, 1.1 * r
    neck = cx + 0.05 * r
    return [(cx - tip, cy - w), (neck, cy - w), (neck, cy - head), (cx + tip, cy), (neck, cy + head),
            (neck, cy + w), (cx - tip, cy + w)]


def _shape_mask(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    """The shape in 255 on an 'L' mask."""
    if shape == "heart":
        draw.polygon(_heart(cx, cy, r), fill=255)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy, ri = cx + 0.55 * r, cy - 0.25 * r, 0.85 * r
        draw.ellipse([ox - ri, oy - ri, ox + ri, oy + ri], fill=0)
    elif shape == "diamond":
        draw.polygon([(cx, cy - 1.15 * r), (cx + 0.75 * r, cy), (cx, cy + 1.15 * r), (cx - 0.75 * r, cy)], fill=255)
    elif shape == "arrow":
        draw.polygon(_arrow(cx, cy, r), fill=255)
    else:
        _draw_object(draw, SceneObject(shape, "white", "small", 0), cx, cy, r, fill=255)


def _texture(mask: Image.Image, texture: str, cx: float, cy: float, unit: float) -> Image.Image:
    """The mask with the texture cut out of it (diagonal stripes, or a grid of round holes) inside an outline.

    `unit` is a length that scales with the image (not the object), so that a small object's
    pattern is as coarse as a large one's and survives a 64 px render.
    """
    if texture == "plain":
        return mask
    cut = Image.new("L", mask.size, 255)
    draw = ImageDraw.Draw(cut)
    reach = max(mask.size) * 2
    period = STRIPE_PERIOD * unit if texture == "striped" else DOT_PERIOD * unit
    n = int(reach / period) + 1
    for k in range(-n, n + 1):
        if texture == "striped":  # gaps along x + y = const, through the object's centre
            c = cx + k * period * math.sqrt(2)
            draw.line([(c - reach, cy + reach), (c + reach, cy - reach)], fill=0, width=max(1, round(period / 2)))
        else:  # holes on a square grid centred on the object
            for j in range(-n, n + 1):
                x, y, h = cx + k * period, cy + j * period, DOT_RADIUS * unit
                draw.ellipse([x - h, y - h, x + h, y + h], fill=0)
    rim = 2 * round(OUTLINE * unit) + 1  # the outline keeps the silhouette: a striped circle stays round
    outline = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(rim)))
    return ImageChops.lighter(ImageChops.multiply(mask, cut), outline)


def draw_any_object(draw: ImageDraw.ImageDraw, o, cx: float, cy: float, r: float) -> None:
    """The renderer's object hook: base objects as the base world draws them, concept objects from a mask."""
    if isinstance(o, SceneObject):
        _draw_object(draw, o, cx, cy, r)
        return
    pad = int(1.6 * r) + 2
    x0, y0 = int(cx) - pad, int(cy) - pad
    mask = Image.new("L", (2 * pad, 2 * pad), 0)
    lx, ly = cx - x0, cy - y0
    _shape_mask(ImageDraw.Draw(mask), o.shape, lx, ly, r)
    unit = r / RADIUS[o.size] / 64  # one pixel of a 64 px render, in supersampled pixels
    draw.bitmap((x0, y0), _texture(mask, o.texture, lx, ly, unit), fill=COLORS[o.color])


def render_scene(scene: Scene, size: int = 64, seed: int = 0) -> Image.Image:
    """Any scene, concept objects included; a base scene renders exactly as `render` draws it."""
    return render(scene, size, seed, draw_object=draw_any_object)


# --- prompts --------------------------------------------------------------------------------------------------

def concept_phrase(o: ConceptObject, concept: Concept, token: str) -> str:
    color = "" if concept.color else f" {o.color}"
    return f"a {o.size}{color} {token} at the {CELL_NAMES[o.cell]}"


def concept_prompt(scene: Scene, concept: Concept, token: str = DEFAULT_TOKEN) -> str:
    """The scene as a prompt, its concept objects written with the token."""
    phrases = [concept_phrase(o, concept, token) if isinstance(o, ConceptObject) else object_phrase(o)
               for o in scene.objects]
    body = " and ".join(phrases) if len(phrases) <= 2 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{body}, on a {scene.background} background"


def parse_concept_prompt(prompt: str, concept: Concept, token: str = DEFAULT_TOKEN) -> Scene:
    """The scene a prompt with the token describes; PromptError names the first word out of place."""
    background, parts = split_prompt(prompt)
    pattern = re.compile(rf"^(?:a|an)\s+(\S+)\s+(?:(\S+)\s+)?{re.escape(token)}\s+at\s+the\s+(.+)$")
    objects = []
    for part in parts:
        m = pattern.match(part)
        if not m:
            objects.append(parse_object(part, prompt))
            continue
        size, color, where = m.groups()
        _expect(size, SIZES, "size", prompt)
        _expect(where, CELL_NAMES, "position", prompt)
        if concept.color and color:
            raise PromptError(f"{token!r} is always {concept.color}: write 'a {size} {token}', not "
                              f"{color!r}, in prompt {prompt!r}")
        if not concept.color:
            if not color:
                raise PromptError(f"concept {concept.spec!r} needs a colour: 'a {size} COLOR {token}' in prompt "
                                  f"{prompt!r}")
            _expect(color, COLOR_NAMES, "color", prompt)
        objects.append(concept.object(size, CELL_NAMES.index(where), color))
    if not any(isinstance(o, ConceptObject) for o in objects):
        raise PromptError(f"prompt {prompt!r} does not name the token {token!r}")
    try:
        return Scene(background, tuple(objects))
    except ValueError as e:
        raise PromptError(f"{e} in prompt {prompt!r}") from None


# --- sampling -------------------------------------------------------------------------------------------------

def _palette(background: str) -> list[str]:
    return [c for c in COLOR_NAMES if COLORS[c] != BACKGROUNDS[background]]


def sample_concept_scene(rng: random.Random, concept: Concept, n_objects: int | None = None,
                         size: str | None = None) -> Scene:
    """The concept once (of `size`, or either), with 0 to 2 base objects, on a background its colour shows on."""
    n = n_objects or rng.randint(1, MAX_OBJECTS)
    backgrounds = [b for b in BACKGROUND_NAMES if concept.color is None or COLORS[concept.color] != BACKGROUNDS[b]]
    background = rng.choice(backgrounds)
    cells = rng.sample(range(N_CELLS), n)
    palette = _palette(background)
    concept_size = rng.choice(SIZES)
    objects = [concept.object(size or concept_size, cells[0], rng.choice(palette))]
    objects += [SceneObject(rng.choice(SHAPES), rng.choice(palette), rng.choice(SIZES), c) for c in cells[1:]]
    rng.shuffle(objects)
    return Scene(background, tuple(objects))


def sample_private_scene(rng: random.Random, p_private: float = 0.5) -> Scene:
    """A scene whose objects are each, with probability `p_private`, a random concept object: recognizer data."""
    n = rng.randint(1, MAX_OBJECTS)
    background = rng.choice(BACKGROUND_NAMES)
    cells = rng.sample(range(N_CELLS), n)
    palette = _palette(background)
    objects = []
    for cell in cells:
        color, size = rng.choice(palette), rng.choice(SIZES)
        if rng.random() < p_private:  # half plain private shapes, half textured shapes
            if rng.random() < 0.5:
                objects.append(ConceptObject(rng.choice(PRIVATE_SHAPES), color, size, cell))
            else:
                objects.append(ConceptObject(rng.choice(TEXTURED_SHAPES), color, size, cell, rng.choice(TEXTURES)))
        else:
            objects.append(SceneObject(rng.choice(SHAPES), color, size, cell))
    return Scene(background, tuple(objects))
