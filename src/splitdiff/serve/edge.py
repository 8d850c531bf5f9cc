"""A hybrid plan whose first segment runs on the cloud, the rest on this device.

The cloud encodes the prompt and runs the first segment; the trajectory comes back
with its embeddings, so the edge continues without encoding anything. When the cloud
cannot be had, or what it answers is not a trajectory this edge can finish (corrupt,
not the one asked for, not for these models, or one that stops being finite), the
edge runs those steps itself with its first model and marks the result degraded:
the user still gets an image.
"""

from __future__ import annotations

import math
from typing import Callable

from ..core.plan import Plan, PlanSegment, check_plan
from ..core.runner import advance
from ..core.trajectory import Trajectory, TrajectoryError
from ..errors import UserError
from ..hybrid.pipeline import HybridPipeline, latent_factor
from .client import CloudClient, CloudUnavailable, Handoff

OnStep = Callable[[str, int], None]


class MismatchedAnswer(TrajectoryError):
    """The cloud answered a valid trajectory, but not the one asked for or not one this edge can continue."""


def run_with_cloud(pipe: HybridPipeline, plan: Plan, client: CloudClient, prompt: str, *, negative_prompt: str = "",
                   steps: int = 25, scheduler: str = "dpmsolver++", seed: int = 0, guidance: float = 5.0,
                   size: int = 64, half: bool = False, on_step: OnStep | None = None,
                   warn: Callable[[str], None] = print) -> tuple[Trajectory, Handoff | None]:
    """The finished trajectory, and what its handoff cost (None when the cloud's steps ran here)."""
    cloud, rest = split_plan(plan)
    check_plan(plan, steps)
    on_step = on_step or (lambda _m, _k: None)
    request = dict(model=cloud.model, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                   cloud_steps=cloud.steps, scheduler=scheduler, guidance=guidance, size=size, half=half)

    def check(traj: Trajectory) -> None:
        _check_answer(traj, pipe, rest, steps=steps, cloud_steps=cloud.steps, scheduler=scheduler, size=size,
                      seed=seed, guidance=guidance)

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
    for k in range(cloud.steps):
        on_step(cloud.model, k)
    try:
        pipe.run(traj, rest, on_step)
    except TrajectoryError as e:
        warn(f"cloud unavailable (its trajectory could not be finished here: {e}); running its {cloud.steps} "
             f"steps here with {rest[0].model!r}")
        return here(), None
    return traj, handoff


def handoff_rows(handoff: Handoff | None) -> dict[str, str]:
    """Extra rows for the cost table: the handoff's network seconds and bytes."""
    if handoff is None:
        return {}
    return {"network": f"{handoff.network_seconds:.3f}", "handoff bytes": f"{handoff.received_bytes:,}"}


def split_plan(plan: Plan) -> tuple[PlanSegment, Plan]:
    """(the cloud's segment, the edge's segments): the edge needs a model of its own to fall back on."""
    if len(plan) < 2:
        raise UserError("with --cloud-url the plan needs an edge segment after the cloud's, e.g. cloud:10,edge:15")
    return plan[0], plan[1:]


def _check_answer(traj: Trajectory, pipe: HybridPipeline, rest: Plan, *, steps: int, cloud_steps: int,
                  scheduler: str, size: int, seed: int, guidance: float) -> None:
    """A MismatchedAnswer unless `traj` is the trajectory asked for and the edge's models can run it."""
    side = size // latent_factor(pipe.vae)
    wanted = {"step": cloud_steps, "steps": steps, "scheduler": scheduler, "latent sides": (side, side),
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
