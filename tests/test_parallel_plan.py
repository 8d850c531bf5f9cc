"""Step plans whose segments run patch-parallel: `generate --parallel`, on gloo with 2 local ranks.

The CLI runs in this process through `main()` (real exit codes, real files), so the
two forked ranks are the only processes beside pytest; tiny random models throughout.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from splitdiff.cli import main
from splitdiff.core.plan import parse_plan
from splitdiff.core.runner import advance
from splitdiff.core.trajectory import Trajectory
from splitdiff.hybrid.pipeline import load_pipeline
from splitdiff.parallel import advance_parallel

PROMPT = "a large red circle at the top left and a small blue star at the bottom right, on a navy background"


@pytest.fixture(scope="module")
def models(tiny_models_dir):
    d = tiny_models_dir
    return ["--model", f"cloud={d / 'big'}", "--model", f"edge={d / 'small'}", "--vae", str(d / "vae")]


@pytest.fixture
def generate(monkeypatch, capfd, models):
    """Run `splitdiff generate PROMPT *args` here: (exit code, stdout, stderr)."""

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["splitdiff", "generate", PROMPT, *map(str, args), *models])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capfd.readouterr()
        return code, out, err

    return run


def test_a_parallel_segment_continues_the_trajectory_exactly(tiny_models_dir):
    d = tiny_models_dir
    pipe = load_pipeline({"cloud": str(d / "big"), "edge": str(d / "small")}, str(d / "vae"))
    here = pipe.start(PROMPT, steps=6, size=64)  # DPM-Solver++: its multistep history must survive the trip
    there = Trajectory.from_bytes(advance_parallel(str(d / "big"), here.to_bytes(), 3, "cloud", "sync", 2))
    advance(pipe.unets["cloud"], [here], 3, "cloud")
    assert (there.step_index, [(s.model, s.where) for s in there.provenance]) == (3, [("cloud", "sync x2")])
    assert (there.latents - here.latents).abs().max() <= 1e-4
    for traj in (here, there):
        pipe.run(traj, parse_plan("edge:3"))
    assert (there.latents - here.latents).abs().max() <= 1e-4


def test_sync_gives_the_plain_image(tmp_path, generate):
    plain, patched = tmp_path / "plain.png", tmp_path / "sync.png"
    code, _, err = generate("--plan", "cloud:3,edge:3", "--steps", 6, "--out", plain)
    assert code == 0, err
    code, out, err = generate("--plan", "cloud:3,edge:3", "--steps", 6, "--out", patched,
                              "--parallel", "sync", "--ranks", 2)  # fmt: skip
    assert code == 0, err
    assert "sync x2" in out and "local" in out  # the cost table: cloud on the ranks, edge here
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (plain, patched))
    assert np.abs(a - b).max() <= 2


def test_saved_state_after_a_parallel_segment_matches(tmp_path, generate):
    plain, patched = tmp_path / "plain.safetensors", tmp_path / "sync.safetensors"
    assert generate("--plan", "cloud:3,edge:3", "--steps", 6, "--save-state", plain)[0] == 0
    code, _, err = generate("--plan", "cloud:3,edge:3", "--steps", 6, "--save-state", patched, "--parallel", "sync")
    assert code == 0, err
    a, b = (Trajectory.from_bytes(p.read_bytes()) for p in (plain, patched))
    assert b.step_index == 3 and b.provenance[0].where == "sync x2"
    assert (a.latents - b.latents).abs().max() <= 1e-4


def test_pcpp_past_warm_up_writes_an_image(tmp_path, generate):
    out = tmp_path / "pcpp.png"
    code, stdout, err = generate("--plan", "cloud:6,edge:2", "--steps", 8, "--out", out, "--parallel", "pcpp",
                                 "--ranks", 2, "--parallel-models", "cloud")  # fmt: skip
    assert code == 0, err
    assert Image.open(out).size == (64, 64)
    assert "pcpp x2" in stdout


@pytest.mark.parametrize("args, words", [
    (["--parallel", "sync", "--ranks", 0], "at least 1, not 0"),
    (["--parallel", "ring"], "unknown parallel mode 'ring'"),
    (["--parallel", "sync", "--ranks", 3, "--size", 16], "3 patches need one row each"),
    (["--ranks", 2], "go with --parallel"),
    (["--parallel", "sync", "--parallel-models", "nosuch"], "nosuch, not a model of the plan"),
])  # fmt: skip
def test_bad_parallel_input_is_one_line_and_writes_nothing(tmp_path, generate, args, words):
    code, _, err = generate("--plan", "cloud:3,edge:3", "--steps", 6, "--out", tmp_path / "x.png", *args)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("splitdiff: error:") and words in last, err
    assert "Traceback" not in err and err.count("error") == 1
    assert not list(tmp_path.iterdir())


def test_failing_ranks_are_tried_again_then_the_segment_runs_here_degraded(tmp_path, generate, monkeypatch):
    """The plan's one failure policy, as for a cloud that does not answer: retry, then here, marked."""
    import os

    from splitdiff.parallel import pool

    def dies(*_, **__):
        os._exit(3)

    monkeypatch.setattr(pool, "advance", dies)
    plain, out = tmp_path / "plain.png", tmp_path / "x.png"
    assert generate("--plan", "cloud:3,edge:3", "--steps", 6, "--out", plain)[0] == 0
    code, _, err = generate("--plan", "cloud:3,edge:3", "--steps", 6, "--out", out, "--parallel", "sync")
    assert code == 0, err
    assert err.count("patch-parallel ranks failed: ranks 0, 1 exited with code 3") == 2, err
    assert "trying again" in err and "running 'cloud''s 3 steps here" in err and "degraded result" in err
    assert "Traceback" not in err
    assert Image.open(out).text["splitdiff.degraded"] == "true"
    assert Image.open(out).tobytes() == Image.open(plain).tobytes()  # the same steps, run here
    code, _, err = generate("--plan", "cloud:3,edge:3", "--steps", 6, "--out", tmp_path / "y.png", "--parallel",
                            "sync", "--strict")
    assert code == 3 and (tmp_path / "y.png").exists()


def test_one_pool_serves_every_segment_of_its_model(tiny_models_dir):
    """cloud:2,edge:2,cloud:2 with the cloud on ranks: one pool, started once, runs both cloud segments."""
    from splitdiff.parallel.plan import PatchPlan

    d = tiny_models_dir
    pipe = load_pipeline({"cloud": str(d / "big"), "edge": str(d / "small")}, str(d / "vae"))
    plan = parse_plan("cloud:2,edge:2,cloud:2")
    traj, plain = pipe.start(PROMPT, steps=6, size=64), pipe.start(PROMPT, steps=6, size=64)
    with PatchPlan.parse("sync", 2, None, plan).install(pipe, traj) as run:
        pipe.run(traj, plan)
        pool = run.executors["cloud"].pool
        assert pool.alive and pool.segments == 2
    assert not pool.alive and not traj.degraded
    assert "cloud" not in pipe.executors
    pipe.run(plain, plan)
    assert [s.where for s in traj.provenance] == ["sync x2", "local", "sync x2"]
    assert (traj.latents - plain.latents).abs().max() <= 1e-4
