"""The users axis: private concepts, the concept recognizer, personalized adapters and their bad inputs."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from splitdiff.world import parse_prompt, render, sample_scene, scene_to_prompt
from splitdiff.world.concepts import (PRIVATE_SHAPES, TEXTURES, Concept, ConceptError, ConceptObject, check_token,
                                      concept_prompt, parse_concept, parse_concept_prompt, render_scene,
                                      sample_concept_scene, sample_private_scene)
from splitdiff.world.dataset import sample_batch
from splitdiff.world.grammar import PromptError
from splitdiff.world.scene import SHAPES, Scene, SceneObject

SCRIPT = Path(sys.executable).with_name("splitdiff")


def splitdiff(*args, cwd, env=None):
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_one_line_error(r, words):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("splitdiff: error: "), r.stderr
    assert words in lines[0], lines[0]


# --- concepts in the world ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, concept", [
    ("red heart", Concept("heart", "plain", "red")),
    ("crescent", Concept("crescent")),
    ("  Striped   SQUARE ", Concept("square", "striped")),
    ("blue dotted circle", Concept("circle", "dotted", "blue")),
])
def test_concept_specs(spec, concept):
    assert parse_concept(spec) == concept
    assert parse_concept(concept.spec) == concept


@pytest.mark.parametrize("spec, words", [
    ("", "empty concept spec"),
    ("plaid heart", "'plaid'"),
    ("hexagon", "cannot draw a 'hexagon'"),
    ("red circle", "no private concept"),
    ("striped ring", "too thin for a texture"),
    ("heart red", "'heart'"),
    ("red red heart", "'red'"),
])
def test_a_spec_the_world_cannot_draw_is_one_line(spec, words):
    with pytest.raises(ConceptError) as e:
        parse_concept(spec)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("token", ["red", "circle", "sks1", "s", ""])
def test_tokens_must_be_rare_words(token):
    with pytest.raises(ConceptError):
        check_token(token)


@pytest.mark.parametrize("spec", ["red heart", "crescent", "green dotted triangle"])
def test_concept_prompts_round_trip(spec):
    concept, rng = parse_concept(spec), random.Random(1)
    for _ in range(100):
        scene = sample_concept_scene(rng, concept)
        prompt = concept_prompt(scene, concept, "sks")
        assert parse_concept_prompt(prompt, concept, "sks") == scene
        assert sum(isinstance(o, ConceptObject) for o in scene.objects) == 1


@pytest.mark.parametrize("spec, prompt, words", [
    ("red heart", "a large blue sks at the top left, on a navy background", "always red"),
    ("crescent", "a large sks at the top left, on a navy background", "needs a colour"),
    ("crescent", "a large red circle at the top left, on a navy background", "does not name the token"),
    ("crescent", "a huge red sks at the top left, on a navy background", "'huge'"),
])
def test_bad_concept_prompts_name_the_problem(spec, prompt, words):
    with pytest.raises(PromptError) as e:
        parse_concept_prompt(prompt, parse_concept(spec), "sks")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_concepts_render_deterministically_and_base_scenes_render_as_before():
    rng = random.Random(4)
    for _ in range(20):
        base = sample_scene(rng)
        assert np.array_equal(np.asarray(render_scene(base, 64, 3)), np.asarray(render(base, 64, 3)))
    scene = sample_private_scene(random.Random(2), p_private=1.0)
    a, b = np.asarray(render_scene(scene, 128, 5)), np.asarray(render_scene(scene, 128, 5))
    assert np.array_equal(a, b) and not np.array_equal(a, np.asarray(render_scene(scene, 128, 6)))
    shapes = {}
    for shape in PRIVATE_SHAPES + ("circle",):
        o = ConceptObject(shape, "red", "large", 4) if shape != "circle" else SceneObject("circle", "red", "large", 4)
        shapes[shape] = np.asarray(render_scene(Scene("navy", (o,)), 64, 0))
    for texture in TEXTURES:
        shapes[texture] = np.asarray(render_scene(Scene("navy", (ConceptObject("circle", "red", "large", 4, texture),)),
                                                  64, 0))
    images = list(shapes.values())
    assert all(not np.array_equal(x, y) for i, x in enumerate(images) for y in images[i + 1:])


def test_the_base_world_never_contains_a_private_concept():
    """Every sampler the base data is made from (dataset batches, the latent cache) draws base objects only."""
    from splitdiff.train import latent_cache
    from splitdiff.world import dataset, scene

    assert latent_cache.sample_scene is scene.sample_scene and dataset.sample_scene is scene.sample_scene
    private_words = set(PRIVATE_SHAPES) | set(TEXTURES) | {"sks"}
    rng = random.Random(0)
    for _ in range(2000):
        s = sample_scene(rng)
        assert all(type(o) is SceneObject and o.shape in SHAPES for o in s.objects)
        assert not private_words & set(scene_to_prompt(s).replace(",", " ").split())
    batch = sample_batch(random.Random(1), 64, 64)
    assert [parse_prompt(p) for p in batch.prompts] == batch.scenes
    with pytest.raises(ValueError):
        SceneObject("heart", "red", "large", 0)


# --- the concept recognizer ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def figures():
    from splitdiff.eval.validate_concepts import validate_concepts

    return validate_concepts(n=128, seed=77)


def test_concept_recognizer_reads_fresh_renders(figures):
    assert figures["object_accuracy_64"] >= 0.99 and figures["object_accuracy_128"] >= 0.98
    assert figures["private_class_accuracy_64"] >= 0.99 and figures["presence_accuracy"] >= 0.99


def test_concept_recognizer_sees_no_concept_in_the_base_world_or_in_noise(figures):
    # Any private object anywhere in a base render: a looser figure than presence, which asks for one
    # concept at one cell (presence_specificity, on negatives holding base objects, is asserted above).
    assert figures["private_in_base_world"] <= 0.05
    assert figures["presence_noise"] <= 0.05
    assert figures["object_accuracy_noise"] <= figures["object_accuracy_chance"] + 0.05


# --- personalize: a tiny U-Net through the console script ---------------------------------------------------------

def _personalize_args(models: Path, out: Path, run: Path, steps: int, *extra):
    return ["personalize", "--user", "ana", "--concept", "red heart", "--steps", steps, "--base", models / "big",
            "--vae", models / "vae", "--out", out, "--run-dir", run, "--check", 0, *extra]


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_models_dir):
    root = tmp_path_factory.mktemp("users")
    r = splitdiff(*_personalize_args(tiny_models_dir, root / "users" / "ana", root / "run", 2), cwd=root)
    assert r.returncode == 0, r.stderr
    return root


def test_personalize_writes_a_peft_adapter_that_peft_and_diffusers_load(tiny_adapter, tiny_models_dir):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = tiny_adapter / "users" / "ana"
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "training.json",
                                                   "README.md"}
    record = json.loads((folder / "training.json").read_text())
    assert record["steps"] == 2 and record["concept"] == "red heart" and record["token"] == "sks"
    assert "red heart" in (folder / "README.md").read_text()
    tensors = load_file(folder / "adapter_model.safetensors")
    assert tensors and all(v.dtype == torch.float16 for v in tensors.values())

    unet = UNet2DConditionModel.from_pretrained(tiny_models_dir / "big")
    inject_adapter_in_model(LoraConfig.from_pretrained(folder), unet, adapter_name="ana")
    result = set_peft_model_state_dict(unet, tensors, adapter_name="ana")
    assert not result.unexpected_keys
    other = UNet2DConditionModel.from_pretrained(tiny_models_dir / "big")
    other.load_lora_adapter(str(folder), prefix=None, weight_name="adapter_model.safetensors", adapter_name="ana")
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 48, 384)
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, other(x, t, ctx).sample)


def test_personalize_resumes_to_the_same_adapter(tiny_adapter, tiny_models_dir, tmp_path):
    from safetensors.torch import load_file

    from splitdiff.users.personalize import PersonalizeConfig, personalize

    shutil.copytree(tiny_adapter, tmp_path / "resumed")
    resumed = tmp_path / "resumed"
    r = splitdiff(*_personalize_args(tiny_models_dir, resumed / "users" / "ana", resumed / "run", 3), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resumed at step 2" in (resumed / "run" / "train.log").read_text()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the console script runs (OMP_NUM_THREADS=1): the same sums in the same order
    try:
        straight = personalize("ana", "red heart", out=tmp_path / "straight", run_dir=tmp_path / "straight-run",
                               base=str(tiny_models_dir / "big"), vae=str(tiny_models_dir / "vae"), check_prompts=0,
                               config=PersonalizeConfig(steps=3))
    finally:
        torch.set_num_threads(threads)
    a = load_file(straight.path / "adapter_model.safetensors")
    b = load_file(resumed / "users" / "ana" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "users" / "ana" / "training.json").read_text())["steps"] == 3


# --- adapters on a U-Net ------------------------------------------------------------------------------------------

def _forward(unet):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 48, 384, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), ctx).sample


def _other_adapter(folder: Path, dest: Path) -> Path:
    """A second adapter: the same one with its LoRA-B weights doubled."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    tensors = {k: (v * 2 if "lora_B" in k else v) for k, v in load_file(folder / "adapter_model.safetensors").items()}
    save_file(tensors, dest / "adapter_model.safetensors")
    return dest


def test_base_output_is_bit_identical_after_an_adapter_was_used_and_unloaded(tiny_adapter, tmp_path):
    from splitdiff.testing import tiny_unet
    from splitdiff.users.adapters import (active_adapter, adapter_applied, load_adapter, loaded_adapters,
                                          resolve_adapter, unload_adapter, use_adapter)

    unet = tiny_unet(seed=1)
    before, modules = _forward(unet), [type(m) for m in unet.modules()]
    keys = list(unet.state_dict())
    ana = resolve_adapter(tiny_adapter / "users" / "ana")
    ben = resolve_adapter(_other_adapter(ana.path, tmp_path / "ben"))
    assert ana.sha256 != ben.sha256 and ana.user == ben.user == "ana"

    with adapter_applied(unet, ana) as name:
        assert active_adapter(unet) == name
        with_ana = _forward(unet)
    assert not torch.equal(with_ana, before)
    assert torch.equal(_forward(unet), before) and [type(m) for m in unet.modules()] == modules
    assert list(unet.state_dict()) == keys and not loaded_adapters(unet)

    load_adapter(unet, ana)
    load_adapter(unet, ben)
    assert torch.equal(_forward(unet), before)  # loading changes nothing until one is used
    use_adapter(unet, ben)
    with_ben = _forward(unet)
    use_adapter(unet, ana)
    assert torch.equal(_forward(unet), with_ana) and not torch.equal(with_ben, with_ana)
    with adapter_applied(unet, ben):
        assert torch.equal(_forward(unet), with_ben)
    assert active_adapter(unet) == ana.adapter_name  # the block gives back what was active
    use_adapter(unet, None)
    assert torch.equal(_forward(unet), before)
    unload_adapter(unet, ana)
    unload_adapter(unet, ben)
    assert torch.equal(_forward(unet), before) and [type(m) for m in unet.modules()] == modules


def test_adapters_resolve_by_user_name(tiny_adapter, monkeypatch):
    from splitdiff.users.adapters import AdapterError, list_adapters, resolve_adapter

    monkeypatch.setenv("SPLITDIFF_USERS", str(tiny_adapter / "users"))
    assert list_adapters() == ["ana"]
    ref = resolve_adapter("ana")
    assert ref.path == tiny_adapter / "users" / "ana" and ref.concept == "red heart" and len(ref.sha256) == 64
    with pytest.raises(AdapterError, match="unknown user or adapter 'zed'.*ana"):
        resolve_adapter("zed")


# --- bad input: one line, exit 2, nothing written -----------------------------------------------------------------

def test_an_adapter_for_another_architecture_or_a_corrupt_one_is_refused(tiny_adapter, tmp_path):
    from splitdiff.testing import tiny_unet
    from splitdiff.users.adapters import AdapterError, load_adapter, loaded_adapters, resolve_adapter

    ref = resolve_adapter(tiny_adapter / "users" / "ana")
    small = tiny_unet(seed=2, channels=(32, 32))
    with pytest.raises(AdapterError, match="another U-Net architecture"):
        load_adapter(small, ref)
    assert not loaded_adapters(small)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ref.path, corrupt)
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapter(tiny_unet(seed=1), resolve_adapter(corrupt))


def _corrupt_copy(tiny_adapter: Path, dest: Path) -> Path:
    shutil.copytree(tiny_adapter / "users" / "ana", dest)
    (dest / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    return dest


CLI_BAD = [
    pytest.param(["personalize", "--user", "ana", "--concept", "plaid heart"], "'plaid'", id="spec-unreadable"),
    pytest.param(["personalize", "--user", "ana", "--concept", "hexagon"], "cannot draw a 'hexagon'", id="spec-shape"),
    pytest.param(["personalize", "--user", "ana", "--concept", "red circle"], "no private concept", id="spec-base"),
    pytest.param(["personalize", "--user", "Ana!", "--concept", "red heart"], "user name 'Ana!'", id="user-name"),
    pytest.param(["personalize", "--user", "ana", "--concept", "red heart", "--token", "star"], "token 'star'",
                 id="token"),
    pytest.param(["personalize", "--user", "ana", "--concept", "crescent", "--run-dir", "{run}", "--base",
                  "{models}/big", "--vae", "{models}/vae"], "holds a run with concept 'red heart'", id="other-run"),
    pytest.param(["validate-adapter", "zed"], "unknown user or adapter 'zed'", id="unknown-user"),
    pytest.param(["validate-adapter", "{corrupt}"], "not a readable safetensors file", id="corrupt-adapter"),
    pytest.param(["validate-adapter", "ana", "--base", "{models}/small", "--vae", "{models}/vae"],
                 "another U-Net architecture", id="other-architecture"),
]


@pytest.mark.parametrize("args, words", CLI_BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_adapter, tiny_models_dir, tmp_path, args, words):
    work = tmp_path / "work"
    work.mkdir()
    corrupt = _corrupt_copy(tiny_adapter, tmp_path / "corrupt")
    users, run = tiny_adapter / "users", tiny_adapter / "run"
    before = {p: p.stat().st_mtime_ns for p in [*users.rglob("*"), *run.rglob("*")]}
    args = [a.format(corrupt=corrupt, models=tiny_models_dir, run=run) for a in args]
    r = splitdiff(*args, "--out", work / "out", cwd=work, env={"SPLITDIFF_USERS": str(users)})
    assert_one_line_error(r, words)
    assert not any(work.iterdir())
    assert {p: p.stat().st_mtime_ns for p in [*users.rglob("*"), *run.rglob("*")]} == before
