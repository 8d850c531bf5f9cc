"""Trajectory: one generation's complete state between two denoising steps.

Everything the next step needs travels with it: the latents, the scheduler (its
schedule and internal history), the RNG of ancestral samplers, the guidance scale,
the prompt embeddings (so the device that resumes needs no text encoder), the seed,
and a record of which model ran which steps. It serializes to safetensors with a
versioned JSON header; loading validates everything and never unpickles.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import UserError
from . import schedulers
from .limits import MAX_GUIDANCE, SEED_MAX, SEED_MIN

FORMAT = "splitdiff.trajectory"
VERSION = 1

# What a trajectory may hold. Anything beyond is refused before it is built.
MAX_CHANNELS = 16
MIN_SIDE, MAX_SIDE = 4, 512  # latent sides; 4 is the server's smallest image (16 px) at the family's 4x VAE
MAX_TOKENS, MAX_WIDTH = 512, 4096  # prompt embeddings: L x D
# SDXL's added conditioning (the U-Net's added_cond_kwargs): the last encoder's pooled
# output, and (original size, crop corner, target size) as six numbers
ADDED_KEYS = {"text_embeds": MAX_WIDTH, "time_ids": 6}
MAX_PROMPT_CHARS = 10_000
MAX_NAME_CHARS = 200  # provenance model and place names
MAX_SEGMENTS = 2 * schedulers.MAX_STEPS
MAX_HEADER_BYTES = 2 ** 20
GENERATOR_STATE_BYTES = torch.Generator().get_state().numel()
# The largest trajectory: latents and up to three of DPM-Solver++'s history at the largest
# shape, both embeddings at theirs, their masks, the schedule, the RNG state and the header.
MAX_BYTES = (4 * 4 * MAX_CHANNELS * MAX_SIDE ** 2 + 2 * 4 * MAX_TOKENS * MAX_WIDTH + 2 * 8 * MAX_TOKENS
             + 2 * 8 * (schedulers.MAX_STEPS + 1) + GENERATOR_STATE_BYTES + MAX_HEADER_BYTES + 8)


class TrajectoryError(UserError):
    """A trajectory that cannot be trusted or continued: corrupt, truncated, out of range, not for this model."""

    def __init__(self, message: str):
        text = " ".join(str(message).split())
        super().__init__(text if len(text) <= 400 else text[:397] + "...")


@dataclass
class Segment:
    """Provenance: `model` ran steps [start, end) in `seconds` of U-Net time, with a user's adapter if named.

    The adapter is recorded by name and by the sha256 of its content, so an image says
    exactly which version of a user's personalization made it.
    """

    model: str
    start: int
    end: int
    seconds: float
    where: str = "local"
    adapter: str | None = None
    adapter_sha256: str | None = None
    fingerprint: str | None = None  # of the U-Net's config (runner.model_fingerprint): which model this name was

    def as_json(self) -> dict:
        """Its fields; the optional ones only when set (files without them keep their old form)."""
        out = vars(self).copy()
        if self.adapter is None:
            del out["adapter"], out["adapter_sha256"]
        if self.fingerprint is None:
            del out["fingerprint"]
        return out


@dataclass
class Trajectory:
    latents: torch.Tensor  # 1 x C x h x w
    scheduler: Any  # a live diffusers scheduler, owned by this trajectory
    generator: torch.Generator  # CPU; the initial noise and ancestral samplers' noise
    prompt_embeds: torch.Tensor  # L x D
    negative_embeds: torch.Tensor  # L x D
    prompt_mask: torch.Tensor | None = None  # L (1 = token, 0 = padding)
    negative_mask: torch.Tensor | None = None
    prompt_added: dict[str, torch.Tensor] | None = None  # SDXL: {"text_embeds": P, "time_ids": 6}
    negative_added: dict[str, torch.Tensor] | None = None
    guidance_scale: float = 5.0
    seed: int = 0
    step_index: int = 0  # the next step to run
    prompt: str = ""
    negative_prompt: str = ""
    provenance: list[Segment] = field(default_factory=list)
    degraded: bool = False

    # -- where it stands --------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def remaining(self) -> int:
        return self.num_steps - self.step_index

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.step_index]

    @property
    def scheduler_name(self) -> str:
        return schedulers.scheduler_name(self.scheduler)

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    def record(self, model: str, steps: int, seconds: float, where: str = "local", adapter: str | None = None,
               adapter_sha256: str | None = None, fingerprint: str | None = None) -> None:
        last = self.provenance[-1] if self.provenance else None
        same = (model, where, adapter, adapter_sha256, fingerprint)
        if last and (last.model, last.where, last.adapter, last.adapter_sha256, last.fingerprint) == same \
                and last.end == self.step_index - steps:
            last.end, last.seconds = self.step_index, last.seconds + seconds
        else:
            self.provenance.append(Segment(model, self.step_index - steps, self.step_index, seconds, where, adapter,
                                           adapter_sha256, fingerprint))

    def fork(self, n: int) -> list["Trajectory"]:
        """`n` independent copies of this state, bit for bit (latents, scheduler, RNG, provenance).

        One shared prefix branched into suffixes that run on: each branch computes exactly
        what a separate run to this step and on would have. The copies go through the
        trajectory's own bytes, so they share nothing with this one or with each other.
        """
        if n < 0:
            raise ValueError(f"cannot fork into {n} branches")
        data = self.to_bytes()
        return [Trajectory.from_bytes(data) for _ in range(n)]

    # -- bytes --------------------------------------------------------------------
    def to_bytes(self, half: bool = False) -> bytes:
        """safetensors bytes; `half` stores floating tensors as fp16 (smaller, not bit-exact)."""
        sched_tensors, sched_state = schedulers.snapshot(self.scheduler)
        tensors = {
            "latents": self.latents,
            "prompt_embeds": self.prompt_embeds,
            "negative_embeds": self.negative_embeds,
            "generator_state": self.generator.get_state(),
            **{f"sched.{k}": v for k, v in sched_tensors.items()},
        }
        if self.prompt_mask is not None:
            tensors["prompt_mask"] = self.prompt_mask
        if self.negative_mask is not None:
            tensors["negative_mask"] = self.negative_mask
        for side in ("prompt_added", "negative_added"):
            tensors.update({f"{side}.{k}": v for k, v in (getattr(self, side) or {}).items()})
        if half:
            tensors = {k: v.half() if v.dtype == torch.float32 and not k.startswith("sched.timesteps") else v
                       for k, v in tensors.items()}
        meta = {
            "format": FORMAT, "version": VERSION, "half": half,
            "scheduler": {"name": self.scheduler_name, "config": schedulers.config_of(self.scheduler),
                          "num_inference_steps": self.num_steps, "state": sched_state},
            "step_index": self.step_index, "guidance_scale": self.guidance_scale, "seed": self.seed,
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "degraded": self.degraded,
            "provenance": [s.as_json() for s in self.provenance], "diffusers": diffusers.__version__,
        }
        return st_save({k: v.contiguous().cpu() for k, v in tensors.items()},
                       metadata={"splitdiff": json.dumps(meta, default=_json_default)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "Trajectory":
        """The trajectory in `data`, every field checked first; a TrajectoryError (one line) names what is wrong.

        This is the one way in for files and for the wire alike: nothing is built, and no
        tensor is read, before the header and the metadata have passed the checks.
        """
        try:
            return _load(data)
        except TrajectoryError:
            raise
        except UserError as e:
            raise TrajectoryError(f"invalid trajectory: {e}") from None
        except (SafetensorError, LookupError, TypeError, ValueError, RuntimeError, AttributeError,
                ArithmeticError) as e:
            raise TrajectoryError(f"invalid trajectory: {type(e).__name__}: {_first_line(e)}") from None


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise TrajectoryError(f"invalid trajectory: {what}")


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _is_number(v: Any, lo: float, hi: float) -> bool:
    if type(v) not in (int, float) or (type(v) is float and not math.isfinite(v)):
        return False
    return lo <= v <= hi


def _is_text(v: Any, limit: int) -> bool:
    return isinstance(v, str) and len(v) <= limit


META_KEYS = ("format", "version", "half", "scheduler", "step_index", "guidance_scale", "seed", "prompt",
             "negative_prompt", "degraded", "provenance")
OPTIONAL_META_KEYS = ("diffusers",)  # the diffusers version that wrote it (files from before carry none)
SCHEDULER_KEYS = ("name", "config", "num_inference_steps", "state")
SEGMENT_KEYS = ("model", "start", "end", "seconds", "where")
ADAPTER_KEYS = ("adapter", "adapter_sha256")
_FLOAT_CODES = ("F32", "F16")


def _short_int(text: str) -> int:
    """JSON integers as Python reads them, but none longer than any field allows (a seed has 20 digits)."""
    if len(text) > 40:
        raise ValueError(f"it holds an integer of {len(text)} digits")
    return int(text)


def _read_header(data: bytes) -> tuple[dict, dict]:
    """(the tensors' header entries, the splitdiff metadata), from bounded JSON only."""
    _need(isinstance(data, (bytes, bytearray)), f"got {type(data).__name__}, not bytes")
    if len(data) > MAX_BYTES:
        raise TrajectoryError(f"invalid trajectory: {len(data)} bytes is more than any trajectory ({MAX_BYTES})")
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < n <= min(MAX_HEADER_BYTES, len(data) - 8):
        raise TrajectoryError("not a readable trajectory (corrupt or truncated): bad header length")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TrajectoryError("not a readable trajectory (corrupt or truncated): its header is not JSON") from None
    _need(isinstance(header, dict), "its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not isinstance(metadata.get("splitdiff"), str):
        raise TrajectoryError("not a splitdiff trajectory: its header has no splitdiff metadata")
    _need(set(metadata) == {"splitdiff"}, "its header holds metadata besides splitdiff's")
    try:
        meta = json.loads(metadata["splitdiff"], parse_int=_short_int)
    except (ValueError, RecursionError) as e:
        raise TrajectoryError(f"trajectory metadata is not valid JSON: {_first_line(e)}") from None
    return header, meta


def _check_meta(meta: Any) -> dict:
    """The metadata's fields, each checked for type and range (the scheduler's by `schedulers`)."""
    _need(isinstance(meta, dict) and meta.get("format") == FORMAT, "format is not splitdiff.trajectory")
    _need(type(meta.get("version")) is int and meta["version"] == VERSION,
          f"format version {_show(meta.get('version'))} is not {VERSION}")
    for key in meta:
        _need(key in META_KEYS or key in OPTIONAL_META_KEYS, f"unknown field {_show(key)}")
    if "diffusers" in meta:
        _need(_is_text(meta["diffusers"], 40) and re.fullmatch(r"[0-9A-Za-z.+\-]+", meta["diffusers"]),
              "diffusers is not a version string")
    for key in META_KEYS:
        _need(key in meta, f"missing field {key!r}")
    _need(type(meta["half"]) is bool, f"half is {_show(meta['half'])}, not true or false")
    _need(type(meta["degraded"]) is bool, f"degraded is {_show(meta['degraded'])}, not true or false")
    _need(_is_number(meta["guidance_scale"], 0.0, MAX_GUIDANCE),
          f"guidance_scale is {_show(meta['guidance_scale'])}, not a finite number in 0..{MAX_GUIDANCE:g}")
    _need(_is_int(meta["seed"], SEED_MIN, SEED_MAX), f"seed is {_show(meta['seed'])}, not an integer in "
          f"{SEED_MIN}..{SEED_MAX}")
    for key in ("prompt", "negative_prompt"):
        _need(_is_text(meta[key], MAX_PROMPT_CHARS), f"{key} is not text of at most {MAX_PROMPT_CHARS} characters")
    s = meta["scheduler"]
    _need(isinstance(s, dict) and set(s) == set(SCHEDULER_KEYS),
          f"scheduler is not an object with exactly {', '.join(SCHEDULER_KEYS)}")
    _need(_is_int(meta["step_index"], 0, schedulers.MAX_STEPS),
          f"step_index is {_show(meta['step_index'])}, not an integer in 0..{schedulers.MAX_STEPS}")
    return meta


def _check_provenance(items: Any, step_index: int) -> list[Segment]:
    _need(isinstance(items, list) and len(items) <= MAX_SEGMENTS,
          f"provenance is not a list of at most {MAX_SEGMENTS} segments")
    out = []
    for i, p in enumerate(items):
        _need(isinstance(p, dict) and set(p) - {"fingerprint"} in (set(SEGMENT_KEYS), set(SEGMENT_KEYS + ADAPTER_KEYS)),
              f"provenance[{i}] is not an object with exactly {', '.join(SEGMENT_KEYS)} (and optionally "
              f"{', '.join(ADAPTER_KEYS)}, fingerprint)")
        if "fingerprint" in p:
            _need(isinstance(p["fingerprint"], str) and re.fullmatch(r"[0-9a-f]{16}", p["fingerprint"]),
                  f"provenance[{i}].fingerprint is not 16 hexadecimal digits")
        if "adapter" in p:
            _need(_is_text(p["adapter"], MAX_NAME_CHARS) and p["adapter"], f"provenance[{i}].adapter is not a name "
                  f"of at most {MAX_NAME_CHARS} characters")
            _need(isinstance(p["adapter_sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", p["adapter_sha256"]),
                  f"provenance[{i}].adapter_sha256 is not 64 hexadecimal digits")
        for key in ("model", "where"):
            _need(_is_text(p[key], MAX_NAME_CHARS), f"provenance[{i}].{key} is not text of at most "
                  f"{MAX_NAME_CHARS} characters")
        _need(_is_int(p["start"], 0, step_index) and _is_int(p["end"], p["start"], step_index),
              f"provenance[{i}] steps {_show(p['start'])}..{_show(p['end'])} are not within 0..{step_index}")
        _need(_is_number(p["seconds"], 0.0, math.inf), f"provenance[{i}].seconds is {_show(p['seconds'])}, "
              "not a finite number >= 0")
        out.append(Segment(p["model"], p["start"], p["end"], float(p["seconds"]), p["where"], p.get("adapter"),
                           p.get("adapter_sha256"), p.get("fingerprint")))
    return out


def _entry(header: dict, key: str) -> tuple[str, tuple[int, ...]]:
    e = header[key]
    ok = isinstance(e, dict) and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list) \
        and len(e["shape"]) <= 8 and all(_is_int(d, 0, 2 ** 31) for d in e["shape"])
    _need(ok, f"tensor {key} has a malformed header entry")
    return e["dtype"], tuple(e["shape"])


def _check_static_tensors(header: dict) -> tuple[int, ...]:
    """Check the non-scheduler tensors' dtypes and shapes from the header; the latents' shape."""
    for key in ("latents", "prompt_embeds", "negative_embeds", "generator_state"):
        _need(key in header, f"missing tensor {key!r}")
    dtype, lat = _entry(header, "latents")
    _need(dtype in _FLOAT_CODES, f"latents have dtype {dtype}, not F32/F16")
    _need(len(lat) == 4 and lat[0] == 1 and 1 <= lat[1] <= MAX_CHANNELS
          and all(MIN_SIDE <= x <= MAX_SIDE for x in lat[2:]),
          f"latents have shape {lat}, not 1 x C x h x w with C in 1..{MAX_CHANNELS} and h, w in "
          f"{MIN_SIDE}..{MAX_SIDE}")
    shapes = {}
    for key in ("prompt_embeds", "negative_embeds"):
        dtype, shapes[key] = _entry(header, key)
        _need(dtype in _FLOAT_CODES, f"{key} have dtype {dtype}, not F32/F16")
        shape = shapes[key]
        _need(len(shape) == 2 and 1 <= shape[0] <= MAX_TOKENS and 1 <= shape[1] <= MAX_WIDTH,
              f"{key} have shape {shape}, not L x D with L in 1..{MAX_TOKENS} and D in 1..{MAX_WIDTH}")
    _need(shapes["prompt_embeds"] == shapes["negative_embeds"], "prompt_embeds and negative_embeds differ in shape")
    for key in ("prompt_mask", "negative_mask"):
        if key in header:
            dtype, shape = _entry(header, key)
            _need(dtype == "I64" and shape == shapes["prompt_embeds"][:1],
                  f"{key} is not I64 of the embeddings' length {shapes['prompt_embeds'][0]}")
    dtype, shape = _entry(header, "generator_state")
    _need(dtype == "U8" and shape == (GENERATOR_STATE_BYTES,),
          f"generator_state is not {GENERATOR_STATE_BYTES} bytes (U8)")
    _check_added_entries(header)
    return lat


def _check_added_entries(header: dict) -> None:
    """prompt_added.* and negative_added.*: the same known keys on both sides, 1-D floats of the same shapes."""
    sides = {side: {k[len(side) + 1:]: _entry(header, k) for k in header if k.startswith(side + ".")}
             for side in ("prompt_added", "negative_added")}
    for side, entries in sides.items():
        for key, (dtype, shape) in entries.items():
            _need(key in ADDED_KEYS, f"unexpected tensor {_show(side + '.' + key)}")
            _need(dtype in _FLOAT_CODES and len(shape) == 1 and 1 <= shape[0] <= ADDED_KEYS[key],
                  f"{side}.{key} is {dtype} {shape}, not F32/F16 of 1..{ADDED_KEYS[key]} values")
    _need(sides["prompt_added"] == sides["negative_added"],
          "prompt_added and negative_added differ in their tensors or shapes")
    if sides["prompt_added"].get("time_ids") is not None:
        _need(sides["prompt_added"]["time_ids"][1] == (6,), "time_ids are not 6 values")


STATIC_TENSORS = ("latents", "prompt_embeds", "negative_embeds", "generator_state", "prompt_mask", "negative_mask")


def _load(data: bytes) -> Trajectory:
    header, meta = _read_header(data)
    meta = _check_meta(meta)
    lat_shape = _check_static_tensors(header)
    s, step_index = meta["scheduler"], meta["step_index"]
    plan = schedulers.plan_restore(s["name"], s["config"], s["num_inference_steps"], s["state"],
                                   step_index=step_index, sample_shape=lat_shape)
    provenance = _check_provenance(meta["provenance"], step_index)
    for key in header:
        _need(key in STATIC_TENSORS or key.startswith(("prompt_added.", "negative_added."))
              or (key.startswith("sched.") and key[6:] in plan.tensors), f"unexpected tensor {_show(key)}")
    for key, (dtype, shape) in plan.tensors.items():
        _need(f"sched.{key}" in header, f"missing tensor 'sched.{key}'")
        code, got = _entry(header, f"sched.{key}")
        codes = _FLOAT_CODES if dtype == torch.float32 else ("I64",)
        _need(code in codes and got == shape, f"sched.{key} is {code} {got}, not {'/'.join(codes)} {shape}")
    try:
        tensors = st_load(bytes(data))
    except SafetensorError as e:
        raise TrajectoryError(f"not a readable trajectory (corrupt or truncated): {_first_line(e)}") from None
    for key, v in list(tensors.items()):
        if v.is_floating_point():
            v = tensors[key] = v.float()
            _need(bool(torch.isfinite(v).all()), f"{key} holds non-finite values")
            _need(float(v.abs().max()) <= schedulers.MAX_VALUE, f"{key} holds values beyond "
                  f"{schedulers.MAX_VALUE:g}")
    for key in ("prompt_mask", "negative_mask"):
        if key in tensors:
            _need(bool(((tensors[key] == 0) | (tensors[key] == 1)).all()), f"{key} holds values other than 0 and 1")
    scheduler = schedulers.restore_planned(plan, {k[6:]: v for k, v in tensors.items() if k.startswith("sched.")})
    generator = torch.Generator()
    try:
        generator.set_state(tensors["generator_state"])
    except RuntimeError:
        raise TrajectoryError("invalid trajectory: generator_state is not a valid RNG state") from None
    return Trajectory(
        latents=tensors["latents"], scheduler=scheduler, generator=generator, prompt_embeds=tensors["prompt_embeds"],
        negative_embeds=tensors["negative_embeds"], prompt_mask=tensors.get("prompt_mask"),
        negative_mask=tensors.get("negative_mask"), prompt_added=_added(tensors, "prompt_added"),
        negative_added=_added(tensors, "negative_added"), guidance_scale=float(meta["guidance_scale"]), seed=meta["seed"],
        step_index=step_index, prompt=meta["prompt"], negative_prompt=meta["negative_prompt"],
        provenance=provenance, degraded=meta["degraded"],
    )


def _added(tensors: dict, side: str) -> dict[str, torch.Tensor] | None:
    return {k[len(side) + 1:]: v for k, v in tensors.items() if k.startswith(side + ".")} or None


def _check_new(prompt_embeds, negative_embeds, prompt_mask, negative_mask, latent_shape, seed, guidance_scale,
               prompt, negative_prompt, prompt_added=None, negative_added=None) -> None:
    """What new_trajectory refuses: anything the loader would refuse when the trajectory comes back."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
            or not math.isfinite(guidance_scale) or not 0 <= guidance_scale <= MAX_GUIDANCE:
        raise UserError(f"guidance scale must be a finite number in 0..{MAX_GUIDANCE:g}, not {_show(guidance_scale)}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not SEED_MIN <= seed <= SEED_MAX:
        raise UserError(f"seed must be an integer in {SEED_MIN}..{SEED_MAX}, not {_show(seed)}")
    if len(latent_shape) != 3 or not 1 <= latent_shape[0] <= MAX_CHANNELS \
            or not all(MIN_SIDE <= x <= MAX_SIDE for x in latent_shape[1:]):
        raise UserError(f"latent shape {tuple(latent_shape)} is not C x h x w with C in 1..{MAX_CHANNELS} and "
                        f"h, w in {MIN_SIDE}..{MAX_SIDE}")
    if prompt_embeds.dim() != 2 or prompt_embeds.shape != negative_embeds.shape \
            or not 1 <= prompt_embeds.shape[0] <= MAX_TOKENS or not 1 <= prompt_embeds.shape[1] <= MAX_WIDTH:
        raise UserError(f"prompt and negative embeddings must both be L x D with L in 1..{MAX_TOKENS} and D in "
                        f"1..{MAX_WIDTH}; got {tuple(prompt_embeds.shape)} and {tuple(negative_embeds.shape)}")
    for emb in (prompt_embeds, negative_embeds):
        if not bool((torch.isfinite(emb) & (emb.abs() <= schedulers.MAX_VALUE)).all()):
            raise UserError(f"the embeddings hold non-finite values or values beyond {schedulers.MAX_VALUE:g}")
    for name, mask in (("prompt_mask", prompt_mask), ("negative_mask", negative_mask)):
        if mask is not None and tuple(mask.shape) != tuple(prompt_embeds.shape[:1]):
            raise UserError(f"{name} does not match the embeddings' length")
    shapes = [{k: (tuple(v.shape), bool(torch.isfinite(v).all())) for k, v in (a or {}).items()}
              for a in (prompt_added, negative_added)]
    if shapes[0] != shapes[1] or any(k not in ADDED_KEYS or len(shape) != 1 or not 1 <= shape[0] <= ADDED_KEYS[k]
                                     or not finite for k, (shape, finite) in shapes[0].items()):
        raise UserError("the added conditioning (pooled text embeddings, time ids) must be finite 1-D tensors, "
                        "the same keys and shapes for the prompt and the negative prompt")
    for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        if not _is_text(text, MAX_PROMPT_CHARS):
            raise UserError(f"the {name} must be text of at most {MAX_PROMPT_CHARS} characters")


def new_trajectory(prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, *, latent_shape: tuple[int, int, int],
                   scheduler: str = "dpmsolver++", steps: int = 25, seed: int = 0, guidance_scale: float = 5.0,
                   prompt_mask: torch.Tensor | None = None, negative_mask: torch.Tensor | None = None,
                   noise_schedule: dict | None = None, prompt: str = "", negative_prompt: str = "",
                   prompt_added: dict[str, torch.Tensor] | None = None,
                   negative_added: dict[str, torch.Tensor] | None = None) -> Trajectory:
    """A trajectory at step 0: seeded noise scaled as StableDiffusionPipeline scales it.

    `prompt_added` / `negative_added`: the U-Net's added conditioning for each side (SDXL's
    pooled text embeddings and time ids), carried with the trajectory like its embeddings.
    """
    _check_new(prompt_embeds, negative_embeds, prompt_mask, negative_mask, latent_shape, seed, guidance_scale,
               prompt, negative_prompt, prompt_added, negative_added)
    sched = schedulers.make_scheduler(scheduler, noise_schedule, steps)
    generator = torch.Generator().manual_seed(int(seed))
    latents = randn_tensor((1, *latent_shape), generator=generator, dtype=torch.float32) * sched.init_noise_sigma
    def added(a):
        return None if not a else {k: v.detach().float().cpu().clone() for k, v in a.items()}

    return Trajectory(latents, sched, generator, prompt_embeds.float(), negative_embeds.float(),
                      None if prompt_mask is None else prompt_mask.long(),
                      None if negative_mask is None else negative_mask.long(), added(prompt_added),
                      added(negative_added), float(guidance_scale), int(seed), 0, prompt, negative_prompt)
