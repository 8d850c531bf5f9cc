"""diffusers schedulers by name, and their mid-flight state as plain tensors + JSON.

The schedulers are used exactly as diffusers ships them. To pause one, we record
every attribute that differs from a fresh scheduler built from the same config with
the same `set_timesteps` (the DPM-Solver++ history, step indices, ...), plus the
schedule itself. To resume, we rebuild the fresh scheduler and put those back.

A state may come from anyone (a file, the wire), so nothing in it reaches diffusers
unchecked: config keys, step counts and state attributes are held to the explicit
tables below, and a schedule that diffusers builds wrongly is refused, not run.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from ..errors import UserError
from .limits import MAX_STEPS

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
# What a pipeline folder's scheduler config says about the model: how it was trained (betas,
# prediction) and how its steps are spaced. Its solver settings (algorithm_type, Karras sigmas,
# order, ...) belong to the scheduler it ships, not to the one a plan names: taken along, they
# would run, say, SDE-DPM-Solver++ under the name dpmsolver++.
NOISE_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                       "prediction_type", "steps_offset", "timestep_spacing", "rescale_betas_zero_snr")
ALWAYS_KEPT = ("timesteps", "sigmas")  # the schedule travels with every trajectory

MAX_TRAIN_TIMESTEPS = 1000
# float16's largest finite value: no real generation's state goes beyond it, and a half file could not carry it.
MAX_VALUE = 65504.0


# -- config: the keys each scheduler takes, with their types and ranges --------------------
@dataclass(frozen=True)
class Spec:
    what: str
    test: Callable[[Any], bool]

    def ok(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError, OverflowError):
            return False


def _int(lo: int, hi: int) -> Spec:
    return Spec(f"an integer in {lo}..{hi}", lambda v: type(v) is int and lo <= v <= hi)


def _float(lo: float, hi: float, *, lo_open: bool = True, neg_inf: bool = False) -> Spec:
    def test(v):
        if type(v) not in (int, float):
            return False
        if neg_inf and v == -math.inf:
            return True
        if type(v) is float and not math.isfinite(v):
            return False
        return (lo < v if lo_open else lo <= v) and v <= hi

    low = "-inf or " if neg_inf else ""
    return Spec(f"{low}a finite number in {'(' if lo_open else '['}{lo}, {hi}]", test)


def _one_of(*values) -> Spec:
    return Spec(" or ".join(json.dumps(v) for v in values),
                lambda v: any(type(v) is type(x) and v == x for x in values))


def _none_or(spec: Spec) -> Spec:
    return Spec(f"null or {spec.what}", lambda v: v is None or spec.ok(v))


BOOL = _one_of(False, True)
_COMMON = {
    "num_train_timesteps": _int(1, MAX_TRAIN_TIMESTEPS),
    "beta_start": _float(0, 0.999999),
    "beta_end": _float(0, 0.999999),
    "beta_schedule": _one_of("linear", "scaled_linear", "squaredcos_cap_v2"),
    "trained_betas": _one_of(None),
    "prediction_type": _one_of("epsilon", "v_prediction", "sample"),
    "timestep_spacing": _one_of("leading", "trailing", "linspace"),
    "steps_offset": _int(0, 1),
    "rescale_betas_zero_snr": BOOL,
}
_THRESHOLDING = {
    "thresholding": BOOL, "dynamic_thresholding_ratio": _float(0, 1), "sample_max_value": _float(0, MAX_VALUE),
}
_SIGMA_SPACING = {"use_karras_sigmas": BOOL, "use_exponential_sigmas": BOOL, "use_beta_sigmas": BOOL}
CONFIG: dict[str, dict[str, Spec]] = {
    "ddim": {**_COMMON, **_THRESHOLDING, "clip_sample": BOOL, "set_alpha_to_one": BOOL,
             "clip_sample_range": _float(0, MAX_VALUE)},
    "dpmsolver++": {
        **_COMMON, **_THRESHOLDING, **_SIGMA_SPACING, "solver_order": _int(1, 3),
        "algorithm_type": _one_of("dpmsolver++"), "solver_type": _one_of("midpoint", "heun"),
        "lower_order_final": BOOL, "euler_at_final": BOOL, "use_lu_lambdas": BOOL, "use_flow_sigmas": _one_of(False),
        "flow_shift": _float(0, 100), "final_sigmas_type": _one_of("zero", "sigma_min"),
        "lambda_min_clipped": _float(-1e4, 0, lo_open=False, neg_inf=True), "variance_type": _one_of(None),
        "use_dynamic_shifting": _one_of(False), "time_shift_type": _one_of("exponential"),
    },
    "euler": {
        **_COMMON, **_SIGMA_SPACING, "interpolation_type": _one_of("linear", "log_linear"),
        "sigma_min": _none_or(_float(0, MAX_VALUE)), "sigma_max": _none_or(_float(0, MAX_VALUE)),
        "timestep_type": _one_of("discrete"), "final_sigmas_type": _one_of("zero", "sigma_min"),
    },
    "euler-a": {**_COMMON, "prediction_type": _one_of("epsilon", "v_prediction")},
}
# Keys diffusers keeps in a config for the schedulers it could be switched to; ignored when loading.
_CARRIED = {"_use_default_values"}.union(*CONFIG.values())

# -- state: what `snapshot` records past the schedule ----------------------------------------
# Found by snapshotting each scheduler after every step of runs over several configs and
# solver orders (diffusers 0.42). At step 0 there is nothing; at step k > 0, with
# n = min(k, solver_order):
#   ddim          -
#   dpmsolver++   scalars lower_order_nums = n, _step_index = k;
#                 list model_outputs: solver_order entries, the last n held, each shaped like the latents
#   euler         scalars is_scale_input_called = True, _step_index = k
#   euler-a       as euler
# The schedule itself: timesteps (steps entries) and, where the scheduler has them, sigmas (steps + 1).
STATE_ATTRIBUTES = {
    "ddim": (),
    "dpmsolver++": ("lower_order_nums", "_step_index", "model_outputs"),
    "euler": ("is_scale_input_called", "_step_index"),
    "euler-a": ("is_scale_input_called", "_step_index"),
}
SCHEDULE = {  # schedule tensor -> (dtype, entries beyond steps)
    "ddim": {"timesteps": (torch.int64, 0)},
    "dpmsolver++": {"timesteps": (torch.int64, 0), "sigmas": (torch.float32, 1)},
    "euler": {"timesteps": (torch.float32, 0), "sigmas": (torch.float32, 1)},
    "euler-a": {"timesteps": (torch.float32, 0), "sigmas": (torch.float32, 1)},
}


def scheduler_name(scheduler) -> str:
    for name, cls in SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    raise UserError(f"unsupported scheduler {type(scheduler).__name__}; choose one of {', '.join(SCHEDULERS)}")


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {_show(name)}; choose one of {', '.join(SCHEDULERS)}")


def check_config(name: str, config: Any, *, strict: bool = False) -> dict:
    """The keys of `config` that scheduler `name` takes, each checked against CONFIG.

    Other keys are dropped; `strict` (for states from elsewhere) refuses any that no
    scheduler here takes.
    """
    _check_name(name)
    if not isinstance(config, dict):
        raise UserError(f"the scheduler config is {_show(config)}, not an object")
    allowed, out = CONFIG[name], {}
    for key, value in config.items():
        spec = allowed.get(key)
        if spec is None:
            if strict and key not in _CARRIED:
                raise UserError(f"scheduler config key {_show(key)} is not one that {name} takes")
            continue
        if not spec.ok(value):
            raise UserError(f"scheduler config {key} is {_show(value)}, not {spec.what}")
        out[key] = value
    if out.get("beta_start", 0) > out.get("beta_end", 1):
        raise UserError("scheduler config beta_start exceeds beta_end")
    return out


def config_of(scheduler) -> dict:
    """The scheduler's config as a trajectory carries it: the keys its class takes."""
    return {k: v for k, v in scheduler.config.items() if k in CONFIG[scheduler_name(scheduler)]}


def max_steps(config: dict | None = None, name: str | None = None) -> int:
    """The most inference steps the noise schedule `config` spaces properly, at most MAX_STEPS.

    With "leading" spacing (Stable Diffusion's) the stride is num_train_timesteps // steps:
    past half the training timesteps it is 1 and the schedule starts near t = steps
    instead of the top, so half is the limit. "trailing" and "linspace" spread the steps
    over every timestep (diffusers' "trailing" makes one timestep too many at some counts,
    e.g. 61 of 1000; make_scheduler refuses those). DPM-Solver++ places steps + 1 points,
    so one step fewer fits.
    Without `name`, the limit of the schedulers that allow the most.
    """
    cfg = SD_NOISE_SCHEDULE if config is None else config
    train = cfg.get("num_train_timesteps", 1000)
    spacing = cfg.get("timestep_spacing", "leading")
    extra_point = 1 if name == "dpmsolver++" else 0
    if spacing == "leading":
        n = train // 2 - extra_point
    elif spacing == "linspace":
        n = train - extra_point
    else:
        n = train
    return max(0, min(MAX_STEPS, n))


def _build(name: str, cfg: dict):
    """The scheduler of `name` over an already checked config, without a schedule yet."""
    cfg = dict(cfg)
    if name == "dpmsolver++":
        cfg.setdefault("algorithm_type", "dpmsolver++")
    try:
        return SCHEDULERS[name].from_config(cfg)
    except (ValueError, TypeError, NotImplementedError, ImportError, ZeroDivisionError, OverflowError) as e:
        raise UserError(f"scheduler {name} cannot be built from this config: {_first_line(e)}") from None


def _check_steps(name: str, scheduler, steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise UserError(f"steps must be an integer, not {_show(steps)}")
    limit = max_steps(scheduler.config, name)
    if not 1 <= steps <= limit:
        cfg = scheduler.config
        raise UserError(f"{name} over {cfg.num_train_timesteps} training timesteps with {cfg.timestep_spacing} "
                        f"spacing takes 1..{limit} steps, not {_show(steps)}")
    return int(steps)


def _set_schedule(name: str, scheduler, steps: int) -> None:
    """set_timesteps, then refuse a schedule that is not `steps` strictly decreasing, in-range timesteps."""
    try:
        scheduler.set_timesteps(steps)
    except (ValueError, TypeError, IndexError, RuntimeError, ZeroDivisionError, OverflowError) as e:
        raise UserError(f"{name} cannot make a schedule of {steps} steps from this config: {_first_line(e)}") from None
    cfg = scheduler.config
    t = scheduler.timesteps
    bad = None
    if not torch.is_tensor(t) or t.dim() != 1 or len(t) != steps:
        bad = f"{0 if not torch.is_tensor(t) else t.numel()} timesteps"
    else:
        td = t.double()
        if not bool(torch.isfinite(td).all()) or td.min() < 0 or td.max() > cfg.num_train_timesteps - 1:
            bad = "timesteps outside 0..num_train_timesteps - 1"
        elif steps > 1 and not bool((td[1:] < td[:-1]).all()):
            bad = "timesteps that are not strictly decreasing"
        elif (steps > 1 and cfg.timestep_spacing == "leading"
              and not any(cfg.get(k, False) for k in (*_SIGMA_SPACING, "use_lu_lambdas"))
              and float((td[:-1] - td[1:]).min()) < 2):
            bad = "a stride of one timestep (it would start far from pure noise)"
    sigmas = getattr(scheduler, "sigmas", None)
    if bad is None and torch.is_tensor(sigmas):
        if sigmas.shape != (steps + 1,) or not bool(torch.isfinite(sigmas).all()) or bool((sigmas < 0).any()):
            bad = "sigmas that are not steps + 1 finite, non-negative values"
    if bad is None:
        try:
            init = float(scheduler.init_noise_sigma)
        except (TypeError, ValueError, RuntimeError):
            init = math.nan
        if not (math.isfinite(init) and 0 < init <= MAX_VALUE):
            bad = f"an initial noise sigma of {init}"
    if bad:
        raise UserError(f"{name} makes {bad} for {steps} steps with this config; choose fewer steps "
                        f"or another spacing")


def make_scheduler(name: str, config: dict | None = None, num_inference_steps: int | None = None):
    """A fresh scheduler of kind `name` over the noise schedule `config`, with a checked schedule."""
    scheduler = _build(name, check_config(name, SD_NOISE_SCHEDULE if config is None else config))
    if num_inference_steps is not None:
        _set_schedule(name, scheduler, _check_steps(name, scheduler, num_inference_steps))
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


def _expected_state(name: str, step_index: int, order: int) -> tuple[dict, dict]:
    """The scalars and lists `snapshot` records for scheduler `name` at `step_index` (see the table above)."""
    if step_index == 0 or name == "ddim":
        return {}, {}
    if name == "dpmsolver++":
        n = min(step_index, order)
        return {"lower_order_nums": n, "_step_index": step_index}, {"model_outputs": [False] * (order - n) + [True] * n}
    return {"is_scale_input_called": True, "_step_index": step_index}, {}


@dataclass
class StatePlan:
    """A checked state, before any tensor is looked at: the scheduler to restore into and the tensors it needs."""

    name: str
    scheduler: Any  # built from the checked config, without a schedule yet
    steps: int
    scalars: dict
    lists: dict
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # name -> (dtype after loading, shape)


def plan_restore(name: Any, config: Any, num_inference_steps: Any, state: Any, *, step_index: int,
                 sample_shape: tuple[int, ...]) -> StatePlan:
    """Check a state's JSON against the tables; say which tensors it needs. UserError names the field."""
    _check_name(name)
    scheduler = _build(name, check_config(name, config, strict=True))
    try:
        steps = _check_steps(name, scheduler, num_inference_steps)
    except UserError as e:
        raise UserError(f"num_inference_steps: {e}") from None
    if type(step_index) is not int or not 0 <= step_index <= steps:
        raise UserError(f"step_index {_show(step_index)} is outside 0..{steps}")
    if not isinstance(state, dict) or set(state) != {"scalars", "lists"} \
            or not all(isinstance(state[k], dict) for k in state):
        raise UserError("scheduler state must be an object with exactly 'scalars' and 'lists' objects")
    order = scheduler.config.get("solver_order", 1)
    scalars, lists = _expected_state(name, step_index, order)
    for kind, got, want in (("scalars", state["scalars"], scalars), ("lists", state["lists"], lists)):
        for key in got:
            if key not in want:
                why = "a method" if callable(getattr(type(scheduler), key, None)) else "not restorable"
                raise UserError(f"scheduler state {kind} {_show(key)} is {why} for {name} at step {step_index}")
        for key, value in want.items():
            if key not in got:
                raise UserError(f"scheduler state lacks {kind} {key} for {name} at step {step_index}")
            if not _same(got[key], value):
                raise UserError(f"scheduler state {key} is {_show(got[key])}; {name} at step {step_index} "
                                f"has {_show(value)}")
    tensors = {key: (dtype, (steps + extra,)) for key, (dtype, extra) in SCHEDULE[name].items()}
    for key, present in lists.items():
        tensors.update({f"{key}.{i}": (torch.float32, tuple(sample_shape)) for i, p in enumerate(present) if p})
    return StatePlan(name, scheduler, steps, scalars, lists, tensors)


def restore(name: str, config: dict, num_inference_steps: int, tensors: dict[str, torch.Tensor], state: dict, *,
            step_index: int, sample_shape: tuple[int, ...]):
    """The scheduler `snapshot` described, rebuilt from its config; only tabled attributes are set."""
    return restore_planned(plan_restore(name, config, num_inference_steps, state, step_index=step_index,
                                        sample_shape=sample_shape), tensors)


def restore_planned(plan: StatePlan, tensors: dict[str, torch.Tensor]):
    """`restore` for a state `plan_restore` has checked: check the tensors, then put them back."""
    name = plan.name
    if set(tensors) != set(plan.tensors):
        extra = sorted(set(tensors) ^ set(plan.tensors))[0]
        raise UserError(f"scheduler tensor {_show(extra)} is {'missing' if extra in plan.tensors else 'unexpected'}")
    for key, (dtype, shape) in plan.tensors.items():
        t = tensors[key]
        if not torch.is_tensor(t) or t.dtype != dtype or tuple(t.shape) != shape:
            raise UserError(f"scheduler tensor {key} is not {dtype} of shape {shape}")
        if t.is_floating_point() and not bool((torch.isfinite(t) & (t.abs() <= MAX_VALUE)).all()):
            raise UserError(f"scheduler tensor {key} holds non-finite or huge values")
    scheduler = plan.scheduler
    _set_schedule(name, scheduler, plan.steps)
    for key in SCHEDULE[name]:
        mine, theirs = getattr(scheduler, key), tensors[key]
        same = torch.equal(mine, theirs) if not theirs.is_floating_point() else \
            bool(torch.allclose(mine.to(theirs.dtype), theirs, rtol=1e-3, atol=1e-6))
        if not same:
            raise UserError(f"scheduler {key} is not the schedule its config makes for {plan.steps} steps")
        setattr(scheduler, key, theirs.to(mine.dtype))
    for key, value in plan.scalars.items():
        _set(scheduler, name, key, value)
    for key, present in plan.lists.items():
        _set(scheduler, name, key, [tensors[f"{key}.{i}"] if p else None for i, p in enumerate(present)])
    return scheduler


def _set(scheduler, name: str, key: str, value: Any) -> None:
    if key not in STATE_ATTRIBUTES[name] or callable(getattr(type(scheduler), key, None)):
        raise UserError(f"scheduler attribute {key} cannot be restored")
    setattr(scheduler, key, value)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
