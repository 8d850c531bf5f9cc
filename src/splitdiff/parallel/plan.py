"""Some models of a step plan run patch-parallel: `generate --parallel MODE --ranks N`.

A `PatchPlan` names the models whose segments go to local ranks; `install` hands them
to the pipeline's `elsewhere` hook, so the one plan runner still decides what runs
when. A segment whose ranks fail is tried once more, then run here on this process's
own copy of the model, and the result is marked degraded: the same policy as a cloud
that does not answer.
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

    def install(self, pipe, traj, warn: Callable[[str], None] = print) -> None:
        """Refuse what cannot be cut (before any rank starts), then send these models' segments to ranks."""
        from .segment import check_parallel

        for name in self.models:
            check_parallel(pipe.unets[name], traj.latents.shape, self.mode, self.ranks)
            pipe.elsewhere[name] = lambda t, steps, name=name: self._advance(pipe, name, t, steps, warn)

    def _advance(self, pipe, name: str, traj, steps: int, warn: Callable[[str], None]) -> None:
        """In place, as the core's runner advances; failed ranks: once more, then here, degraded."""
        from ..core.runner import advance
        from ..core.trajectory import Trajectory
        from .ranks import RankFailure
        from .segment import advance_parallel

        for attempt in range(1, TRIES + 1):
            try:
                data = advance_parallel(pipe.sources[name], traj.to_bytes(), steps, name, self.mode, self.ranks)
            except RankFailure as failure:
                what = f"patch-parallel ranks failed: {failure}"
                if attempt < TRIES:
                    warn(f"{what}; trying again")
                    continue
                warn(f"{what}; running {name!r}'s {steps} steps here")
                advance(pipe.unets[name], [traj], steps, name)
                traj.degraded = True
                return
            vars(traj).update(vars(Trajectory.from_bytes(data)))
            return
