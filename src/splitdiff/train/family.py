"""`splitdiff train family`: the whole training chain as one resumable command.

The stages run the existing trainers in order: the evaluator (only when there is none),
the VAE, the latent cache, the cloud U-Net, the edge U-Net (pruned from the cloud one and
distilled), the tiny decoder, then `bench hybrid` on the result. Everything lives under one
folder: runs/<stage> (checkpoints, logs), weights/<name> (fp16 diffusers folders),
latent-cache/ and bench/hybrid/.

A stage is skipped when its output is finished and was made from the inputs there now:
every export's training.json records the stage's architecture and the fingerprints of its
inputs, so a retrained VAE makes the cache, the U-Nets and the tiny decoder stale (they are
trained again from scratch), while an interrupted stage resumes from its checkpoint. The
chain stops at the first stage that does not finish (the time limit, Ctrl-C) and the same
command goes on from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..bench.hybrid import CLOUD_STEPS, STEPS
from ..core.devices import check_device, resolve_device
from ..errors import UserError
from ..eval.metrics import WEIGHTS as SHIPPED_EVALUATOR
from ..io import atomic_write_bytes, unwritable_reason
from .export import TRAINING_FILE, WEIGHTS_FILE, training_record
from .tiny_decoder import TINY_CONFIG
from .unet import UNET_CONFIGS
from .vae import VAE_CONFIG

STAGES = ("evaluator", "vae", "latent-cache", "cloud", "edge", "tiny-decoder", "bench-hybrid")
MAX_WEIGHTS_BYTES = 50 * 2**20  # one file each; git hosts warn above 50 MiB
FAMILY_FILE = "family.json"
MIN_STAGE_MINUTES = 1.0  # under --max-minutes, no stage starts with less left (loading alone takes a while)


@dataclass(frozen=True)
class Run:
    """One trainer's length, batch and checkpoint interval (a few minutes of work on the machine meant)."""

    steps: int
    batch_size: int
    checkpoint_every: int
    lr: float | None = None  # None: the trainer's default


@dataclass(frozen=True)
class Bench:
    """The `bench hybrid` run that ends the chain."""

    prompts: int
    steps: int = STEPS
    cloud_steps: tuple[int, ...] = CLOUD_STEPS
    batch_size: int = 50


@dataclass(frozen=True)
class Scale:
    """A family's architectures, latent cache and schedule: everything `--scale` chooses."""

    name: str
    about: str
    vae_channels: tuple[int, ...]
    cloud_channels: tuple[int, ...]
    cloud_layers: int
    n64: int
    n128: int
    evaluator: Run
    vae: Run
    cloud: Run
    edge: Run
    tiny_decoder: Run
    bench: Bench
    threads: int | None = None  # torch threads while it runs; None: torch's choice
    reuse: tuple[str, ...] = ()  # stages copied from the shipped family, not trained (the shipped architecture)


SCALES = {
    "tiny": Scale(
        "tiny", "a test of the chain, not of quality: about a minute on a CPU",
        vae_channels=(8, 16, 16), cloud_channels=(16, 32), cloud_layers=1, n64=128, n128=32,
        evaluator=Run(8, 4, 4), vae=Run(8, 4, 4), cloud=Run(8, 4, 4), edge=Run(8, 4, 4),
        tiny_decoder=Run(8, 4, 4), bench=Bench(prompts=4, steps=4, cloud_steps=(4, 2, 0), batch_size=4),
        threads=1,  # models this small are all overhead: more threads only wait on each other, badly on a busy CPU
    ),
    "current": Scale(
        "current", "the shipped sizes and steps (hours on a CPU)",
        vae_channels=tuple(VAE_CONFIG["block_out_channels"]),
        cloud_channels=tuple(UNET_CONFIGS["cloud"]["block_out_channels"]),
        cloud_layers=UNET_CONFIGS["cloud"]["layers_per_block"], n64=30000, n128=8000,
        evaluator=Run(2500, 64, 250), vae=Run(3200, 16, 250), cloud=Run(12000, 32, 100),
        edge=Run(17000, 32, 200), tiny_decoder=Run(8000, 16, 500), bench=Bench(prompts=500),
    ),
    "large": Scale(
        "large", "sized for a GPU: a 26M-parameter cloud U-Net and its edge, on the shipped VAE and tiny decoder",
        vae_channels=tuple(VAE_CONFIG["block_out_channels"]), cloud_channels=(64, 128, 256), cloud_layers=2,
        n64=100000, n128=25000,
        evaluator=Run(2500, 64, 250), vae=Run(3200, 16, 250), cloud=Run(30000, 256, 1000),
        edge=Run(20000, 256, 1000), tiny_decoder=Run(8000, 16, 500), bench=Bench(prompts=500),
        reuse=("vae", "tiny-decoder"),  # the shipped VAE's 64 px ceiling (0.881) is above the cloud's target (0.85)
    ),
}


RUNS = {"evaluator": "evaluator", "vae": "vae", "cloud": "cloud", "edge": "edge", "tiny-decoder": "tiny_decoder"}


def get_scale(name: str, steps: dict[str, int] | None = None) -> Scale:
    """A scale by name; `steps` replaces the training steps of some stages (a GPU does more in the same minutes)."""
    if name not in SCALES:
        raise UserError(f"unknown scale {name!r}; choose one of {', '.join(SCALES)}")
    scale = SCALES[name]
    for stage, n in (steps or {}).items():
        scale = replace(scale, **{RUNS[stage]: replace(getattr(scale, RUNS[stage]), steps=n)})
    return scale


def parse_steps(text: str | None) -> dict[str, int]:
    """'cloud=6000,edge=3000' -> {'cloud': 6000, 'edge': 3000}."""
    steps: dict[str, int] = {}
    for item in filter(None, (text or "").split(",")):
        stage, _, n = item.partition("=")
        stage = stage.strip()
        if stage not in RUNS:
            raise UserError(f"--steps: unknown stage {stage!r}; choose from {', '.join(RUNS)}")
        if not n.strip().isdigit() or int(n) < 1:
            raise UserError(f"--steps: {item!r} needs a whole number of steps, at least 1")
        steps[stage] = int(n)
    return steps


@dataclass
class StageResult:
    """One row of the summary: what a stage did (or, in a dry run, would do)."""

    stage: str
    status: str
    steps: str = ""
    seconds: float = 0.0
    params: int | None = None
    output: Path | None = None
    config: str = ""
    notes: list[str] = field(default_factory=list)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _plain(obj):
    """JSON's view of `obj` (tuples become lists), so a record compares equal to what was written."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _file_params(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())


def _file_meta(path: Path) -> dict:
    """A safetensors file's JSON metadata (checkpoints and the evaluator keep their step there)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("json", "{}"))


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _mib(params: int) -> float:
    return 2 * params / 2**20


@dataclass
class _Model:
    """A trained stage: a diffusers folder made by one trainer from its inputs."""

    name: str
    config: dict  # the architecture: part of the stage's identity
    inputs: tuple[str, ...]
    run: Run
    train: Callable[[dict, float | None], None]  # (record, max_minutes)
    about: str


class _Family:
    def __init__(self, scale: Scale, root: Path, device: str, echo: Callable[[str], None]):
        self.scale, self.root, self.device, self.echo = scale, root, device, echo
        self.cache_dir = root / "latent-cache"
        self.bench_dir = root / "bench" / "hybrid"
        self.own_evaluator = self.weights("evaluator.safetensors")
        self._params: dict[str, int] = {}
        s = scale
        self.models = {
            "vae": _Model("vae", {"block_out_channels": s.vae_channels}, (), s.vae,
                          self._train_vae, f"AutoencoderKL block_out_channels={s.vae_channels}"),
            "cloud": _Model("cloud", {"block_out_channels": s.cloud_channels, "layers_per_block": s.cloud_layers},
                            ("latent-cache",), s.cloud, self._train_cloud,
                            f"UNet2DConditionModel block_out_channels={s.cloud_channels} "
                            f"layers_per_block={s.cloud_layers}"),
            "edge": _Model("edge", {}, ("cloud", "latent-cache"), s.edge, self._train_edge,
                           "UNet2DConditionModel pruned from the cloud (first two stages, one layer each), distilled"),
            "tiny-decoder": _Model("tiny-decoder", {}, ("vae",), s.tiny_decoder, self._train_tiny,
                                   f"AutoencoderTiny decoder_block_out_channels="
                                   f"{TINY_CONFIG['decoder_block_out_channels']}, distilled from the VAE's decoder"),
        }
        for name in scale.reuse:
            m = self.models[name]
            self.models[name] = _Model(name, m.config, m.inputs, m.run,
                                       lambda record, _, name=name: self._reuse(name, record),
                                       f"the shipped {name}, copied ({m.about})")

    def weights(self, name: str) -> Path:
        return self.root / "weights" / name

    def run_dir(self, stage: str) -> Path:
        return self.root / "runs" / stage

    def planned_params(self, name: str) -> int:
        """Parameters of a stage's model, built from its config (nothing is trained or loaded)."""
        if name not in self._params:
            from diffusers import AutoencoderKL, AutoencoderTiny

            from ..eval.recognizer import Recognizer
            from .compress import edge_from_cloud
            from .unet import unet_from_config

            if name in ("cloud", "edge"):
                cloud = unet_from_config(self.scale.cloud_channels, self.scale.cloud_layers)
                self._params["cloud"], self._params["edge"] = _count(cloud), _count(edge_from_cloud(cloud))
            elif name == "vae":
                vae = AutoencoderKL(**{**VAE_CONFIG, "block_out_channels": self.scale.vae_channels})
                self._params[name] = _count(vae)
            elif name == "tiny-decoder":
                self._params[name] = _count(AutoencoderTiny(**TINY_CONFIG))
            else:
                self._params[name] = _count(Recognizer())
        return self._params[name]

    # --- fingerprints and states ---

    def evaluator_path(self) -> Path | None:
        """The family's own evaluator when it has one, else the shipped one, else None (to be trained)."""
        if self.own_evaluator.exists():
            return self.own_evaluator
        return SHIPPED_EVALUATOR if SHIPPED_EVALUATOR.exists() else None

    def fingerprint(self, stage: str) -> str | None:
        """What a downstream stage was made from: a digest of this stage's output, None while it has none."""
        if stage == "evaluator":
            path = self.evaluator_path()
        elif stage == "latent-cache":
            path = self.cache_dir / "source.json"
        else:
            path = self.weights(stage) / WEIGHTS_FILE
        return _file_digest(path) if path is not None and path.exists() else None

    def identity(self, model: _Model) -> dict | None:
        inputs = {name: self.fingerprint(name) for name in model.inputs}
        if None in inputs.values():
            return None
        return _plain({"config": model.config, "inputs": inputs})

    def model_state(self, model: _Model) -> str:
        """done, resume, restart (what is there was made from other inputs or another config) or new."""
        expected = self.identity(model)
        record = training_record(self.weights(model.name)) or {}
        ckpt = self.run_dir(model.name) / "checkpoint.safetensors"
        ckpt_identity = _file_meta(ckpt).get("extra", {}).get("family") if ckpt.exists() else None
        if expected is not None and record.get("family") == expected and record.get("steps", 0) >= model.run.steps:
            return "done"
        resumable = ckpt_identity == expected if ckpt.exists() else record.get("family") == expected
        if expected is not None and resumable:
            return "resume"
        return "restart" if ckpt.exists() or record else "new"

    def cache_source(self) -> dict | None:
        vae = self.fingerprint("vae")
        return None if vae is None else {"vae": vae, "n64": self.scale.n64, "n128": self.scale.n128}

    def cache_files(self) -> list[Path]:
        sizes = ((64, self.scale.n64), (128, self.scale.n128))
        return [self.cache_dir / f"cache{size}.safetensors" for size, n in sizes if n]

    def cache_state(self) -> str:
        source_file = self.cache_dir / "source.json"
        expected = self.cache_source()
        if (expected is not None and source_file.exists() and json.loads(source_file.read_text()) == expected
                and all(p.exists() for p in self.cache_files())):
            return "done"
        return "restart" if self.cache_dir.exists() else "new"

    def bench_source(self) -> dict | None:
        inputs = {name: self.fingerprint(name) for name in ("evaluator", "vae", "cloud", "edge", "tiny-decoder")}
        if None in inputs.values():
            return None
        b = self.scale.bench
        return _plain({"inputs": inputs, "prompts": b.prompts, "steps": b.steps, "cloud_steps": b.cloud_steps})

    def bench_state(self) -> str:
        record = self.bench_dir / "bench.json"
        expected = self.bench_source()
        if (expected is not None and record.exists() and json.loads(record.read_text()) == expected
                and (self.bench_dir / "hybrid.csv").exists()):
            return "done"
        return "restart" if self.bench_dir.exists() else "new"

    def evaluator_state(self) -> str:
        if self.own_evaluator.exists():
            return "done" if _file_meta(self.own_evaluator).get("step", 0) >= self.scale.evaluator.steps else "resume"
        return "done" if SHIPPED_EVALUATOR.exists() else "new"

    def state(self, stage: str) -> str:
        if stage == "evaluator":
            return self.evaluator_state()
        if stage == "latent-cache":
            return self.cache_state()
        if stage == "bench-hybrid":
            return self.bench_state()
        return self.model_state(self.models[stage])

    def depends_on(self, stage: str) -> tuple[str, ...]:
        if stage == "latent-cache":
            return ("vae",)
        if stage == "bench-hybrid":
            return ("evaluator", "vae", "cloud", "edge", "tiny-decoder")
        return self.models[stage].inputs if stage in self.models else ()

    # --- what each stage is, in words ---

    def describe(self, stage: str) -> StageResult:
        s = self.scale
        if stage == "evaluator":
            r = s.evaluator
            path = self.evaluator_path()
            shipped = path == SHIPPED_EVALUATOR and not self.own_evaluator.exists()
            steps = f"{_file_meta(path).get('step', 0):,} steps" if shipped else f"{r.steps:,} steps"
            return StageResult(stage, "", steps, params=self.planned_params("evaluator"),
                               output=path if shipped else self.own_evaluator,
                               config=("Recognizer (the shipped one is used: trained only when missing)" if shipped
                                       else f"Recognizer, batch {r.batch_size}, checkpoint every {r.checkpoint_every}"))
        if stage == "latent-cache":
            return StageResult(stage, "", f"{s.n64:,} + {s.n128:,} samples", output=self.cache_dir,
                               config=f"VAE latents and MiniLM encodings: {s.n64:,} at 64 px, {s.n128:,} at 128 px")
        if stage == "bench-hybrid":
            b = s.bench
            return StageResult(stage, "", f"{b.prompts} prompts", output=self.bench_dir,
                               config=f"{b.prompts} prompts, {b.steps} steps, cloud steps {b.cloud_steps}")
        m = self.models[stage]
        r = m.run
        lr = f", lr {r.lr:g}" if r.lr is not None else ""
        return StageResult(stage, "", f"{r.steps:,} steps", params=self.planned_params(stage),
                           output=self.weights(stage),
                           config=f"{m.about}; batch {r.batch_size}{lr}, checkpoint every {r.checkpoint_every} steps")

    # --- running ---

    def _reuse(self, name: str, record: dict) -> None:
        """Copy the shipped model in as this family's, its record marking it done and made from the inputs here."""
        from ..core.registry import WEIGHTS_DIR

        out = self.weights(name)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(WEIGHTS_DIR / name, tmp)
        shipped = training_record(WEIGHTS_DIR / name) or {}
        steps = max(shipped.get("steps", 0), self.models[name].run.steps)
        (tmp / TRAINING_FILE).write_text(json.dumps({**shipped, "steps": steps, "copied_from": "shipped",
                                                       **record}) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)

    def _train_vae(self, record, minutes):
        from .vae import train_vae

        r = self.scale.vae
        train_vae(self.run_dir("vae"), self.weights("vae"), steps=r.steps, batch_size=r.batch_size,
                  max_minutes=minutes, config=self.models["vae"].config, device=self.device,
                  checkpoint_every=r.checkpoint_every, record=record, **_lr(r))

    def _data(self) -> dict:
        return dict(vae=str(self.weights("vae")), cache_dir=self.cache_dir, n64=self.scale.n64, n128=self.scale.n128,
                    device=self.device)

    def _train_cloud(self, record, minutes):
        from .unet import train_unet

        r = self.scale.cloud
        train_unet(self.run_dir("cloud"), self.weights("cloud"), role="cloud", steps=r.steps, batch_size=r.batch_size,
                   max_minutes=minutes, config=self.models["cloud"].config, checkpoint_every=r.checkpoint_every,
                   record=record, **self._data(), **_lr(r))

    def _train_edge(self, record, minutes):
        from .compress import compress

        r = self.scale.edge
        compress(self.run_dir("edge"), self.weights("edge"), teacher=str(self.weights("cloud")), steps=r.steps,
                 batch_size=r.batch_size, max_minutes=minutes, checkpoint_every=r.checkpoint_every, record=record,
                 **self._data(), **_lr(r))

    def _train_tiny(self, record, minutes):
        from .tiny_decoder import train_tiny_decoder

        r = self.scale.tiny_decoder
        train_tiny_decoder(self.run_dir("tiny-decoder"), self.weights("tiny-decoder"), teacher=str(self.weights("vae")),
                           steps=r.steps, batch_size=r.batch_size, max_minutes=minutes, device=self.device,
                           checkpoint_every=r.checkpoint_every, record=record, **_lr(r))

    def run_stage(self, stage: str, state: str, minutes: float | None) -> tuple[str, str]:
        """Run a stage that is not done; (status, steps reached)."""
        if stage == "evaluator":
            return self._run_evaluator(state, minutes)
        if stage == "latent-cache":
            return self._run_cache(state)
        if stage == "bench-hybrid":
            return self._run_bench(state)
        m = self.models[stage]
        if state == "restart":
            shutil.rmtree(self.run_dir(stage), ignore_errors=True)
            shutil.rmtree(self.weights(stage), ignore_errors=True)
        m.train({"family": self.identity(m)}, minutes)
        steps = (training_record(self.weights(stage)) or {}).get("steps", 0)
        size = (self.weights(stage) / WEIGHTS_FILE).stat().st_size
        if size > MAX_WEIGHTS_BYTES:
            self.echo(f"warning: {self.weights(stage) / WEIGHTS_FILE} is {size / 2**20:.1f} MiB "
                      f"(over {MAX_WEIGHTS_BYTES / 2**20:.0f} MiB)")
        return _finished(state, steps >= m.run.steps), f"{steps:,}/{m.run.steps:,}"

    def _run_evaluator(self, state, minutes):
        from .evaluator import train_evaluator

        r = self.scale.evaluator
        train_evaluator(self.run_dir("evaluator"), steps=r.steps, batch_size=r.batch_size, max_minutes=minutes,
                        out=self.own_evaluator, checkpoint_every=r.checkpoint_every, **_lr(r))
        steps = _file_meta(self.own_evaluator).get("step", 0)
        return _finished(state, steps >= r.steps), f"{steps:,}/{r.steps:,}"

    def _run_cache(self, state):
        from .unet import load_caches

        source = self.cache_source()
        (self.cache_dir / "source.json").unlink(missing_ok=True)
        for path in self.cache_files():
            path.unlink(missing_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        load_caches(self.cache_dir, str(self.weights("vae")), self.scale.n64, self.scale.n128,
                    resolve_device(self.device))
        atomic_write_bytes(self.cache_dir / "source.json", json.dumps(source, sort_keys=True).encode())
        return _finished(state, True), f"{self.scale.n64:,} + {self.scale.n128:,} samples"

    def _run_bench(self, state):
        from ..bench.hybrid import bench_hybrid

        b = self.scale.bench
        source = self.bench_source()
        (self.bench_dir / "bench.json").unlink(missing_ok=True)
        bench_hybrid(self.bench_dir, n_prompts=b.prompts, batch_size=b.batch_size, steps=b.steps,
                     cloud_steps=b.cloud_steps, cloud=str(self.weights("cloud")), edge=str(self.weights("edge")),
                     vae=str(self.weights("vae")), tiny=str(self.weights("tiny-decoder")),
                     device=str(resolve_device(self.device)), evaluator_weights=self.evaluator_path())
        atomic_write_bytes(self.bench_dir / "bench.json", json.dumps(source, sort_keys=True).encode())
        return _finished(state, True), f"{b.prompts} prompts"

    def output_params(self, stage: str) -> int | None:
        if stage == "evaluator":
            path = self.evaluator_path()
        elif stage in self.models:
            path = self.weights(stage) / WEIGHTS_FILE
        else:
            return None
        return _file_params(path) if path is not None and path.exists() else None


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _lr(r: Run) -> dict:
    return {} if r.lr is None else {"lr": r.lr}


def _finished(state: str, done: bool) -> str:
    if not done:
        return "stopped"
    return {"resume": "resumed", "restart": "restarted"}.get(state, "ran")


def _clear_model_caches() -> None:
    """Models loaded by one stage (moved to a device, hooked for distillation) are not the next one's."""
    from ..core.registry import load_unet, load_vae

    load_unet.cache_clear()
    load_vae.cache_clear()


def _check_out(root: Path, scale: Scale) -> None:
    """One folder holds one scale's family: its run folders would not fit another's models."""
    marker = root / FAMILY_FILE
    if marker.exists():
        try:
            held = json.loads(marker.read_text()).get("scale")
        except (OSError, ValueError):
            held = None
        if held and held != scale.name:
            raise UserError(f"{root} holds a {held}-scale family; pick another --out for --scale {scale.name}")
    elif root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is not a directory")


def _check_sizes(family: _Family) -> list[str]:
    """The models that would export more than MAX_WEIGHTS_BYTES of fp16 weights, in words."""
    problems = []
    for stage in ("vae", "cloud", "edge", "tiny-decoder"):
        mib = _mib(family.planned_params(stage))
        if 2 * family.planned_params(stage) > MAX_WEIGHTS_BYTES:
            problems.append(f"{stage}: {mib:.1f} MiB of fp16 weights, over {MAX_WEIGHTS_BYTES / 2**20:.0f} MiB")
    return problems


def plan_family(scale: str, out: Path, device: str = "auto",
                steps: dict[str, int] | None = None) -> tuple[list[StageResult], list[str]]:
    """What `train_family` would do, without writing anything: a row per stage and any size problems.

    A row's status is skip, resume, restart (what is there was made from other inputs) or run;
    a stage after one that will run is redone.
    """
    sc = get_scale(scale, steps)
    check_device(device)
    _check_out(out, sc)
    family = _Family(sc, out, device, print)
    rows, states = [], {}
    for stage in STAGES:
        state = family.state(stage)
        if state == "done" and any(states[d] != "done" for d in family.depends_on(stage)):
            state = "restart"
        states[stage] = state
        row = family.describe(stage)
        row.status = {"done": "skip", "new": "run"}.get(state, state)
        if stage in family.models and row.params is not None:
            row.notes.append(f"{_mib(row.params):.2f} MiB fp16")
        if stage == "edge":
            row.notes.append(f"{row.params / family.planned_params('cloud'):.1%} of the cloud's parameters")
        rows.append(row)
    return rows, _check_sizes(family)


def print_plan(scale: str, out: Path, device: str = "auto", echo: Callable[[str], None] = print,
               steps: dict[str, int] | None = None) -> None:
    rows, problems = plan_family(scale, out, device, steps)
    sc = get_scale(scale)
    where = f"{device} ({'cuda' if _has_gpu() else 'cpu'} here)" if device == "auto" else device
    echo(f"train family --scale {sc.name}: {sc.about}")
    echo(f"into {out}, device {where}; dry run: nothing is written")
    for i, row in enumerate(rows, 1):
        params = f"params {row.params:,}" if row.params is not None else ""
        notes = f" ({', '.join(row.notes)})" if row.notes else ""
        echo(f"{i}. {row.stage:<13} {row.status:<8} {row.steps:<24} {params}{notes}")
        echo(f"   {row.config}")
        echo(f"   -> {row.output}")
    for problem in problems:
        echo(f"warning: {problem}")


def train_family(scale: str, out: Path, device: str = "auto", max_minutes: float | None = None,
                 echo: Callable[[str], None] = print, steps: dict[str, int] | None = None,
                 until: str | None = None) -> list[StageResult]:
    """Run every stage that is not done, in order, up to `until` (default: all); a row per stage.

    Stops after the first stage that does not finish (`max_minutes` for the whole command
    ran out, or a signal): the stages after it are `not reached` and the same call goes on.
    No stage starts with less than MIN_STAGE_MINUTES of `max_minutes` left.
    """
    if until is not None and until not in STAGES:
        raise UserError(f"--until: unknown stage {until!r}; choose one of {', '.join(STAGES)}")
    sc = get_scale(scale, steps)
    resolve_device(device)
    _check_out(out, sc)
    reason = unwritable_reason(out / FAMILY_FILE)
    if reason:
        raise UserError(f"cannot write under --out {out}: {reason}")
    family = _Family(sc, out, device, echo)
    problems = _check_sizes(family)
    if problems:
        raise UserError("; ".join(problems))
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    atomic_write_bytes(out / FAMILY_FILE, json.dumps({"scale": sc.name}).encode())
    with _torch_threads(sc.threads):
        results = _run_stages(family, deadline, echo, until or STAGES[-1])
    summary = {"scale": sc.name, "complete": is_complete(results),
               "stages": [{"stage": r.stage, "status": r.status, "steps": r.steps, "seconds": round(r.seconds, 1),
                           "params": r.params, "output": str(r.output)} for r in results]}
    atomic_write_bytes(out / FAMILY_FILE, (json.dumps(summary, indent=1) + "\n").encode())
    return results


@contextlib.contextmanager
def _torch_threads(n: int | None):
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_stages(family: _Family, deadline: float | None, echo: Callable[[str], None],
                last: str) -> list[StageResult]:
    results: list[StageResult] = []
    stopped = False
    for i, stage in enumerate(STAGES, 1):
        row = family.describe(stage)
        left = None if deadline is None else (deadline - time.monotonic()) / 60
        state = family.state(stage)
        if STAGES.index(stage) > STAGES.index(last):
            row.status = "not asked"
        elif stopped or (state != "done" and left is not None and left < MIN_STAGE_MINUTES):
            row.status, stopped = "not reached", True
        elif state == "done":
            row.status = "skipped"
            if stage in family.models:
                row.steps = f"{training_record(family.weights(stage))['steps']:,}/{family.models[stage].run.steps:,}"
            elif stage == "evaluator":
                row.steps = f"{_file_meta(family.evaluator_path()).get('step', 0):,}"
        else:
            echo(f"[{i}/{len(STAGES)}] {stage}: {row.config}")
            start = time.monotonic()
            try:
                row.status, row.steps = family.run_stage(stage, state, left)
            finally:
                _clear_model_caches()
            row.seconds = time.monotonic() - start
            stopped = row.status == "stopped"
        row.params = family.output_params(stage) if row.status not in ("not reached", "not asked") else row.params
        results.append(row)
    return results


def is_complete(results: list[StageResult]) -> bool:
    """Every stage asked for finished."""
    return not any(r.status in ("stopped", "not reached") for r in results)


def summary_table(results: list[StageResult], out: Path, scale: str):
    """The rich table the command ends with; outputs are shown relative to `out`."""
    from rich.table import Table

    def shown(path: Path | None) -> str:
        if path is None:
            return ""
        if path == SHIPPED_EVALUATOR:
            return "(shipped)"
        return str(path.relative_to(out)) if path.is_relative_to(out) else str(path)

    table = Table(title=f"train family --scale {scale}, under {out}")
    for name, justify in (("stage", "left"), ("status", "left"), ("steps", "right"), ("seconds", "right"),
                          ("params", "right"), ("output", "left")):
        table.add_column(name, justify=justify)
    for r in results:
        table.add_row(r.stage, r.status, r.steps, f"{r.seconds:.1f}" if r.seconds else "",
                      f"{r.params:,}" if r.params is not None else "", shown(r.output))
    return table
