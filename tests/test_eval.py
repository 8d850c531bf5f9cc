"""The shipped evaluator measures what it claims."""

import pytest
import torch

from splitdiff.eval import default_evaluator, reference_renders
from splitdiff.eval.metrics import Recognised, frechet_distance, scene_adherence
from splitdiff.eval.validate import validate
from splitdiff.world import parse_prompt, prompt_set


@pytest.fixture(scope="module")
def figures():
    return validate(n=256, seed=77)


def test_adherence_on_fresh_renders_is_near_perfect(figures):
    assert figures["adherence_renders_64"] >= 0.99
    assert figures["adherence_renders_128"] >= 0.99


def test_adherence_on_noise_is_near_chance(figures):
    # The recognizer reads 4-6 objects into a noise image, so each prompt object finds one at its
    # position more often than against another prompt's render (adherence_chance, about 0.24).
    assert figures["adherence_chance"] <= 0.3 and figures["adherence_noise"] <= 0.4


def test_fsd_small_between_render_sets_large_against_noise(figures):
    assert figures["fsd_render_sets"] * 20 < figures["fsd_noise_vs_renders"]


def test_adherence_ignores_object_order_and_counts_attributes():
    scene = parse_prompt("a large red circle at the top left and a small blue star at the center, on a navy background")
    seen = Recognised("navy", (("star", "blue", "small", 4), ("circle", "red", "large", 0)))
    assert scene_adherence(scene, seen) == 1.0
    wrong_colour = Recognised("navy", (("star", "green", "small", 4), ("circle", "red", "large", 0)))
    assert scene_adherence(scene, wrong_colour) == pytest.approx(8 / 9)
    assert scene_adherence(scene, Recognised("black", ())) == 0.0


def test_adherence_falls_when_images_and_prompts_are_swapped():
    prompts = prompt_set(64, seed=5)
    images = reference_renders(prompts, 64)
    ev = default_evaluator()
    _, right = ev.adherence(images, prompts)
    _, wrong = ev.adherence(images, prompts[1:] + prompts[:1])
    assert right - wrong > 0.4


def test_frechet_distance_of_identical_sets_is_zero():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0)).double().numpy()
    assert abs(frechet_distance(x, x)) < 1e-6
