"""Mistakes through the installed `splitdiff` script: one line on stderr, exit 2, no traceback, nothing written.

And what a script can learn from a finished run: PNG text chunks and `--strict`'s exit code 3.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(sys.executable).with_name("splitdiff")  # the console script, as users run it


def splitdiff(*args, cwd):
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


def assert_one_line_usage_error(r, words):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("splitdiff: error: "), r.stderr
    assert words in lines[0]


BAD = [
    pytest.param(["generate", "p", "--steps", "0"], "'--steps'", id="steps-0"),
    pytest.param(["generate", "p", "--size", "8"], "'--size'", id="size-8"),
    pytest.param(["generate", "p", "--bogus"], "No such option: --bogus", id="unknown-option"),
    pytest.param(["generate"], "Missing argument 'prompt'", id="missing-prompt"),
    pytest.param(["train", "vae", "--steps", "0"], "see 'splitdiff train vae --help'", id="train-vae-steps-0"),
    pytest.param(["bench", "hybrid", "--bogus"], "No such option: --bogus", id="bench-unknown-option"),
    pytest.param(["parallel", "p", "--timeout", "inf"], "inf is not a finite number", id="parallel-timeout-inf"),
    pytest.param(["generate", "p", "--seed", str(2 ** 70)], "'--seed'", id="seed-2**70"),
    pytest.param(["generate", "p", "--steps", "1000", "--scheduler", "ddim"], "less than or equal to 500",
                 id="steps-1000"),
    pytest.param(["generate", "p", "--guidance", "inf"], "inf is not a finite number", id="guidance-inf"),
    pytest.param(["generate", "p", "--guidance", "nan"], "nan is not a finite number", id="guidance-nan"),
    pytest.param(["generate", "p", "--guidance", "-5"], "not in the range 0..100", id="guidance-negative"),
    pytest.param(["generate", "p", "--out", "afile/x.png"], "afile is not a directory", id="out-under-a-file"),
    pytest.param(["generate", "p", "--save-state", "afile/deeper/s.safetensors"], "afile is not a directory",
                 id="save-state-under-a-file"),
    pytest.param(["parallel", "p", "--tiny", "--out", "afile/p.png"], "afile is not a directory",
                 id="parallel-out-under-a-file"),
    pytest.param(["resume", "s.safetensors", "--plan", "edge:5", "--decoder", "weird"],
                 "--decoder must be full or tiny", id="resume-decoder"),
    pytest.param(["generate", "p", "--device", "tpu"], "unknown device 'tpu'", id="device-tpu"),
    pytest.param(["generate", "p", "--dtype", "fp8"], "unknown dtype 'fp8'", id="dtype-fp8"),
    pytest.param(["serve", "--dtype", "int8"], "unknown dtype 'int8'", id="serve-dtype"),
    pytest.param(["generate", "p", "--height", "8"], "'--height'", id="height-8"),
    pytest.param(["generate", "p", "--scheduler", "pndm"], "unknown scheduler 'pndm'", id="scheduler-pndm"),
    pytest.param(["generate", "p", "--cloud-url", "http://127.0.0.1:9", "--height", "32", "--width", "64"],
                 "--cloud-url serves square images", id="cloud-non-square"),
    pytest.param(["train", "unet", "--role", "huge"], "unknown U-Net role 'huge'", id="train-unet-role"),
]


@pytest.mark.parametrize("args, words", BAD)
def test_usage_mistake_is_one_line_exit_2_and_writes_nothing(tmp_path, args, words):
    (tmp_path / "afile").write_bytes(b"")
    before = files_under(tmp_path)
    r = splitdiff(*args, cwd=tmp_path)
    assert_one_line_usage_error(r, words)
    assert files_under(tmp_path) == before


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc, where nothing can be created")
def test_out_whose_folder_cannot_be_created_is_refused_before_work(tmp_path):
    r = splitdiff("generate", "p", "--out", "/proc/no-such-folder/x.png", cwd=tmp_path)
    assert_one_line_usage_error(r, "cannot create files in /proc")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_refused_before_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    r = splitdiff("generate", "p", "--out", locked / "x.png", cwd=tmp_path)
    assert_one_line_usage_error(r, "cannot create files in")
    assert not list(locked.iterdir())


def test_bare_command_prints_help_without_a_traceback(tmp_path):
    r = splitdiff(cwd=tmp_path)
    assert r.returncode == 2 and "Usage" in r.stdout and "generate" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr and not r.stderr.strip()


def test_help_exits_0(tmp_path):
    r = splitdiff("generate", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--strict" in r.stdout and not r.stderr.strip()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_degraded_image_is_marked_and_strict_exits_3(tmp_path, tiny_models_dir):
    d, out = tiny_models_dir, tmp_path / "img.png"
    r = splitdiff("generate", "a red circle", "--plan", "cloud:3,edge:5", "--steps", 8, "--out", out,
                  "--model", f"edge={d / 'small'}", "--vae", d / "vae", "--cloud-url",
                  f"http://127.0.0.1:{closed_port()}", "--timeout", 2, "--strict", cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "degraded" in r.stderr and "Traceback" not in r.stderr
    text = Image.open(out).text
    assert text["splitdiff.degraded"] == "true"
    made = json.loads(text["splitdiff.provenance"])
    assert made["degraded"] is True and made["steps"] == 8 and made["prompt"] == "a red circle"
    assert [(s["model"], s["start"], s["end"]) for s in made["segments"]] == [("edge", 0, 8)]
