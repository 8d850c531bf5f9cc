"""A hybrid plan whose first segment runs on the cloud, the rest on this device.

The first segment goes to a `CloudExecutor` (the core's segment executor, over HTTP):
the cloud encodes the prompt and runs it; the trajectory comes back with its
embeddings, so the edge continues without encoding anything. When the cloud
cannot be had, or what it answers is not a trajectory this edge can finish (corrupt,
not the one asked for, not for these models, or one that stops being finite), the
edge runs those steps itself with its first model and marks the result degraded:
the user still gets an image (the pipeline's one failure policy, core/segments.py).

With a user block (`user=`), a server with admission decides the split: granted, the
cloud runs the steps it chose and the edge the rest (its plan is stretched or cut from
the front, so the plan's last segments keep the last steps); denied, the edge runs
every step itself, which is the plan and not a degraded result.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Callable

from ..core.plan import Plan, PlanSegment, check_plan
from ..core.runner import advance
from ..core.segments import Declined, Executor, SegmentFailed, StartRequest
from ..core.trajectory import Trajectory, TrajectoryError
from ..errors import UserError
from ..hybrid.pipeline import HybridPipeline, latent_factor
from .client import CloudClient, CloudUnavailable, Denied, Handoff

OnStep = Callable[[str, int], None]


class MismatchedAnswer(TrajectoryError):
    """The cloud answered a valid trajectory, but not the one asked for or not one this edge can continue."""


class CloudExecutor(Executor):
    """The plan's first segment on a cloud server (POST /v1/trajectories): it encodes the prompt and
    runs the steps, so this device encodes nothing.

    The client's tries (which honour Retry-After) are the policy's tries; an answer that
    is not the trajectory asked for, or that `rest` (the edge's segments) cannot run,
    counts as a failed try. `handoff` is the last exchange's cost, for the cost table.
    """

    can_advance = False

    def __init__(self, client: CloudClient, pipe, rest: Plan | None = None, *, half: bool = False,
                 user: dict | None = None, warn: Callable[[str], None] = print):
        """`pipe`: the edge's pipeline (Split- or HybridPipeline); `rest`: the edge's segments (default: one
        per loaded model, so that every model here must be able to continue the answer)."""
        self.pipe = getattr(pipe, "hybrid", pipe)
        self.rest = rest or tuple(PlanSegment(name, 1) for name in self.pipe.unets)
        self.client, self.half, self.user, self.warn = client, half, user, warn
        self.here = self.rest[0].model  # the cloud's model is not here: the edge's first model stands in
        self.handoff: Handoff | None = None

    def start(self, request: StartRequest, seg: PlanSegment) -> Trajectory:
        if request.height != request.width:
            raise UserError("the cloud serves square images: give one size, not a different height and width")
        body = dict(model=seg.model, prompt=request.prompt, negative_prompt=request.negative_prompt,
                    seed=request.seed, steps=request.steps, cloud_steps=seg.steps, scheduler=request.scheduler,
                    guidance=request.guidance_scale, size=request.height, half=self.half)
        if self.user is not None:
            body["user"] = self.user

        def check(traj: Trajectory) -> None:
            _check_answer(traj, self.pipe, self.rest, steps=request.steps,
                          cloud_steps=None if self.user is not None else seg.steps, scheduler=request.scheduler,
                          size=request.height, seed=request.seed, guidance=request.guidance_scale)

        self.handoff = None
        try:
            traj, self.handoff = self.client.trajectory(body, check)
        except CloudUnavailable as e:
            raise SegmentFailed(f"cloud unavailable ({e})") from None
        except Denied as e:
            self.handoff = e.handoff
            raise Declined("the cloud's admission runs every step on this device") from None
        return traj


def run_with_cloud(pipe: HybridPipeline, plan: Plan, client: CloudClient, prompt: str, *, negative_prompt: str = "",
                   steps: int = 25, scheduler: str = "dpmsolver++", seed: int = 0, guidance: float = 5.0,
                   size: int = 64, half: bool = False, on_step: OnStep | None = None,
                   warn: Callable[[str], None] = print, user: dict | None = None) -> tuple[Trajectory, Handoff | None]:
    """The finished trajectory, and what its handoff cost (None when the cloud's steps ran here).

    The plan's first segment goes to a CloudExecutor; the pipeline's one plan runner and
    failure policy do the rest. `user` is the request's user block (schemas.UserBlock as a
    dict): the handoff's `decision` then says what the admission decided, and a denied
    user's handoff is the exchange that carried the refusal.
    """
    cloud, rest = split_plan(plan)
    check_plan(plan, steps)
    executor = CloudExecutor(client, pipe, rest, half=half, user=user, warn=warn)
    local = copy.copy(pipe)  # its own executors: pipelines are shared by threads (bench users)
    local.executors = {**pipe.executors, cloud.model: executor}
    request = StartRequest(prompt, negative_prompt, seed, steps, scheduler, guidance, size, size)
    traj = local.run_request(request, plan, on_step)
    return traj, None if traj.degraded else executor.handoff


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
