"""Some models of a step plan run patch-parallel: `generate --parallel MODE --ranks N`.

A `PatchPlan` names the models whose segments go to local ranks; `install` hands them
to the pipeline's `elsewhere` hook, so the one plan runner still decides what runs
when. Each model's ranks are a `RankPool`, started at its first segment and kept for
the next (the ranks load the U-Net once). A segment whose ranks fail is tried once more
on a fresh pool, then run here on this process's own copy of the model, and the result
is marked degraded: the same policy as a cloud that does not answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..core.plan import format_plan
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
        """Refuse what cannot be cut (before any rank starts), then send these models' segments to ranks.

        The returned PatchRun owns the rank pools: close it (or use it as a context) when the plan is done.
        """
        from .segment import check_parallel

        run = PatchRun(self, pipe, warn)
        for name in self.models:
            check_parallel(pipe.unets[name], traj.latents.shape, self.mode, self.ranks)
            pipe.elsewhere[name] = lambda t, steps, name=name: run.advance(name, t, steps)
        return run


class PatchRun:
    """The rank pools of one PatchPlan on one pipeline, and its failure policy."""

    def __init__(self, plan: PatchPlan, pipe, warn: Callable[[str], None]):
        self.plan, self.pipe, self.warn = plan, pipe, warn
        self.pools: dict = {}

    def advance(self, name: str, traj, steps: int) -> None:
        """In place, as the core's runner advances; failed ranks: once more on a fresh pool, then here, degraded."""
        from ..core.runner import advance
        from ..core.trajectory import Trajectory
        from .pool import RankPool
        from .ranks import RankFailure

        for attempt in range(1, TRIES + 1):
            try:
                if name not in self.pools:
                    self.pools[name] = RankPool(self.pipe.sources[name], self.plan.ranks, self.plan.mode)
                data = self.pools[name].advance(traj.to_bytes(), steps, name)
            except RankFailure as failure:
                self.pools.pop(name).close()
                what = f"patch-parallel ranks failed: {failure}"
                if attempt < TRIES:
                    self.warn(f"{what}; trying again")
                    continue
                self.warn(f"{what}; running {name!r}'s {steps} steps here")
                advance(self.pipe.unets[name], [traj], steps, name)
                traj.degraded = True
                return
            vars(traj).update(vars(Trajectory.from_bytes(data)))
            return

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()

    def __enter__(self) -> "PatchRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
