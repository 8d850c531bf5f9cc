"""A hybrid plan whose first segment runs on the cloud, the rest on this device.

The cloud encodes the prompt and runs the first segment; the trajectory comes back
with its embeddings, so the edge continues without encoding anything. When the cloud
cannot be had, the edge runs those steps itself with its first model and marks the
result degraded: the user still gets an image.
"""

from __future__ import annotations

from typing import Callable

from ..core.plan import Plan, PlanSegment, check_plan
from ..core.runner import advance
from ..core.trajectory import Trajectory
from ..errors import UserError
from ..hybrid.pipeline import HybridPipeline, latent_factor
from .client import CloudClient, CloudUnavailable, Handoff

OnStep = Callable[[str, int], None]


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
    try:
        traj, handoff = client.trajectory(request)
    except CloudUnavailable as e:
        local = rest[0].model
        warn(f"cloud unavailable ({e}); running its {cloud.steps} steps here with {local!r}")
        traj = pipe.start(prompt, negative_prompt=negative_prompt, steps=steps, scheduler=scheduler, seed=seed,
                          guidance_scale=guidance, size=size)
        advance(pipe.unets[local], [traj], cloud.steps, local, on_step=lambda k: on_step(local, k))
        traj.degraded = True
        handoff = None
    else:
        _check_answer(traj, pipe, steps=steps, cloud_steps=cloud.steps, scheduler=scheduler, size=size)
        for k in range(cloud.steps):
            on_step(cloud.model, k)
    pipe.run(traj, rest, on_step)
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


def _check_answer(traj: Trajectory, pipe: HybridPipeline, *, steps: int, cloud_steps: int, scheduler: str,
                  size: int) -> None:
    side = size // latent_factor(pipe.vae)
    wanted = {"step": cloud_steps, "steps": steps, "scheduler": scheduler, "latent side": side}
    got = {"step": traj.step_index, "steps": traj.num_steps, "scheduler": traj.scheduler_name,
           "latent side": traj.latents.shape[-1]}
    wrong = [f"{k} {got[k]} (asked {wanted[k]})" for k in wanted if got[k] != wanted[k]]
    if wrong:
        raise UserError(f"the cloud's trajectory does not match the request: {', '.join(wrong)}")
