"""Crafted trajectories, from a file or from a cloud that should not be trusted.

A valid trajectory of each scheduler at a mid step is taken apart and every metadata
field, config key, state attribute and tensor is made missing, mistyped, huge,
non-finite or the name of a method: each variant must be refused with a one-line
TrajectoryError, quickly, in bounded memory and without side effects, while the
valid one still resumes bit for bit. Models that cannot run a trajectory refuse it
before any step; a step that goes non-finite is an error of that trajectory alone;
the edge falls back on every crafted cloud answer; the CLI exits 2 in one line.
"""

import copy
import http.server
import json
import math
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from splitdiff.core import schedulers
from splitdiff.core.plan import parse_plan
from splitdiff.core.runner import NonFiniteError, advance, denoise_step
from splitdiff.core.segments import Executor
from splitdiff.core.schedulers import MAX_STEPS, SCHEDULERS, make_scheduler, max_steps
from splitdiff.testing import tiny_unet, tiny_vae
from splitdiff.core.trajectory import (
    MAX_BYTES, MAX_PROMPT_CHARS, MAX_SEGMENTS, Trajectory, TrajectoryError, new_trajectory,
)
from splitdiff.errors import UserError
from splitdiff.hybrid.pipeline import HybridPipeline
from splitdiff.serve.client import CloudClient, CloudUnavailable
from splitdiff.serve.edge import run_with_cloud

STEPS, MID = 4, 2
SHAPE = (4, 8, 8)
TOKENS, WIDTH = 8, 384
PROMPT = "a red circle"
DELETE = object()
RAW = "@@raw@@"  # replaced by raw JSON text that json.dumps cannot write (10**5000)


def _embeds(width=WIDTH, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(TOKENS, dtype=torch.long)
    mask[-2:] = 0
    return torch.randn(TOKENS, width, generator=g), torch.randn(TOKENS, width, generator=g), mask, mask.clone()


def fresh(name, *, steps=STEPS, width=WIDTH, shape=SHAPE, config=None, guidance=5.0):
    emb, neg, pm, nm = _embeds(width)
    return new_trajectory(emb, neg, prompt_mask=pm, negative_mask=nm, latent_shape=shape, scheduler=name,
                          steps=steps, seed=3, guidance_scale=guidance, noise_schedule=config, prompt=PROMPT,
                          negative_prompt="blurry")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=1)


@pytest.fixture(scope="module")
def valid(unet):
    """Each scheduler's trajectory at step MID of STEPS, as bytes."""
    out = {}
    for name in SCHEDULERS:
        traj = fresh(name)
        advance(unet, [traj], MID, "cloud", where="cloud")
        out[name] = traj.to_bytes()
    return out


# -- taking a trajectory apart and putting it back wrong --------------------------------------
def split(data: bytes) -> tuple[dict, dict]:
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(json.loads(data[8:8 + n])["__metadata__"]["splitdiff"])
    return meta, st_load(data)


def pack(meta, tensors, raw: str | None = None) -> bytes:
    text = json.dumps(meta)
    if raw is not None:
        text = text.replace(json.dumps(RAW), raw)
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"splitdiff": text})


def with_header(data: bytes, edit) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header = edit(header) or header
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def segment(**changes):
    return {"model": "cloud", "start": 0, "end": MID, "seconds": 0.1, "where": "cloud", **changes}


NOT_A_VALUE = [None, "step", "__init__", [], {}, [1, 2], {"a": 1}]
BAD_META = {
    "format": ["other", 1, True],
    "version": [0, 2, "1", 1.0, True, 10 ** 30],
    "half": ["no", 0, 1, 1.0],
    "step_index": [-1, STEPS + 1, 10 ** 30, 2.0, "2", True, math.nan],
    "guidance_scale": [-0.5, 100.5, 1e308, math.inf, -math.inf, math.nan, "5", True, [5.0]],
    "seed": [3.0, "3", True, 2 ** 64, -(2 ** 63) - 1, math.nan, math.inf],
    "prompt": [5, "x" * (MAX_PROMPT_CHARS + 1), ["a"]],
    "negative_prompt": [5, "x" * (MAX_PROMPT_CHARS + 1), ["a"]],
    "degraded": ["yes", 0, 1],
    "provenance": ["x", [1], [None], [{}], [segment(extra=1)], [segment(model=5)], [segment(model="m" * 201)],
                   [segment(where=5)], [segment(start=-1)], [segment(end=MID + 1)], [segment(start=2, end=1)],
                   [segment(seconds=math.nan)], [segment(seconds=math.inf)], [segment(seconds=-1)],
                   [segment(seconds="1")], [segment(start=1.0)], [segment(end=True)],
                   [segment(fingerprint="xyz")], [segment(fingerprint=5)], [segment(fingerprint="0" * 64)],
                   [segment()] * (MAX_SEGMENTS + 1)],
    "scheduler": ["ddim", 5],
}
HOSTILE = [None, "step", "__init__", [1, 2, 3], {"a": 1}, 10 ** 9, -10 ** 9, 1e308, math.inf, -math.inf, math.nan,
           True, False, 0, 1.5, 3 * 10 ** 8]
MUST_REFUSE_CONFIG = {
    "num_train_timesteps": [10 ** 9, 3 * 10 ** 8, 1001, 0, 1000.0],
    "beta_start": [0, 1.5, -0.1], "beta_end": [1, 1.5, 1e-9], "beta_schedule": ["cosine", "step"],
    "steps_offset": [1000], "timestep_spacing": ["random"], "prediction_type": ["flow"],
    "trained_betas": [[0.5] * 1000], "solver_order": [100, 0], "algorithm_type": ["sde-dpmsolver++"],
}
METHODS = ["step", "scale_model_input", "set_timesteps", "__class__", "__init__", "add_noise", "from_config",
           "save_config", "_init_step_index"]


def crafted(data: bytes, name: str) -> list[tuple[str, bytes, str | None]]:
    """(label, bytes, a word the refusal must name) for every way of breaking `data` tried here."""
    meta, tensors = split(data)
    out: list[tuple[str, bytes, str | None]] = []

    def m(label, path, value=DELETE, word=None, raw=None):
        mm = copy.deepcopy(meta)
        node = mm
        for k in path[:-1]:
            node = node[k]
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        out.append((label, pack(mm, tensors, raw), word))

    def t(label, changes, word=None):
        tt = dict(tensors)
        for k, v in changes.items():
            if v is None:
                tt.pop(k)
            else:
                tt[k] = v
        out.append((label, pack(meta, tt), word))

    # bytes and header
    n = struct.unpack("<Q", data[:8])[0]
    out += [
        ("empty", b"", None), ("seven bytes", b"\0" * 7, None), ("truncated", data[: len(data) // 2], None),
        ("header only", data[: 8 + n], None), ("zero header length", b"\0" * 8 + data[8:], None),
        ("huge header length", b"\xff" * 8 + data[8:], None),
        ("header length past the end", struct.pack("<Q", len(data)) + data[8:], None),
        ("header not JSON", struct.pack("<Q", 2) + b"{x" + data[10:], None),
        ("deeply nested header", struct.pack("<Q", 400_000) + b"[" * 400_000, None),
        ("not bytes", "text", None),
    ]
    deep = "[" * 100_000 + "]" * 100_000
    out.append(("deeply nested metadata", st_save(dict(tensors), metadata={"splitdiff": deep}), None))
    out.append(("metadata not JSON", st_save(dict(tensors), metadata={"splitdiff": "{nope"}), None))
    out.append(("metadata a list", st_save(dict(tensors), metadata={"splitdiff": "[]"}), None))
    out.append(("no splitdiff metadata", st_save(dict(tensors), metadata={"other": "{}"}), None))
    out.append(("no metadata", st_save(dict(tensors)), None))
    out.append(("extra metadata", st_save(dict(tensors), metadata={"splitdiff": json.dumps(meta), "x": "1"}), None))
    for key, edit in [
        ("latents", lambda h: h["latents"].update(shape=[1, 4, 100_000, 100_000])),
        ("latents", lambda h: h["latents"].update(shape=[1, 4, 8, 8, 1])),
        ("latents", lambda h: h["latents"].update(dtype="F64")),
        ("latents", lambda h: h["latents"].update(dtype=5)),
        ("latents", lambda h: h["latents"].update(shape=[-1, 4, 8, 8])),
        ("latents", lambda h: h["latents"].update(shape=[1.5, 4, 8, 8])),
        ("latents", lambda h: h["latents"].update(shape=[10 ** 30, 4, 8, 8])),
        ("latents", lambda h: h["latents"].update(shape="x")),
        ("latents", lambda h: h.update(latents="x")),
        ("prompt_embeds", lambda h: h["prompt_embeds"].update(shape=[10 ** 6, 10 ** 6])),
        (None, lambda h: h["latents"].update(data_offsets=[0, 10 ** 12])),
        (None, lambda h: [1, 2]),
    ]:
        out.append((f"header lie {key}", with_header(data, edit), key))

    # metadata fields
    out.append(("metadata a list", pack([], tensors), None))
    for key in BAD_META:
        m(f"missing {key}", [key], word=key)
        for v in BAD_META[key] + [x for x in NOT_A_VALUE if not (key.endswith("prompt") and isinstance(x, str))
                                  and not (key == "provenance" and x == [])]:
            m(f"{key}={v!r:.40}", [key], v, word=None if key in ("format", "scheduler") else key)
    m("huge seed", ["seed"], RAW, word="5001 digits", raw="1" + "0" * 5000)
    m("huge guidance", ["guidance_scale"], RAW, word="401 digits", raw="1" + "0" * 400)
    m("unknown field", ["step"], 1, word="step")
    m("unknown field __class__", ["__class__"], "x", word="__class__")
    for v in [5, "1" * 41, "1.0; rm -rf", None, ["0.37"], ""]:  # optional, but a version string when there
        m(f"diffusers={v!r:.20}", ["diffusers"], v, word="diffusers")

    # the scheduler: its name, steps, config and state
    for key in ("name", "config", "num_inference_steps", "state"):
        m(f"scheduler without {key}", ["scheduler", key])
    m("scheduler extra key", ["scheduler", "extra"], 1)
    for v in ["plms", "DDIM", "__class__", "step", None, 5, [name]]:
        m(f"scheduler name {v!r}", ["scheduler", "name"], v)
    for v in [0, -1, 3 * 10 ** 8, 10 ** 30, 501, 1000, float(STEPS), str(STEPS), True, None, math.nan,
              STEPS - 1, STEPS + 1]:
        m(f"num_inference_steps={v!r}", ["scheduler", "num_inference_steps"], v)
    for v in [None, [], "x", 5]:
        m(f"config={v!r}", ["scheduler", "config"], v)
    config = meta["scheduler"]["config"]
    specs = schedulers.CONFIG[name]
    for key in config:
        for v in HOSTILE:
            if not specs[key].ok(v):
                m(f"config {key}={v!r:.30}", ["scheduler", "config", key], v, word=key)
    for key, values in MUST_REFUSE_CONFIG.items():
        for v in values if key in specs else ():
            m(f"config {key}={v!r:.30}", ["scheduler", "config", key], v, word=None)
    for key in METHODS + ["num_inference_steps", "_internal_dict", "timesteps"]:
        m(f"config key {key}", ["scheduler", "config", key], 1, word=key)
    for v in [None, [], "x", {}, {"scalars": {}}, {"lists": {}}, {"scalars": [], "lists": {}},
              {"scalars": {}, "lists": {}, "x": {}}]:
        m(f"state={v!r:.40}", ["scheduler", "state"], v)
    state = meta["scheduler"]["state"]
    for key in METHODS + ["betas", "timesteps", "sigmas", "config", "num_inference_steps", "init_noise_sigma",
                          "_step_index", "lower_order_nums", "is_scale_input_called", "model_outputs", "_begin_index"]:
        if key in state["scalars"]:
            continue
        for v in (None, 1, 10 ** 9, "x", math.inf):
            m(f"state scalar {key}={v!r}", ["scheduler", "state", "scalars", key], v, word=key)
    for key, value in state["scalars"].items():
        m(f"state without {key}", ["scheduler", "state", "scalars", key], word=key)
        for v in (None, "x", 10 ** 9, -1, 2.5, not value if isinstance(value, bool) else True, MID + 1):
            m(f"state {key}={v!r}", ["scheduler", "state", "scalars", key], v, word=key)
    for key in METHODS + ["timesteps", "model_outputs"]:
        if key not in state["lists"]:
            m(f"state list {key}", ["scheduler", "state", "lists", key], [True], word=key)
    for key, present in state["lists"].items():
        m(f"state without list {key}", ["scheduler", "state", "lists", key], word=key)
        for v in ([True] * 1000, "x", [1, 2], [True, "a"], [False] * len(present), [True] * (len(present) + 1),
                  None):
            m(f"state list {key}={v!r:.30}", ["scheduler", "state", "lists", key], v, word=key)

    # tensors
    for key, v in tensors.items():
        field = key
        if "mask" not in key:  # masks are optional: without them every token counts
            t(f"missing tensor {key}", {key: None}, word=key)
        changes = {
            "float64": v.double(),
            "bfloat16": v.bfloat16() if v.is_floating_point() else None,
            "int": v.long() if v.is_floating_point() else None,
            "float": v.float() if not v.is_floating_point() else None,
            "extra dim": v[None],
            "flat": v.flatten() if v.dim() > 1 else None,
            "half length": v[: v.shape[0] // 2] if v.dim() and v.shape[0] >= 2 else None,
            "double width": torch.cat([v, v], -1) if key != "latents" else None,  # 8 x 16 latents are fine
            "empty": v[..., :0],
        }
        if v.is_floating_point():
            for label, x in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf), ("1e30", 1e30),
                             ("7e4", 7e4)):
                bad = v.clone()
                bad.view(-1)[0] = x
                changes[label] = bad
        if "mask" in key:
            bad = v.clone()
            bad[0] = 2
            changes["mask value 2"] = bad
        for label, x in changes.items():
            if x is not None:
                t(f"{key} {label}", {key: x}, word=field)
    g = torch.Generator().manual_seed(0)
    t("generator_state random",
      {"generator_state": torch.randint(0, 256, tensors["generator_state"].shape, generator=g, dtype=torch.uint8)},
      word="generator_state")
    t("latents 3x3", {"latents": torch.zeros(1, 4, 3, 3)}, word="latents")
    t("latents 17 channels", {"latents": torch.zeros(1, 17, 8, 8)}, word="latents")
    t("latents batch 2", {"latents": torch.zeros(2, 4, 8, 8)}, word="latents")
    t("latents 513 high", {"latents": torch.zeros(1, 4, 513, 8)}, word="latents")
    t("embeddings 513 long", {"prompt_embeds": torch.zeros(513, WIDTH), "negative_embeds": torch.zeros(513, WIDTH)},
      word="embeds")
    t("embeddings 4097 wide", {"prompt_embeds": torch.zeros(TOKENS, 4097),
                               "negative_embeds": torch.zeros(TOKENS, 4097)}, word="embeds")
    t("negative embeddings shorter", {"negative_embeds": torch.zeros(TOKENS - 1, WIDTH)}, word="embeds")
    ts = tensors["sched.timesteps"]
    t("timesteps shifted", {"sched.timesteps": ts + 1}, word="timesteps")
    t("timesteps reversed", {"sched.timesteps": ts.flip(0)}, word="timesteps")
    t("timesteps all ones", {"sched.timesteps": torch.ones_like(ts)}, word="timesteps")
    if "sched.sigmas" in tensors:
        s = tensors["sched.sigmas"]
        t("sigmas 1e30", {"sched.sigmas": s * 1e30}, word="sigmas")
        t("sigmas 1% off", {"sched.sigmas": s * 1.01}, word="sigmas")
    for key in ("sched.step", "sched.betas", "sched.model_outputs.7", "sched.scale_model_input", "sched.__class__",
                "extra", "sched.timesteps.0"):
        t(f"extra tensor {key}", {key: torch.zeros(3)}, word=key)
    return out


def _refusal(data) -> TrajectoryError | str:
    start = time.perf_counter()
    try:
        Trajectory.from_bytes(data)
    except TrajectoryError as e:
        if time.perf_counter() - start > 2.0:
            return f"took {time.perf_counter() - start:.1f} s"
        return e
    except Exception as e:  # noqa: BLE001 - the point of the test
        return f"raised {type(e).__name__}: {str(e)[:100]}"
    return "loaded"


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_crafted_variant_is_refused_in_one_line_without_side_effects(valid, name):
    variants = crafted(valid[name], name)
    assert len(variants) > 150
    rng = torch.get_rng_state()
    problems = []
    for label, data, word in variants:
        got = _refusal(data)
        if not isinstance(got, TrajectoryError):
            problems.append(f"{label}: {got}")
            continue
        text = str(got)
        if "\n" in text or len(text) > 400 or not text:
            problems.append(f"{label}: not one bounded line: {text!r:.200}")
        elif word and word not in text:
            problems.append(f"{label}: does not name {word!r}: {text}")
        if not torch.equal(torch.get_rng_state(), rng):
            problems.append(f"{label}: changed the global RNG")
            rng = torch.get_rng_state()
    assert not problems, f"{len(problems)} of {len(variants)} variants:\n" + "\n".join(problems)


def test_more_bytes_than_any_trajectory_is_refused_before_reading():
    with pytest.raises(TrajectoryError, match="more than any trajectory"):
        Trajectory.from_bytes(bytes(MAX_BYTES + 1))


MEASURE = """
import json, pathlib, resource, sys, time
from splitdiff.core.trajectory import Trajectory, TrajectoryError
files = sorted(pathlib.Path(sys.argv[1]).iterdir())
for p in files:
    if p.name.startswith("valid"):
        Trajectory.from_bytes(p.read_bytes())
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = []
for p in files:
    if p.name.startswith("valid"):
        continue
    data = p.read_bytes()
    start = time.perf_counter()
    try:
        Trajectory.from_bytes(data)
        outcome = "loaded"
    except TrajectoryError:
        outcome = "refused"
    except Exception as e:
        outcome = type(e).__name__
    rows.append([p.name, outcome, time.perf_counter() - start])
    del data
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"grown_mb": grown, "rows": rows}))
"""


def test_refusing_crafted_files_stays_within_memory_and_time(valid, tmp_path):
    """In a fresh process (so that its peak RSS means something): 200 MB and 2 s at most for any variant."""
    meta, tensors = split(valid["dpmsolver++"])
    huge = {
        "steps 3e8": ("scheduler", "num_inference_steps", 300_000_000),
        "train timesteps 1e9": ("scheduler", "config", "num_train_timesteps", 10 ** 9),
        "train timesteps 3e8": ("scheduler", "config", "num_train_timesteps", 300_000_000),
    }
    for i, (label, path) in enumerate(huge.items()):
        mm = copy.deepcopy(meta)
        node = mm
        for k in path[:-2]:
            node = node[k]
        node[path[-2]] = path[-1]
        (tmp_path / f"huge-{i}").write_bytes(pack(mm, tensors))
    for name, data in valid.items():
        (tmp_path / f"valid-{name}").write_bytes(data)
        for i, (_, bad, _) in enumerate(crafted(data, name)):
            if isinstance(bad, bytes):
                (tmp_path / f"{name}-{i:04d}").write_bytes(bad)
    r = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert all(outcome == "refused" for _, outcome, _ in result["rows"]), \
        [row for row in result["rows"] if row[1] != "refused"][:5]
    slowest = max(result["rows"], key=lambda row: row[2])
    assert slowest[2] < 2.0, slowest
    assert result["grown_mb"] < 200, result["grown_mb"]


# -- the valid ones still work ----------------------------------------------------------------
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_the_valid_trajectory_loads_round_trips_and_resumes_bit_identically(unet, valid, name):
    straight = fresh(name)
    advance(unet, [straight], STEPS)
    resumed = Trajectory.from_bytes(valid[name])
    assert resumed.to_bytes() == valid[name]
    advance(unet, [resumed], STEPS - MID)
    assert torch.equal(resumed.latents, straight.latents)
    half = Trajectory.from_bytes(Trajectory.from_bytes(valid[name]).to_bytes(half=True))
    assert half.step_index == MID and half.scheduler_name == name


PIPELINE_STYLE = dict(  # a Stable Diffusion 1.x pipeline folder's scheduler_config.json (PNDM), minus _ keys
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False, num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None, prediction_type="epsilon",
    timestep_spacing="leading")


@pytest.mark.parametrize("name, config", [
    ("dpmsolver++", dict(schedulers.SD_NOISE_SCHEDULE, solver_order=3)),
    ("dpmsolver++", dict(schedulers.SD_NOISE_SCHEDULE, solver_order=1, use_karras_sigmas=True)),
    ("dpmsolver++", dict(schedulers.SD_NOISE_SCHEDULE, timestep_spacing="trailing", prediction_type="v_prediction")),
    ("euler", dict(schedulers.SD_NOISE_SCHEDULE, use_karras_sigmas=True)),
    ("euler-a", dict(schedulers.SD_NOISE_SCHEDULE, timestep_spacing="linspace")),
    ("ddim", dict(schedulers.SD_NOISE_SCHEDULE, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")),
    ("ddim", PIPELINE_STYLE),
    ("euler", PIPELINE_STYLE),
])
def test_other_noise_schedules_survive_the_checks(unet, name, config):
    straight = fresh(name, steps=3, config=config)
    advance(unet, [straight], 3)
    paused = fresh(name, steps=3, config=config)
    advance(unet, [paused], 2)
    paused = Trajectory.from_bytes(paused.to_bytes())
    advance(unet, [paused], 1)
    assert torch.equal(paused.latents, straight.latents)


# -- step counts --------------------------------------------------------------------------------
def test_step_counts_that_diffusers_spaces_wrongly_are_refused():
    assert MAX_STEPS == 500 and max_steps() == 500 and max_steps(schedulers.SD_NOISE_SCHEDULE) == 500
    assert max_steps(dict(num_train_timesteps=1000, timestep_spacing="trailing")) == MAX_STEPS
    assert max_steps(dict(num_train_timesteps=100, timestep_spacing="leading")) == 50
    assert max_steps(dict(num_train_timesteps=100, timestep_spacing="linspace"), "dpmsolver++") == 99
    for name in SCHEDULERS:
        limit = max_steps(None, name)
        sched = make_scheduler(name, None, limit)
        t = sched.timesteps.double()
        assert len(t) == limit and bool((t[1:] < t[:-1]).all()) and t[0] >= 990 and t[-1] >= 0
        for steps in (limit + 1, 501, 750, 999, 1000, 0, -1):
            with pytest.raises(UserError, match="steps"):
                make_scheduler(name, None, steps)
        with pytest.raises(UserError):
            fresh(name, steps=1000)
    with pytest.raises(UserError, match="timesteps for 61 steps"):  # diffusers' trailing spacing makes 62
        make_scheduler("ddim", dict(schedulers.SD_NOISE_SCHEDULE, timestep_spacing="trailing"), 61)


@pytest.mark.parametrize("kwargs, words", [
    (dict(guidance_scale=math.inf), "guidance"), (dict(guidance_scale=math.nan), "guidance"),
    (dict(guidance_scale=101.0), "guidance"), (dict(guidance_scale=-1.0), "guidance"),
    (dict(seed=2 ** 64), "seed"), (dict(seed=-(2 ** 63) - 1), "seed"), (dict(seed=1.5), "seed"),
    (dict(steps=0), "steps"), (dict(steps=501), "steps"), (dict(steps=3 * 10 ** 8), "steps"),
    (dict(latent_shape=(4, 3, 3)), "latent shape"), (dict(prompt="x" * (MAX_PROMPT_CHARS + 1)), "prompt"),
])
def test_new_trajectory_refuses_what_the_loader_would(kwargs, words):
    emb, neg, _, _ = _embeds()
    args = {**dict(latent_shape=SHAPE, scheduler="ddim", steps=STEPS), **kwargs}
    with pytest.raises(UserError, match=words):
        new_trajectory(emb, neg, **args)


# -- models that cannot run a trajectory, and steps that go non-finite --------------------------
def fake_encoder(prompts, width=WIDTH):
    """Deterministic stand-in for a text encoder: the same prompt gives the same embeddings."""
    rows = [torch.randn(TOKENS, width, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
            for p in prompts]
    return torch.stack(rows), torch.ones(len(prompts), TOKENS, dtype=torch.long)


@pytest.fixture(scope="module")
def pipe():
    return HybridPipeline({"edge": tiny_unet(seed=2, channels=(32, 32))}, tiny_vae(), fake_encoder, None, WIDTH)


@pytest.mark.parametrize("kwargs, words", [
    (dict(width=32), "cross-attends to width 384"),
    (dict(shape=(4, 5, 5)), "divisible by 2"),
    (dict(shape=(3, 8, 8)), "latent channels"),
])
def test_a_trajectory_the_model_cannot_run_is_refused_before_any_step(pipe, kwargs, words):
    traj = Trajectory.from_bytes(fresh("dpmsolver++", **kwargs).to_bytes())
    before = traj.latents.clone()
    for run in (lambda: pipe.run(traj, parse_plan(f"edge:{STEPS}")),
                lambda: pipe.run_segment(traj, parse_plan("edge:1")[0])):
        with pytest.raises(TrajectoryError, match=words):
            run()
    assert traj.step_index == 0 and torch.equal(traj.latents, before)


def test_a_step_that_goes_non_finite_fails_that_trajectory_alone(unet):
    trajs = [fresh("ddim"), fresh("dpmsolver++"), fresh("euler")]
    alone = [fresh("ddim"), fresh("euler")]
    for t in alone:
        advance(unet, [t], 1)
    trajs[1].latents = torch.full_like(trajs[1].latents, 3e38)
    bad = trajs[1].latents.clone()
    failures = denoise_step(unet, trajs)
    assert list(failures) == [1] and isinstance(failures[1], NonFiniteError)
    assert "step 1 of 4" in str(failures[1]) and "\n" not in str(failures[1])
    assert trajs[1].step_index == 0 and torch.equal(trajs[1].latents, bad)
    for t, ref in zip((trajs[0], trajs[2]), alone):
        assert t.step_index == 1 and torch.allclose(t.latents, ref.latents, rtol=1e-5, atol=1e-5)
    broken = fresh("euler")
    broken.scheduler.step = lambda *a, **k: (_ for _ in ()).throw(IndexError("index 7 is out of bounds"))
    failures = denoise_step(unet, [fresh("ddim"), broken])
    assert list(failures) == [1] and isinstance(failures[1], IndexError)
    with pytest.raises(NonFiniteError, match="non-finite"):
        advance(unet, [fresh("ddim"), trajs[1]], 1)


def test_guidance_infinity_no_longer_resumes_to_a_black_image(valid):
    meta, tensors = split(valid["dpmsolver++"])
    meta["guidance_scale"] = math.inf
    with pytest.raises(TrajectoryError, match="guidance_scale"):
        Trajectory.from_bytes(pack(meta, tensors))


# -- the edge on a cloud that answers crafted trajectories ---------------------------------------
class FakeCloud:
    """A real HTTP server on loopback that answers every POST with `answer` (claiming `declared` bytes if set)."""

    def __init__(self):
        self.answer, self.posts, self.declared, self.status = b"", 0, None, 200
        cloud = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                cloud.posts += 1
                self.send_response(cloud.status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(cloud.declared or len(cloud.answer)))
                self.end_headers()
                try:
                    self.wfile.write(cloud.answer)
                except OSError:
                    pass  # the client hung up on an answer it would not read

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


EDGE_STEPS, CLOUD_STEPS, SIZE = 3, 1, 32


def _answer(pipe, cloud_unet, *, steps=EDGE_STEPS, at=CLOUD_STEPS, seed=0, width=WIDTH):
    emb, mask = fake_encoder([PROMPT, ""], width)
    traj = new_trajectory(emb[0], emb[1], prompt_mask=mask[0], negative_mask=mask[1], latent_shape=(4, 8, 8),
                          steps=steps, seed=seed, prompt=PROMPT)
    advance(cloud_unet, [traj], at, "cloud", where="cloud")
    return traj.to_bytes()


def _crafted_answers(pipe):
    cloud_unet = tiny_unet(seed=1)
    good = _answer(pipe, cloud_unet)
    meta, tensors = split(good)

    def edit(**changes):
        mm = copy.deepcopy(meta)
        for path, v in changes.items():
            node = mm
            keys = path.split("__")
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = v
        return pack(mm, tensors)

    tt = dict(tensors)
    tt["sched.sigmas"] = tensors["sched.sigmas"] * 1e30
    return good, {
        "corrupt": b"garbage" * 100,
        "3e8 steps": edit(scheduler__num_inference_steps=300_000_000),
        "guidance Infinity": edit(guidance_scale=math.inf),
        "sigmas 1e30": pack(meta, tt),
        "method in the state": edit(scheduler__state__scalars__step=1),
        "step mismatch": _answer(pipe, cloud_unet, at=0),
        "seed mismatch": _answer(pipe, cloud_unet, seed=9),
        "embedding width mismatch": _answer(pipe, tiny_unet(seed=1, cross_attention_dim=32), width=32),
        "string seed": edit(seed="0"),
        "oversized": good,
    }


def test_the_edge_falls_back_on_every_crafted_cloud_answer(pipe):
    good, answers = _crafted_answers(pipe)
    plan = parse_plan(f"cloud:{CLOUD_STEPS},edge:{EDGE_STEPS - CLOUD_STEPS}")
    reference = None
    with FakeCloud() as cloud, CloudClient(cloud.url, tries=2, backoff=0.01) as client:
        cloud.answer = good
        traj, handoff = run_with_cloud(pipe, plan, client, PROMPT, steps=EDGE_STEPS, size=SIZE, warn=pytest.fail)
        assert traj.done and not traj.degraded and handoff is not None
        for label, answer in answers.items():
            cloud.answer, cloud.posts, warnings = answer, 0, []
            cloud.declared = MAX_BYTES + 1 if label == "oversized" else None
            traj, handoff = run_with_cloud(pipe, plan, client, PROMPT, steps=EDGE_STEPS, size=SIZE,
                                           warn=warnings.append)
            assert traj.done and traj.degraded and handoff is None, label
            assert len(warnings) == 1 and "cloud unavailable" in warnings[0] and cloud.posts == 2, (label, warnings)
            assert pipe.decode(traj).size == (SIZE, SIZE)
            reference = traj.latents if reference is None else reference
            assert torch.equal(traj.latents, reference), label


def test_the_client_reads_error_answers_within_bounds():
    with FakeCloud() as cloud, CloudClient(cloud.url, tries=2, backoff=0.01) as client:
        cloud.status, cloud.answer = 500, json.dumps({"error": "boom"}).encode()
        with pytest.raises(CloudUnavailable, match="HTTP 500: boom"):
            client.trajectory({})
        cloud.status, cloud.answer = 401, json.dumps({"error": "missing bearer token"}).encode()
        with pytest.raises(UserError, match="HTTP 401.*missing bearer token"):
            client.trajectory({})
        cloud.status, cloud.declared = 503, 10 ** 9
        with pytest.raises(CloudUnavailable, match="HTTP 503"):
            client.trajectory({})


def test_the_edge_falls_back_when_the_cloud_trajectory_cannot_be_finished(pipe):
    good, _ = _crafted_answers(pipe)
    plan = parse_plan(f"cloud:{CLOUD_STEPS},edge:{EDGE_STEPS - CLOUD_STEPS}")
    calls = []

    class EdgeSteps(Executor):  # the first continuation goes non-finite, the fallback's does not
        def advance(self, traj, seg):
            calls.append(traj.degraded)
            if len(calls) == 1:
                raise NonFiniteError.at(traj)
            advance(pipe.unets["edge"], [traj], seg.steps, "edge")

    pipe.executors["edge"] = EdgeSteps()
    try:
        with FakeCloud() as cloud, CloudClient(cloud.url, tries=1) as client:
            cloud.answer, warnings = good, []
            traj, handoff = run_with_cloud(pipe, plan, client, PROMPT, steps=EDGE_STEPS, size=SIZE,
                                           warn=warnings.append)
    finally:
        del pipe.executors["edge"]
    assert traj.done and traj.degraded and handoff is None and calls == [False, True]
    assert "could not be finished here" in warnings[0] and "non-finite" in warnings[0]


# -- the command line ----------------------------------------------------------------------------
def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("splitdiff")
    return [str(script)] if script.exists() else [sys.executable, "-m", "splitdiff"]


@pytest.mark.parametrize("case, words", [
    ("3e8 steps", "300000000"), ("method in the state", "'step' is a method"), ("embedding width", "cross-attends"),
])
def test_resume_on_a_crafted_file_exits_2_in_one_line(tmp_path, tiny_models_dir, case, words):
    data = fresh("dpmsolver++", width=32 if case == "embedding width" else WIDTH).to_bytes()
    meta, tensors = split(data)
    if case == "3e8 steps":
        meta["scheduler"]["num_inference_steps"] = 300_000_000
    elif case == "method in the state":
        meta["scheduler"]["state"]["scalars"]["step"] = 1
    state, out = tmp_path / "s.safetensors", tmp_path / "o.png"
    state.write_bytes(pack(meta, tensors))
    d = tiny_models_dir
    start = time.monotonic()
    r = subprocess.run([*_console_script(), "resume", str(state), "--plan", f"edge:{STEPS}", "--out", str(out),
                        "--model", f"edge={d / 'small'}", "--vae", str(d / "vae")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("splitdiff: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and words in errors[0] and "Traceback" not in r.stderr
    if case != "embedding width":  # refused while loading, before the models are
        assert len(lines) == 1
    assert not out.exists() and time.monotonic() - start < 120
