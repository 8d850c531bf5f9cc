import random

import numpy as np
import pytest

from splitdiff.world import PromptError, parse_prompt, prompt_set, render, sample_scene, scene_to_prompt
from splitdiff.world.dataset import sample_batch
from splitdiff.world.scene import COLORS, MAX_OBJECTS, SHAPES


def test_scene_prompt_scene_round_trip():
    rng = random.Random(0)
    for _ in range(500):
        scene = sample_scene(rng)
        assert parse_prompt(scene_to_prompt(scene)) == scene


def test_vocabulary_is_rich_enough():
    assert len(SHAPES) >= 5 and len(COLORS) >= 8 and MAX_OBJECTS == 3


def test_parser_ignores_case_spacing_and_final_period():
    scene = parse_prompt("  A large RED circle at the top left and a small blue star at the bottom right, "
                         "on a light gray background. ")
    assert [o.shape for o in scene.objects] == ["circle", "star"]
    assert scene.background == "light gray"


@pytest.mark.parametrize("prompt, word", [
    ("a large red hexagon at the top left, on a navy background", "hexagon"),
    ("a huge red circle at the top left, on a navy background", "huge"),
    ("a large red circle at the top left, on a plaid background", "plaid"),
    ("a large red circle at the far left, on a navy background", "far left"),
    ("a large red circle at the top left", "background"),
    ("", "empty"),
    ("a large red circle at the center and a small blue star at the center, on a navy background", "share"),
])
def test_bad_prompts_name_the_problem(prompt, word):
    with pytest.raises(PromptError) as e:
        parse_prompt(prompt)
    assert word in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_renderer_is_deterministic_per_seed_at_any_size(size):
    scene = sample_scene(random.Random(3), 3)
    a, b = np.asarray(render(scene, size, 5)), np.asarray(render(scene, size, 5))
    c = np.asarray(render(scene, size, 6))
    assert a.shape == (size, size, 3) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_renderer_is_anti_aliased():
    scene = parse_prompt("a large red circle at the center, on a white background")
    pixels = {tuple(p) for p in np.asarray(render(scene, 64, 0)).reshape(-1, 3)}
    assert len(pixels) > 4  # edge pixels blend the two colours


def test_dataset_batches_and_prompt_set():
    b = sample_batch(random.Random(0), 4, 64)
    assert b.images.shape == (4, 3, 64, 64) and -1 <= b.images.min() and b.images.max() <= 1
    assert [parse_prompt(p) for p in b.prompts] == b.scenes
    ps = prompt_set(30)
    assert ps == prompt_set(30) and {len(parse_prompt(p).objects) for p in ps} == {1, 2, 3}
