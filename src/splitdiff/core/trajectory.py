"""Trajectory: one generation's complete state between two denoising steps.

Everything the next step needs travels with it: the latents, the scheduler (its
schedule and internal history), the RNG of ancestral samplers, the guidance scale,
the prompt embeddings (so the device that resumes needs no text encoder), the seed,
and a record of which model ran which steps. It serializes to safetensors with a
versioned JSON header; loading validates everything and never unpickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import UserError
from . import schedulers

FORMAT = "splitdiff.trajectory"
VERSION = 1


class TrajectoryError(UserError):
    """A trajectory file or body that cannot be trusted: corrupt, truncated, wrong version or shape."""


@dataclass
class Segment:
    """Provenance: `model` ran steps [start, end) in `seconds` of U-Net time."""

    model: str
    start: int
    end: int
    seconds: float
    where: str = "local"


@dataclass
class Trajectory:
    latents: torch.Tensor  # 1 x C x h x w
    scheduler: Any  # a live diffusers scheduler, owned by this trajectory
    generator: torch.Generator  # CPU; the initial noise and ancestral samplers' noise
    prompt_embeds: torch.Tensor  # L x D
    negative_embeds: torch.Tensor  # L x D
    prompt_mask: torch.Tensor | None = None  # L (1 = token, 0 = padding)
    negative_mask: torch.Tensor | None = None
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

    def record(self, model: str, steps: int, seconds: float, where: str = "local") -> None:
        last = self.provenance[-1] if self.provenance else None
        if last and last.model == model and last.where == where and last.end == self.step_index - steps:
            last.end, last.seconds = self.step_index, last.seconds + seconds
        else:
            self.provenance.append(Segment(model, self.step_index - steps, self.step_index, seconds, where))

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
        if half:
            tensors = {k: v.half() if v.dtype == torch.float32 and not k.startswith("sched.timesteps") else v
                       for k, v in tensors.items()}
        meta = {
            "format": FORMAT, "version": VERSION, "half": half,
            "scheduler": {"name": self.scheduler_name, "config": dict(self.scheduler.config),
                          "num_inference_steps": self.num_steps, "state": sched_state},
            "step_index": self.step_index, "guidance_scale": self.guidance_scale, "seed": self.seed,
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "degraded": self.degraded,
            "provenance": [vars(s) for s in self.provenance],
        }
        return st_save({k: v.contiguous().cpu() for k, v in tensors.items()},
                       metadata={"splitdiff": json.dumps(meta, default=_json_default)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "Trajectory":
        try:
            tensors = st_load(data)
            header_len = int.from_bytes(data[:8], "little")
            meta_raw = json.loads(data[8:8 + header_len]).get("__metadata__", {}).get("splitdiff")
        except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError, IndexError) as e:
            raise TrajectoryError(f"not a readable trajectory (corrupt or truncated): {_first_line(e)}") from None
        if meta_raw is None:
            raise TrajectoryError("not a splitdiff trajectory: its header has no splitdiff metadata")
        try:
            meta = json.loads(meta_raw)
        except ValueError:
            raise TrajectoryError("trajectory metadata is not valid JSON") from None
        return _validated(tensors, meta)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _validated(tensors: dict[str, torch.Tensor], meta: dict) -> Trajectory:
    def need(cond: bool, what: str):
        if not cond:
            raise TrajectoryError(f"invalid trajectory: {what}")

    need(isinstance(meta, dict) and meta.get("format") == FORMAT, "format is not splitdiff.trajectory")
    need(meta.get("version") == VERSION, f"format version {meta.get('version')!r} is not {VERSION}")
    for key in ("latents", "prompt_embeds", "negative_embeds", "generator_state"):
        need(key in tensors, f"missing tensor {key!r}")
    floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
    for k, v in floats.items():
        need(v.dtype in (torch.float16, torch.float32), f"{k} has dtype {v.dtype}, not fp16/fp32")
        need(bool(torch.isfinite(v).all()), f"{k} holds non-finite values")
    tensors = {k: v.float() if k in floats and v.dtype == torch.float16 else v for k, v in tensors.items()}
    lat, emb, neg = tensors["latents"], tensors["prompt_embeds"], tensors["negative_embeds"]
    need(lat.dim() == 4 and lat.shape[0] == 1, f"latents have shape {tuple(lat.shape)}, not 1 x C x h x w")
    need(emb.dim() == 2 and emb.shape == neg.shape, "prompt and negative embeddings must both be L x D")
    for key in ("prompt_mask", "negative_mask"):
        if key in tensors:
            need(tensors[key].shape == emb.shape[:1], f"{key} does not match the embeddings' length")
    need(tensors["generator_state"].dtype == torch.uint8, "generator_state is not a byte tensor")
    try:
        s = meta["scheduler"]
        steps, step_index = int(s["num_inference_steps"]), int(meta["step_index"])
        need(0 <= step_index <= steps, f"step index {step_index} outside 0..{steps}")
        sched_tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("sched.")}
        scheduler = schedulers.restore(s["name"], s["config"], steps, sched_tensors, s["state"])
        need(len(scheduler.timesteps) == steps, "the timestep schedule does not have num_inference_steps entries")
        generator = torch.Generator()
        generator.set_state(tensors["generator_state"])
        provenance = [Segment(**p) for p in meta.get("provenance", [])]
    except TrajectoryError:
        raise
    except UserError as e:
        raise TrajectoryError(f"invalid trajectory: {e}") from None
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise TrajectoryError(f"invalid trajectory: {type(e).__name__}: {_first_line(e)}") from None
    return Trajectory(
        latents=lat, scheduler=scheduler, generator=generator, prompt_embeds=emb, negative_embeds=neg,
        prompt_mask=tensors.get("prompt_mask"), negative_mask=tensors.get("negative_mask"),
        guidance_scale=float(meta["guidance_scale"]), seed=int(meta["seed"]), step_index=step_index,
        prompt=str(meta.get("prompt", "")), negative_prompt=str(meta.get("negative_prompt", "")),
        provenance=provenance, degraded=bool(meta.get("degraded", False)),
    )


def new_trajectory(prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, *, latent_shape: tuple[int, int, int],
                   scheduler: str = "dpmsolver++", steps: int = 25, seed: int = 0, guidance_scale: float = 5.0,
                   prompt_mask: torch.Tensor | None = None, negative_mask: torch.Tensor | None = None,
                   noise_schedule: dict | None = None, prompt: str = "", negative_prompt: str = "") -> Trajectory:
    """A trajectory at step 0: seeded noise scaled as StableDiffusionPipeline scales it."""
    if steps < 1:
        raise UserError(f"steps must be at least 1, not {steps}")
    sched = schedulers.make_scheduler(scheduler, noise_schedule, steps)
    generator = torch.Generator().manual_seed(seed)
    latents = randn_tensor((1, *latent_shape), generator=generator, dtype=torch.float32) * sched.init_noise_sigma
    return Trajectory(latents, sched, generator, prompt_embeds.float(), negative_embeds.float(), prompt_mask,
                      negative_mask, guidance_scale, seed, 0, prompt, negative_prompt)
