"""A hybrid plan whose first segment runs on the cloud, the rest on this device.

The cloud encodes the prompt and runs the first segment; the trajectory comes back
with its embeddings, so the edge continues without encoding anything. When the cloud
cannot be had, or what it answers is not a trajectory this edge can finish (corrupt,
not the one asked for, not for these models, or one that stops being finite), the
edge runs those steps itself with its first model and marks the result degraded:
the user still gets an image.

With a user block (`user=`), a server with admission decides the split: granted, the
cloud runs the steps it chose and the edge the rest (its plan is stretched or cut from
the front, so the plan's last segments keep the last steps); denied, the edge runs
every step itself, which is the plan and not a degraded result.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace
from typing import Callable

from ..core.plan import Plan, PlanSegment, check_plan
from ..core.runner import advance
from ..core.trajectory import Trajectory, TrajectoryError
from ..errors import UserError
from ..hybrid.pipeline import HybridPipeline, latent_factor
from .client import CloudClient, CloudUnavailable, Denied, Handoff

OnStep = Callable[[str, int], None]


class MismatchedAnswer(TrajectoryError):
    """The cloud answered a valid trajectory, but not the one asked for or not one this edge can continue."""


def run_with_cloud(pipe: HybridPipeline, plan: Plan, client: CloudClient, prompt: str, *, negative_prompt: str = "",
                   steps: int = 25, scheduler: str = "dpmsolver++", seed: int = 0, guidance: float = 5.0,
                   size: int = 64, half: bool = False, on_step: OnStep | None = None,
                   warn: Callable[[str], None] = print, user: dict | None = None) -> tuple[Trajectory, Handoff | None]:
    """The finished trajectory, and what its handoff cost (None when the cloud's steps ran here).

    `user` is the request's user block (schemas.UserBlock as a dict). The handoff's
    `decision` then says what the admission decided; a denied user's handoff is the
    exchange that carried the refusal.
    """
    cloud, rest = split_plan(plan)
    check_plan(plan, steps)
    on_step = on_step or (lambda _m, _k: None)
    request = dict(model=cloud.model, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                   cloud_steps=cloud.steps, scheduler=scheduler, guidance=guidance, size=size, half=half)
    if user is not None:
        request["user"] = user

    def check(traj: Trajectory) -> None:
        _check_answer(traj, pipe, rest, steps=steps, cloud_steps=None if user is not None else cloud.steps,
                      scheduler=scheduler, size=size, seed=seed, guidance=guidance)

    def here() -> Trajectory:
        local = rest[0].model
        traj = pipe.start(prompt, negative_prompt=negative_prompt, steps=steps, scheduler=scheduler, seed=seed,
                          guidance_scale=guidance, size=size)
        advance(pipe.unets[local], [traj], cloud.steps, local, on_step=lambda k: on_step(local, k))
        traj.degraded = True
        pipe.run(traj, rest, on_step)
        return traj

    try:
        traj, handoff = client.trajectory(request, check)
    except CloudUnavailable as e:
        warn(f"cloud unavailable ({e}); running its {cloud.steps} steps here with {rest[0].model!r}")
        return here(), None
    except Denied as e:
        traj = pipe.start(prompt, negative_prompt=negative_prompt, steps=steps, scheduler=scheduler, seed=seed,
                          guidance_scale=guidance, size=size)
        pipe.run(traj, fit_plan(rest, steps), on_step)
        return traj, e.handoff
    for k in range(traj.step_index):
        on_step(cloud.model, k)
    rest = fit_plan(rest, steps - traj.step_index)
    try:
        pipe.run(traj, rest, on_step)
    except TrajectoryError as e:
        warn(f"cloud unavailable (its trajectory could not be finished here: {e}); running its {cloud.steps} "
             f"steps here with {rest[0].model!r}")
        return here(), None
    return traj, handoff


def handoff_rows(handoff: Handoff | None) -> dict[str, str]:
    """Extra rows for the cost table: the handoff's network seconds and bytes, and the admission's decision."""
    if handoff is None:
        return {}
    rows = {"network": f"{handoff.network_seconds:.3f}", "handoff bytes": f"{handoff.received_bytes:,}"}
    d = handoff.decision
    if d is not None:
        if d.get("decision") == "deny":
            rows = {"admission": f"denied ({d.get('policy')}): all {d.get('steps')} steps here"}
        else:
            rows["admission"] = (f"granted ({d.get('policy')}): {d.get('cloud_steps')} cloud, "
                                 f"{d.get('device_steps')} here, predicted {d.get('predicted_seconds', 0):.3f} s")
    return rows


def fit_plan(rest: Plan, device_steps: int) -> Plan:
    """The edge's segments resized to `device_steps`, the last segments kept whole first.

    The device's last steps are the ones that make the image its own, so a shorter part
    is cut from the front and a longer one is added to the first segment. Segments keep
    their adapters.
    """
    total = sum(s.steps for s in rest)
    if device_steps >= total:
        return (replace(rest[0], steps=rest[0].steps + device_steps - total), *rest[1:])
    out, left = [], device_steps
    for seg in reversed(rest):
        if left <= 0:
            break
        out.append(replace(seg, steps=min(seg.steps, left)))
        left -= seg.steps
    return tuple(reversed(out))


def measure_step_seconds(pipe: HybridPipeline, model: str, *, size: int = 64, steps: int = 25,
                         scheduler: str = "dpmsolver++", guidance: float = 5.0, warm_up: int = 1,
                         timed: int = 3) -> float:
    """Seconds one denoising step takes here with `model` (the median of `timed` steps after `warm_up`)."""
    traj = pipe.start("", steps=max(steps, warm_up + timed), scheduler=scheduler, guidance_scale=guidance, size=size)
    unet = pipe.unets[model]
    advance(unet, [traj], warm_up, model)
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        advance(unet, [traj], 1, model)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def split_plan(plan: Plan) -> tuple[PlanSegment, Plan]:
    """(the cloud's segment, the edge's segments): the edge needs a model of its own to fall back on."""
    if len(plan) < 2:
        raise UserError("with --cloud-url the plan needs an edge segment after the cloud's, e.g. cloud:10,edge:15")
    if plan[0].adapter is not None:
        raise UserError(f"the cloud's segment {plan[0].label!r} cannot name an adapter: adapters stay on this "
                        "device (write it on an edge segment, e.g. cloud:15,edge@ana:10)")
    return plan[0], plan[1:]


def _check_answer(traj: Trajectory, pipe: HybridPipeline, rest: Plan, *, steps: int, cloud_steps: int | None,
                  scheduler: str, size: int, seed: int, guidance: float) -> None:
    """A MismatchedAnswer unless `traj` is the trajectory asked for and the edge's models can run it.

    `cloud_steps` None: the server chose the split (admission), any step from 1 to `steps`.
    """
    side = size // latent_factor(pipe.vae)
    step = cloud_steps if cloud_steps is not None else min(max(traj.step_index, 1), steps)
    wanted = {"step": step, "steps": steps, "scheduler": scheduler, "latent sides": (side, side),
              "seed": seed}
    got = {"step": traj.step_index, "steps": traj.num_steps, "scheduler": traj.scheduler_name,
           "latent sides": tuple(traj.latents.shape[-2:]), "seed": traj.seed}
    wrong = [f"{k} {got[k]} (asked {wanted[k]})" for k in wanted if got[k] != wanted[k]]
    if not math.isclose(traj.guidance_scale, guidance, rel_tol=1e-9, abs_tol=1e-12):
        wrong.append(f"guidance {traj.guidance_scale:g} (asked {guidance:g})")
    if wrong:
        raise MismatchedAnswer(f"the cloud's trajectory does not match the request: {', '.join(wrong)}")
    try:
        pipe.check(traj, rest)
    except TrajectoryError as e:
        raise MismatchedAnswer(f"the cloud's trajectory does not fit this edge: {e}") from None
