"""The command line as a user runs it: real processes, real files, one-line errors."""

import json
import subprocess
import sys

import pytest
from PIL import Image


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "splitdiff", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def models(tiny_models_dir):
    d = tiny_models_dir
    return ["--model", f"cloud={d / 'big'}", "--model", f"edge={d / 'small'}", "--vae", str(d / "vae")]


PROMPT = "a large red circle at the top left and a small blue star at the bottom right, on a navy background"


def test_generate_two_model_plan_prints_cost_table(tmp_path, models):
    out = tmp_path / "img.png"
    r = run("generate", PROMPT, "--plan", "cloud:3,edge:5", "--steps", 8, "--out", out, *models)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (64, 64)
    for word in ("cloud", "edge", "decode", "share"):
        assert word in r.stdout
    text = Image.open(out).text  # how it was made travels with the file
    assert text["splitdiff.degraded"] == "false"
    segments = json.loads(text["splitdiff.provenance"])["segments"]
    assert [(s["model"], s["start"], s["end"]) for s in segments] == [("cloud", 0, 3), ("edge", 3, 8)]


def test_save_state_then_resume_equals_one_run(tmp_path, models):
    one, two, state = tmp_path / "one.png", tmp_path / "two.png", tmp_path / "s.safetensors"
    assert run("generate", PROMPT, "--plan", "cloud:3,edge:5", "--steps", 8, "--out", one, *models).returncode == 0
    r = run("generate", PROMPT, "--plan", "cloud:3,edge:5", "--steps", 8, "--save-state", state, *models)
    assert r.returncode == 0 and state.exists(), r.stderr
    r = run("resume", state, "--plan", "edge:5", "--out", two, *models)
    assert r.returncode == 0, r.stderr
    assert Image.open(one).tobytes() == Image.open(two).tobytes()


@pytest.mark.parametrize("args, words", [
    (["--plan", "cloud:3,nosuch:5"], "unknown model 'nosuch'"),
    (["--plan", "cloud:3,edge:4"], "runs 7 steps"),
    (["--plan", "cloud:3,edge:5", "--scheduler", "plms"], "unknown scheduler"),
    (["--plan", "cloud:3,edge:5", "--model", "edge=/no/such/folder"], "not a diffusers folder"),
    (["--plan", "cloud:3,edge:5", "--out", "x.txt"], "must end in"),
])
def test_bad_generate_input_is_one_line_and_writes_nothing(tmp_path, models, args, words):
    r = run("generate", PROMPT, "--steps", 8, *models, *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".png", ".txt", ".safetensors")]


def test_mismatched_models_are_refused(tmp_path, tiny_models_dir):
    from splitdiff.testing import tiny_unet

    odd = tmp_path / "odd"
    tiny_unet(cross_attention_dim=32).save_pretrained(odd)
    r = run("generate", PROMPT, "--plan", "cloud:3,edge:5", "--steps", 8, "--model", f"cloud={odd}",
            "--model", f"edge={tiny_models_dir / 'small'}", "--vae", tiny_models_dir / "vae", cwd=tmp_path)
    assert r.returncode == 2 and "cross-attends to width 32" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, None])
def test_bad_state_files_are_refused(tmp_path, models, content):
    state = tmp_path / "s.safetensors"
    if content is not None:
        state.write_bytes(content)
    r = run("resume", state, "--plan", "edge:5", "--out", tmp_path / "o.png", *models)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("args, words", [
    (["train", "unet", "--device", "tpu"], "unknown device 'tpu'"),
    (["compress", "--device", "mps"], "unknown device 'mps'"),
    (["bench", "hybrid", "--device", "gpu0"], "unknown device 'gpu0'"),
])
def test_bad_training_device_is_one_line_before_any_work(tmp_path, args, words):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_without_one_is_one_line(tmp_path):
    r = run("train", "unet", "--device", "cuda", cwd=tmp_path)
    assert r.returncode == 2 and "sees no GPU" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


def test_non_square_in_bf16_then_resumed_in_fp32(tmp_path, models):
    state, out = tmp_path / "s.safetensors", tmp_path / "wide.png"
    r = run("generate", PROMPT, "--plan", "cloud:3,edge:5", "--steps", 8, "--height", 32, "--width", 64,
            "--dtype", "bf16", "--device", "cpu", "--save-state", state, *models)
    assert r.returncode == 0, r.stderr
    r = run("resume", state, "--plan", "edge:5", "--out", out, "--dtype", "fp32", *models)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (64, 32)
