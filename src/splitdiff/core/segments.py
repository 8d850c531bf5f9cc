"""Where a plan segment runs: one interface for every place, and one failure policy.

A plan says which model runs which steps; an `Executor` says where a model's steps
run when not with the pipeline's own copy of it: on patch-parallel ranks, or on a
cloud server over HTTP. Executors are set per model name (`pipeline.executors`), so
the one plan runner still decides what runs when, and every place keeps the same
contract: advance the trajectory in place by the segment's steps, or raise
`SegmentFailed`.

The policy is the pipeline's, the same for all of them (`advance_segment`): a failed
segment is tried again up to the executor's `tries`, then its steps run here, with
the pipeline's own U-Net (the executor's `here` model), and the trajectory is marked
degraded: the user still gets an image, and the provenance says it is not the one
the plan asked for.

A cloud server can also *start* a trajectory: it encodes the prompt and runs the
first segment before the trajectory exists here, so the device encodes nothing.
Such an executor implements `start`; it may answer `Declined` (an admission's
decision that this device runs every step itself, which is not a failure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .plan import PlanSegment
from .trajectory import Trajectory

class SegmentFailed(Exception):
    """The segment could not run where it was sent; the pipeline may run it here."""


class Declined(Exception):
    """The executor's side decided that this device runs every step itself (not a failure)."""


@dataclass(frozen=True)
class StartRequest:
    """What a trajectory is started from: the pipeline's `start` arguments for one prompt."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    scheduler: str = "dpmsolver++"
    guidance_scale: float = 5.0
    height: int = 64
    width: int = 64


class Executor:
    """Runs one model's segments somewhere other than this process's own copy of the model.

    `tries`: attempts before the steps run here; `here`: the loaded model that runs them
    then (None: the segment's own model); `warn` hears each failure in one line.
    """

    tries: int = 1
    here: str | None = None
    can_advance: bool = True  # False: it only starts trajectories (its segment must come first)
    warn: Callable[[str], None] = staticmethod(print)

    def advance(self, traj: Trajectory, seg: PlanSegment) -> None:
        """Advance `traj` in place by `seg.steps`, or raise SegmentFailed (leaving `traj` as it was)."""
        raise NotImplementedError

    @property
    def can_start(self) -> bool:
        return type(self).start is not Executor.start

    def start(self, request: StartRequest, seg: PlanSegment) -> Trajectory:
        """A new trajectory, after `seg`'s steps (or as many as the executor's side chose); SegmentFailed or
        Declined otherwise. Only executors that can encode prompts implement it."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what the executor holds (rank processes, connections)."""


def advance_segment(executor: Executor, traj: Trajectory, seg: PlanSegment,
                    here: Callable[[Trajectory, PlanSegment], None]) -> bool:
    """The failure policy: `executor` up to its `tries`, then `here(traj, seg)` and the trajectory degraded.

    Returns whether the executor ran the segment.
    """
    for attempt in range(1, executor.tries + 1):
        try:
            executor.advance(traj, seg)
            return True
        except SegmentFailed as failure:
            if attempt < executor.tries:
                executor.warn(f"{failure}; trying again")
                continue
            executor.warn(f"{failure}; running {seg.label!r}'s {seg.steps} steps here")
    here(traj, seg)
    traj.degraded = True
    return False
