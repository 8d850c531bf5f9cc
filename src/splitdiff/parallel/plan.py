"""Some models of a step plan run patch-parallel: `generate --parallel MODE --ranks N`.

A `PatchPlan` names the models whose segments go to local ranks; `install` gives each
a `RankExecutor` (the core's segment executor), so the one plan runner still decides
what runs when. Each model's ranks are a `RankPool`, started at its first segment and
kept for the next (the ranks load the U-Net once). A segment whose ranks fail is tried
once more on a fresh pool, then run here on this process's own copy of the model, and
the result is marked degraded: the pipeline's one failure policy, as for a cloud that
does not answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..core.plan import format_plan
from ..core.segments import Executor, SegmentFailed
from ..errors import UserError
from .context import Options

TRIES = 2  # a segment's tries on the ranks before it runs here


@dataclass(frozen=True)
class PatchPlan:
    """`generate --parallel MODE --ranks N --parallel-models A,B`: the named models' segments run on N local ranks."""

    mode: str
    ranks: int
    models: tuple[str, ...]

    @classmethod
    def parse(cls, mode: Optional[str], ranks: Optional[int], models: Optional[str], plan) -> Optional[PatchPlan]:
        """None without --parallel; a UserError for what is wrong before any model loads."""
        if mode is None:
            if ranks is not None or models:
                raise UserError("--ranks and --parallel-models go with --parallel MODE")
            return None
        Options(mode)
        if ranks is not None and ranks < 1:
            raise UserError(f"--ranks must be at least 1, not {ranks}")
        names = tuple(m.strip() for m in models.split(",") if m.strip()) if models else (plan[0].model,)
        unknown = [n for n in names if n not in {s.model for s in plan}]
        if unknown or not names:
            missing = ", ".join(unknown) or "nothing"
            raise UserError(f"--parallel-models names {missing}, not a model of the plan {format_plan(plan)}")
        return cls(mode, 2 if ranks is None else ranks, names)

    def install(self, pipe, traj, warn: Callable[[str], None] = print) -> "PatchRun":
        """Refuse what cannot be cut (before any rank starts), then give these models' segments to ranks.

        The returned PatchRun owns the rank pools: close it (or use it as a context) when the plan is done.
        """
        from .segment import check_parallel

        for name in self.models:
            check_parallel(pipe.unets[name], traj.latents.shape, self.mode, self.ranks)
        executors = {name: RankExecutor(pipe.sources[name], self.ranks, self.mode, warn) for name in self.models}
        pipe.executors.update(executors)
        return PatchRun(pipe, executors)


class RankExecutor(Executor):
    """One model's segments on a persistent pool of local ranks (started at its first segment).

    A failed pool is closed, and the next try starts a fresh one.
    """

    tries = TRIES

    def __init__(self, source: str, ranks: int, mode: str, warn: Callable[[str], None] = print):
        self.source, self.ranks, self.mode, self.warn = source, ranks, mode, warn
        self.pool = None

    def advance(self, traj, seg) -> None:
        from ..core.trajectory import Trajectory
        from .pool import RankPool
        from .ranks import RankFailure

        try:
            if self.pool is None:
                self.pool = RankPool(self.source, self.ranks, self.mode)
            data = self.pool.advance(traj.to_bytes(), seg.steps, seg.model)
        except RankFailure as failure:
            self.close()
            raise SegmentFailed(f"patch-parallel ranks failed: {failure}") from None
        vars(traj).update(vars(Trajectory.from_bytes(data)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


class PatchRun:
    """A PatchPlan installed on a pipeline: closing it stops the ranks and takes the executors back."""

    def __init__(self, pipe, executors: dict[str, RankExecutor]):
        self.pipe, self.executors = pipe, executors

    def close(self) -> None:
        for name, executor in self.executors.items():
            executor.close()
            if self.pipe.executors.get(name) is executor:
                del self.pipe.executors[name]

    def __enter__(self) -> "PatchRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
