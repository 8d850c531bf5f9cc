"""diffusers schedulers by name, and their mid-flight state as plain tensors + JSON.

The schedulers are used exactly as diffusers ships them. To pause one, we record
every attribute that differs from a fresh scheduler built from the same config with
the same `set_timesteps` (the DPM-Solver++ history, step indices, ...), plus the
schedule itself. To resume, we rebuild the fresh scheduler and put those back.
This works for any scheduler whose state lives in tensors, lists of tensors and
scalars, which is every scheduler diffusers ships in this family.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from ..errors import UserError

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
}
# Stable Diffusion's noise schedule, which the embedded family is trained with.
SD_NOISE_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False,
)
ALWAYS_KEPT = ("timesteps", "sigmas")  # the schedule travels with every trajectory


def scheduler_name(scheduler) -> str:
    for name, cls in SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    raise UserError(f"unsupported scheduler {type(scheduler).__name__}; choose one of {', '.join(SCHEDULERS)}")


def make_scheduler(name: str, config: dict | None = None, num_inference_steps: int | None = None):
    """A fresh scheduler of kind `name` over the noise schedule `config`."""
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cfg = dict(SD_NOISE_SCHEDULE if config is None else config)
    if name == "dpmsolver++":
        cfg.setdefault("algorithm_type", "dpmsolver++")
    scheduler = SCHEDULERS[name].from_config(cfg)
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    return scheduler


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype \
            and torch.equal(a, b)
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) \
            and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def snapshot(scheduler) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) describing where `scheduler` is, relative to a fresh copy of itself."""
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(scheduler.num_inference_steps)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    lists: dict[str, list[bool]] = {}
    for key, value in vars(scheduler).items():
        if key.startswith("_internal") or (key not in ALWAYS_KEPT and _same(value, getattr(fresh, key, None))):
            continue
        if torch.is_tensor(value):
            tensors[key] = value
        elif isinstance(value, list) and all(v is None or torch.is_tensor(v) for v in value):
            lists[key] = [v is not None for v in value]
            tensors.update({f"{key}.{i}": v for i, v in enumerate(value) if v is not None})
        elif value is None or isinstance(value, (bool, int, float, str)):
            scalars[key] = value
        else:
            raise TypeError(f"cannot snapshot scheduler attribute {key} of type {type(value).__name__}")
    return tensors, {"scalars": scalars, "lists": lists}


def restore(name: str, config: dict, num_inference_steps: int, tensors: dict[str, torch.Tensor], state: dict):
    """The scheduler `snapshot` described, rebuilt from its config."""
    scheduler = make_scheduler(name, config, num_inference_steps)
    for key, value in state["scalars"].items():
        setattr(scheduler, key, value)
    for key, present in state["lists"].items():
        setattr(scheduler, key, [tensors[f"{key}.{i}"] if p else None for i, p in enumerate(present)])
    for key, value in tensors.items():
        if key.split(".")[0] not in state["lists"]:
            setattr(scheduler, key, value)
    return scheduler
