"""`splitdiff train family`: the whole training chain as one resumable command."""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from splitdiff.cli import app
from splitdiff.core.registry import WEIGHTS_DIR
from splitdiff.errors import UserError
from splitdiff.train import family
from splitdiff.train.family import MAX_WEIGHTS_BYTES, SCALES, STAGES, plan_family, train_family

MODELS = ("vae", "cloud", "edge", "tiny-decoder")


def _splitdiff(*args, cwd):
    """The console script; one BLAS/OpenMP thread, as busy-waiting threads slow tiny models badly on a shared CPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "splitdiff", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def _planned_params(output: str, stage: str) -> int:
    match = re.search(rf"^\d\. {stage} .*params ([\d,]+)", output, re.M)
    assert match, output
    return int(match.group(1).replace(",", ""))


def _file_params(path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _shipped_files():
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in WEIGHTS_DIR.rglob("*") if p.is_file()}


def test_dry_run_prints_stages_and_parameter_counts_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    counts = {}
    for scale in SCALES:
        result = CliRunner().invoke(app, ["train", "family", "--scale", scale, "--out", str(tmp_path / "fam"),
                                          "--dry-run"])
        assert result.exit_code == 0, result.output
        assert "nothing is written" in result.output and "warning" not in result.output
        for stage in STAGES:
            assert re.search(rf"^\d\. {stage} +run ", result.output, re.M) or stage == "evaluator", result.output
        counts[scale] = {stage: _planned_params(result.output, stage) for stage in MODELS}
    assert list(tmp_path.iterdir()) == []
    for stage in MODELS:  # current: the shipped models' sizes
        assert counts["current"][stage] == _file_params(WEIGHTS_DIR / stage / "diffusion_pytorch_model.safetensors")
    large = counts["large"]
    assert 25_000_000 <= large["cloud"] <= 40_000_000
    assert large["edge"] <= 0.25 * large["cloud"]
    assert large["vae"] == counts["current"]["vae"] and SCALES["large"].reuse == ("vae", "tiny-decoder")
    assert all(2 * n <= MAX_WEIGHTS_BYTES for scale in counts.values() for n in scale.values())


def test_a_bad_scale_is_one_line_and_exit_2(tmp_path):
    result = _splitdiff("train", "family", "--scale", "huge", "--out", tmp_path / "fam", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["splitdiff: error: unknown scale 'huge'; choose one of tiny, "
                                                  "current, large"]
    assert list(tmp_path.iterdir()) == []


def test_a_folder_keeps_its_scale(tmp_path):
    (tmp_path / "family.json").write_text(json.dumps({"scale": "tiny"}))
    with pytest.raises(UserError, match="tiny-scale"):
        plan_family("large", tmp_path)


def test_the_evaluator_is_trained_only_when_there_is_none(tmp_path, monkeypatch):
    rows, _ = plan_family("tiny", tmp_path / "fam")
    assert rows[0].status == "skip" and rows[0].output == family.SHIPPED_EVALUATOR
    monkeypatch.setattr(family, "SHIPPED_EVALUATOR", tmp_path / "missing.safetensors")
    rows, _ = plan_family("tiny", tmp_path / "fam")
    assert rows[0].status == "run" and rows[0].output == tmp_path / "fam" / "weights" / "evaluator.safetensors"
    fam = family._Family(SCALES["tiny"], tmp_path / "fam", "cpu", print)
    assert fam.run_stage("evaluator", "new", None) == ("ran", "8/8")
    assert fam.state("evaluator") == "done" and fam.evaluator_path() == rows[0].output


def test_tiny_family_runs_end_to_end_then_skips_every_stage(tmp_path):
    """The whole chain through the console script (about a minute on two cores), then a run with nothing to do."""
    out = tmp_path / "family"
    shipped = _shipped_files()
    first = _splitdiff("train", "family", "--scale", "tiny", "--out", out, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    summary = json.loads((out / "family.json").read_text())
    assert summary["complete"] and summary["scale"] == "tiny"
    assert {s["stage"]: s["status"] for s in summary["stages"]} == {
        "evaluator": "skipped", **{stage: "ran" for stage in STAGES[1:]}}
    assert "[2/7] vae" in first.stdout and "family complete" in first.stdout
    tiny = SCALES["tiny"]
    for stage, run in zip(MODELS, (tiny.vae, tiny.cloud, tiny.edge, tiny.tiny_decoder)):
        folder = out / "weights" / stage
        assert json.loads((folder / "training.json").read_text())["steps"] == run.steps
        weights = folder / "diffusion_pytorch_model.safetensors"
        assert weights.stat().st_size <= MAX_WEIGHTS_BYTES
        with safe_open(str(weights), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert (out / "runs" / stage / "checkpoint.safetensors").exists()
    assert (out / "latent-cache" / "cache64.safetensors").exists()
    assert (out / "bench" / "hybrid" / "hybrid.csv").exists()
    assert _shipped_files() == shipped

    second = _splitdiff("train", "family", "--scale", "tiny", "--out", out, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    statuses = [s["status"] for s in json.loads((out / "family.json").read_text())["stages"]]
    assert statuses == ["skipped"] * len(STAGES)
    assert "[2/7]" not in second.stdout

    # A lost export resumes from its checkpoint; the same weights leave the stages after it alone.
    shutil.rmtree(out / "weights" / "tiny-decoder")
    rows = {r.stage: r.status for r in train_family("tiny", out, device="cpu", echo=lambda _: None)}
    assert rows["tiny-decoder"] == "resumed" and rows["bench-hybrid"] == "skipped"

    # A changed VAE makes everything made from it stale.
    weights = out / "weights" / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    rows, _ = plan_family("tiny", out)
    assert [r.status for r in rows] == ["skip", "skip"] + ["restart"] * 5


def test_the_time_limit_stops_the_chain_at_a_checkpoint_and_the_next_run_resumes(tmp_path, monkeypatch):
    tiny = SCALES["tiny"]
    monkeypatch.setitem(SCALES, "tiny", dataclasses.replace(tiny, vae=dataclasses.replace(tiny.vae, steps=10**6)))
    monkeypatch.setattr(family, "MIN_STAGE_MINUTES", 0.0)
    rows = train_family("tiny", tmp_path, device="cpu", max_minutes=0.05, echo=lambda _: None)
    assert [r.status for r in rows] == ["skipped", "stopped"] + ["not reached"] * 5
    assert not json.loads((tmp_path / "family.json").read_text())["complete"]
    assert (tmp_path / "runs" / "vae" / "checkpoint.safetensors").exists()
    assert [r.status for r in plan_family("tiny", tmp_path)[0]][:3] == ["skip", "resume", "run"]


def test_steps_and_until_choose_how_much_of_the_chain_runs(tmp_path):
    assert family.parse_steps("cloud=6000, edge=30") == {"cloud": 6000, "edge": 30}
    assert family.get_scale("large", {"cloud": 6000}).cloud.steps == 6000
    for bad, why in (("unet=5", "unknown stage 'unet'"), ("cloud=0", "at least 1"), ("cloud=x", "whole number")):
        with pytest.raises(UserError, match=why):
            family.parse_steps(bad)
    with pytest.raises(UserError, match="--until: unknown stage 'sky'"):
        train_family("tiny", tmp_path, device="cpu", until="sky")
    rows = train_family("tiny", tmp_path, device="cpu", echo=lambda _: None, steps={"vae": 3}, until="latent-cache")
    assert [r.status for r in rows] == ["skipped", "ran", "ran"] + ["not asked"] * 4
    assert json.loads((tmp_path / "weights" / "vae" / "training.json").read_text())["steps"] == 3
    assert family.is_complete(rows) and not (tmp_path / "weights" / "cloud").exists()


def test_a_reused_stage_is_the_shipped_model_copied_and_feeds_the_stages_after_it(tmp_path, monkeypatch):
    tiny = SCALES["tiny"]
    shipped_vae = tuple(json.loads((WEIGHTS_DIR / "vae" / "config.json").read_text())["block_out_channels"])
    monkeypatch.setitem(SCALES, "tiny", dataclasses.replace(tiny, vae_channels=shipped_vae, reuse=("vae",)))
    rows = train_family("tiny", tmp_path, device="cpu", echo=lambda _: None, until="latent-cache")
    assert [r.status for r in rows][:3] == ["skipped", "ran", "ran"]
    copied = tmp_path / "weights" / "vae" / "diffusion_pytorch_model.safetensors"
    assert copied.read_bytes() == (WEIGHTS_DIR / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert json.loads((tmp_path / "weights" / "vae" / "training.json").read_text())["copied_from"] == "shipped"
    assert [r.status for r in plan_family("tiny", tmp_path)[0]][:4] == ["skip", "skip", "skip", "run"]
