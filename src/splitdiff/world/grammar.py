"""Prompts: scenes written as English sentences, and parsed back.

"a large red circle at the top left and a small blue star at the bottom right,
on a light gray background". The parser is strict: a word it cannot place is a
PromptError naming that word.
"""

from __future__ import annotations

import re

from ..errors import UserError
from .scene import BACKGROUND_NAMES, CELL_NAMES, COLOR_NAMES, SHAPES, SIZES, Scene, SceneObject


class PromptError(UserError):
    """A prompt the Shapes grammar cannot read."""


def object_phrase(o: SceneObject) -> str:
    return f"a {o.size} {o.color} {o.shape} at the {CELL_NAMES[o.cell]}"


def scene_to_prompt(scene: Scene) -> str:
    phrases = [object_phrase(o) for o in scene.objects]
    if len(phrases) <= 2:
        body = " and ".join(phrases)
    else:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{body}, on a {scene.background} background"


_OBJECT = re.compile(r"^(?:a|an)\s+(\S+)\s+(\S+)\s+(\S+)\s+at\s+the\s+(.+)$")


def _expect(value: str, allowed, what: str, prompt: str) -> str:
    if value not in allowed:
        raise PromptError(f"cannot read {value!r} as a {what} in prompt {prompt!r}")
    return value


def split_prompt(prompt: str) -> tuple[str, list[str]]:
    """A prompt's background name and its object phrases, in order; PromptError when it has no such shape."""
    text = " ".join(prompt.strip().lower().rstrip(".").split())
    if not text:
        raise PromptError("empty prompt")
    body, sep, tail = text.rpartition(", on ")
    if not sep:
        raise PromptError(f"prompt {prompt!r} names no background (expected '..., on a COLOR background')")
    m = re.fullmatch(r"(?:a|an)\s+(.+)\s+background", tail)
    if not m:
        raise PromptError(f"cannot read background phrase {tail!r}")
    background = _expect(m.group(1), BACKGROUND_NAMES, "background color", prompt)
    return background, [p.strip() for p in re.split(r",\s*|\s+and\s+", body) if p.strip()]


def parse_object(part: str, prompt: str) -> SceneObject:
    """One object phrase ('a large red circle at the top left') of `prompt`."""
    om = _OBJECT.match(part)
    if not om:
        word = part.split()[0] if part.split() else part
        raise PromptError(f"cannot read object phrase {part!r} (at {word!r})")
    size, color, shape, where = om.groups()
    _expect(size, SIZES, "size", prompt)
    _expect(color, COLOR_NAMES, "color", prompt)
    _expect(shape, SHAPES, "shape", prompt)
    _expect(where, CELL_NAMES, "position", prompt)
    return SceneObject(shape, color, size, CELL_NAMES.index(where))


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt describes; PromptError names the first word out of place."""
    background, parts = split_prompt(prompt)
    objects = [parse_object(part, prompt) for part in parts]
    try:
        return Scene(background, tuple(objects))
    except ValueError as e:
        raise PromptError(f"{e} in prompt {prompt!r}") from None
