"""Users' adapters in step plans: `cloud:3,edge@ana:5`, in process, resumed, and over HTTP.

The adapter here is a random LoRA on the tiny test edge U-Net (non-zero B, so it
changes what the U-Net computes), written in the peft layout the users axis ships.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from splitdiff.core.plan import PlanSegment, format_plan, parse_plan
from splitdiff.core.trajectory import Trajectory
from splitdiff.errors import UserError
from splitdiff.hybrid.pipeline import load_pipeline
from splitdiff.serve.client import CloudClient
from splitdiff.serve.edge import run_with_cloud
from splitdiff.serve.server import Limits, ThreadedServer, build_app
from splitdiff.users.plans import AdapterSet

PROMPT = "a large sks at the top left, on a navy background"


@pytest.fixture(scope="module")
def users(tiny_models_dir, tmp_path_factory):
    """A users folder holding ana's adapter for the tiny edge U-Net."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from splitdiff.users.adapters import architecture_hash
    from splitdiff.users.personalize import export_adapter

    root = tmp_path_factory.mktemp("users")
    unet = UNet2DConditionModel.from_pretrained(tiny_models_dir / "small")
    arch = architecture_hash(unet)
    torch.manual_seed(3)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="ana")
    record = {"user": "ana", "concept": "red heart", "token": "sks", "steps": 0, "total_steps": 0, "base": "tiny",
              "base_architecture": arch, "base_weights": "0" * 64, "rank": 4, "parameters": 0, "n_concept": 0,
              "n_prior": 0, "batch_size": 0, "lr": 0.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    export_adapter(unet, "ana", root / "ana", record)
    return root


@pytest.fixture(scope="module")
def pipe(tiny_models_dir, users):
    p = load_pipeline({"cloud": str(tiny_models_dir / "big"), "edge": str(tiny_models_dir / "small")},
                      str(tiny_models_dir / "vae"))
    p.adapters = AdapterSet(users)
    return p


def run(pipe, plan, steps=8, seed=5):
    traj = pipe.start(PROMPT, steps=steps, seed=seed, size=32)
    pipe.run(traj, parse_plan(plan))
    return traj


def test_plans_name_adapters_per_segment():
    plan = parse_plan("cloud:15, edge@ana:10")
    assert plan == (PlanSegment("cloud", 15), PlanSegment("edge", 10, "ana"))
    assert format_plan(plan) == "cloud:15,edge@ana:10"
    for bad in ("edge@:10", "edge@Ana:10", "edge@ana@bob:10", "edge@a b:10"):
        with pytest.raises(UserError, match="MODEL@USER:STEPS"):
            parse_plan(bad)


def test_an_adapter_segment_changes_the_image_records_its_hash_and_leaves_the_base_as_it_was(pipe, users):
    from splitdiff.users.adapters import content_hash, loaded_adapters

    before = run(pipe, "cloud:3,edge:5")
    personal = run(pipe, "cloud:3,edge@ana:5")
    after = run(pipe, "cloud:3,edge:5")
    assert not torch.equal(before.latents, personal.latents)
    assert torch.equal(before.latents, after.latents)  # bit for bit: the adapter was unloaded
    assert not loaded_adapters(pipe.unets["edge"])
    segs = [(s.model, s.start, s.end, s.adapter, s.adapter_sha256) for s in personal.provenance]
    assert segs == [("cloud", 0, 3, None, None), ("edge", 3, 8, "ana", content_hash(users / "ana"))]
    again = Trajectory.from_bytes(personal.to_bytes())
    assert [(s.adapter, s.adapter_sha256) for s in again.provenance] == [(s[3], s[4]) for s in segs]
    assert "adapter" not in json.dumps([s.as_json() for s in before.provenance])  # old form without adapters


def test_crafted_adapter_provenance_is_refused(pipe):
    from splitdiff.core.trajectory import TrajectoryError

    traj = run(pipe, "cloud:3,edge@ana:5")
    traj.provenance[-1].adapter_sha256 = "not a hash"
    with pytest.raises(TrajectoryError, match="adapter_sha256"):
        Trajectory.from_bytes(traj.to_bytes())


def test_a_plan_naming_an_adapter_needs_one_that_exists(pipe, tiny_models_dir):
    from splitdiff.users.adapters import AdapterError

    with pytest.raises(AdapterError, match="unknown user or adapter 'zoe'"):
        run(pipe, "cloud:3,edge@zoe:5")
    bare = load_pipeline({"edge": str(tiny_models_dir / "small")}, str(tiny_models_dir / "vae"))
    with pytest.raises(UserError, match="names an adapter"):
        run(bare, "edge@ana:8")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "splitdiff", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_resume_with_an_adapter_equals_the_in_process_run(pipe, tiny_models_dir, users, tmp_path):
    models = ["--model", f"cloud={tiny_models_dir / 'big'}", "--model", f"edge={tiny_models_dir / 'small'}",
              "--vae", tiny_models_dir / "vae"]
    env = {"SPLITDIFF_USERS": str(users)}
    r = cli("generate", PROMPT, "--plan", "cloud:3,edge@ana:5", "--steps", 8, "--seed", 5, "--size", 32,
            "--save-state", tmp_path / "s.safetensors", *models, env=env)
    assert r.returncode == 0, r.stderr
    r = cli("resume", tmp_path / "s.safetensors", "--plan", "edge@ana:5", *models, "--out", tmp_path / "a.png",
            env=env)
    assert r.returncode == 0, r.stderr
    expected = pipe.decode(run(pipe, "cloud:3,edge@ana:5"))
    image = Image.open(tmp_path / "a.png")
    assert image.tobytes() == expected.tobytes()
    segments = json.loads(image.text["splitdiff.provenance"])["segments"]
    assert segments[-1]["adapter"] == "ana" and len(segments[-1]["adapter_sha256"]) == 64
    r = cli("resume", tmp_path / "s.safetensors", "--plan", "edge@zoe:5", *models, "--out", tmp_path / "b.png",
            env=env)
    assert r.returncode == 2 and "unknown user or adapter 'zoe'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "b.png").exists()


def test_over_http_the_adapter_never_leaves_the_device(pipe, tiny_models_dir):
    limits = Limits(max_batch=4, max_steps=50, max_size=64)
    app = build_app(str(tiny_models_dir / "big"), vae=str(tiny_models_dir / "vae"), limits=limits)
    sent = []

    class Recording(CloudClient):
        def trajectory(self, request, *args, **kwargs):
            sent.append(json.dumps(request))
            return super().trajectory(request, *args, **kwargs)

    with ThreadedServer(app, limits=limits) as server, Recording(server.url) as client:
        traj, _ = run_with_cloud(pipe, parse_plan("cloud:3,edge@ana:5"), client, PROMPT, steps=8, seed=5, size=32)
        with pytest.raises(UserError, match="adapters stay on this device"):
            run_with_cloud(pipe, parse_plan("cloud@ana:3,edge:5"), client, PROMPT, steps=8, seed=5, size=32)
        served = app.state.engine.worker.unet
    assert not traj.degraded
    assert torch.equal(traj.latents, run(pipe, "cloud:3,edge@ana:5").latents)
    assert len(sent) == 1 and "ana" not in sent[0] and "lora" not in sent[0] and len(sent[0]) < 1000
    assert not getattr(served, "peft_config", None)  # the server never loaded an adapter


def test_bench_personalize_measures_every_n_from_one_shared_prefix(tiny_models_dir, users, tmp_path, monkeypatch):
    """On tiny random models the scores mean nothing; the table's shape and the branching do."""
    from splitdiff.bench.personalize import bench_personalize, fit

    monkeypatch.setenv("SPLITDIFF_USERS", str(users))
    rows = bench_personalize(tmp_path, steps=(3,), k=2, shared=str(tiny_models_dir / "big"),
                             device=str(tiny_models_dir / "small"), vae=str(tiny_models_dir / "vae"), size=32)
    assert [r["n"] for r in rows] == [0, 1, 2, 3] and all(0 <= r["pai"] <= 1 for r in rows)
    for name in ("personalize.csv", "personalize_fit.csv", "personalize.png", "personalize_grid.png"):
        assert (tmp_path / name).stat().st_size > 0
    n = np.arange(26.0)
    f = fit(n, 0.1 + 0.8 / (1 + np.exp(-0.5 * (n - 14))), 25)
    assert f["4p_r2"] > 0.999 and abs(f["4p_b"] - 14) < 0.1 and abs(f["4p_a"] - 0.5) < 0.01


def test_simulated_devices_each_run_their_own_adapter_and_leave_the_base_alone(tiny_models_dir, users, monkeypatch):
    """bench users: a user's device steps run its adapter, on a U-Net of its own; prompts show its concept."""
    from splitdiff.bench.users import Devices, draw_users

    monkeypatch.setenv("SPLITDIFF_USERS", str(users))
    sim = draw_users(4, 2, 1.0, 0.1, seed=0, adapters={"ana": ("red heart", "sks")})
    assert all(u.adapter == "ana" and " sks " in u.prompt for u in sim)
    assert [u.adapter for u in draw_users(2, 1, 1.0, 0.1, seed=0)] == [None, None]

    devices = Devices(str(tiny_models_dir / "small"), str(tiny_models_dir / "vae"), ["ana"])
    base, own = devices.pipes[None], devices.pipes["ana"]
    assert own.unets["edge"] is not base.unets["edge"] and own.encoder is base.encoder

    def finish(p, adapter):
        traj = base.start(PROMPT, steps=6, seed=2, size=32)
        p.run(traj, (PlanSegment("edge", 6, adapter=adapter),))
        return traj

    before = finish(base, None).latents
    adapted = finish(own, "ana")
    assert not torch.equal(adapted.latents, before)
    assert adapted.provenance[-1].adapter == "ana" and adapted.provenance[-1].adapter_sha256
    assert torch.equal(finish(base, None).latents, before)  # the shared base U-Net never saw the adapter
    assert torch.equal(finish(own, "ana").latents, adapted.latents)
