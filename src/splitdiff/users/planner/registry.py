"""Every planner behind one interface: a scenario in; a decision, its objective and the runtime out.

A solver is a function (Instance, **options) -> (Decision, info). `run` times it from
the scenario to the decision and scores the decision with the latency model itself, so
no solver grades its own work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ...errors import UserError
from .latency import Decision, objective
from .scenario import Instance, Scenario


@dataclass
class Result:
    solver: str
    decision: Decision | None
    objective: float | None
    runtime_s: float
    info: dict = field(default_factory=dict)
    skipped: str | None = None  # why the solver did not run on this scenario

    def summary(self, inst: Instance | None = None) -> dict:
        d = self.decision
        out = {"solver": self.solver, "objective": self.objective, "runtime_s": self.runtime_s}
        if self.skipped:
            return {**out, "skipped": self.skipped}
        out["granted"] = [int(i) for i in np.flatnonzero(d.granted)]
        out["B"] = d.B
        out["n"] = [float(x) for x in d.n]
        return {**out, **{k: v for k, v in self.info.items() if k not in out and k != "value"}}


@dataclass(frozen=True)
class SolverSpec:
    name: str
    fn: Callable[..., tuple[Decision, dict]]
    about: str
    max_users: int | None = None
    available: Callable[[], str | None] = lambda: None  # why it cannot run at all (no weights), or None


def _specs() -> dict[str, SolverSpec]:
    from . import baselines, brute, dqn, exact, ga, milp

    specs = [
        SolverSpec("exact", lambda inst, **o: exact.solve(inst), "constant batch: top-B gains for each B; "
                   "shrinking batch: users to ranks by linear_sum_assignment for each B"),
        SolverSpec("brute", brute.solve, "every grant subset (and rank order) with each user's best split",
                   max_users=brute.MAX_USERS),
        SolverSpec("milp", milp.solve, "branch and bound (HiGHS) over a grid of splits", max_users=milp.MAX_USERS),
        SolverSpec("dqn", dqn.solve, "PER-DQN: users decided one by one, splits in closed form",
                   max_users=dqn.N_MAX, available=dqn.unavailable),
        SolverSpec("ga", ga.solve, "genetic algorithm over grant vectors (population 100, 200 generations)"),
        SolverSpec("greedy", baselines.greedy, "grant users by their gain at B = 1 while U rises"),
        SolverSpec("all-offload", baselines.all_offload, "grant the earliest requests up to capacity"),
        SolverSpec("all-local", baselines.all_local, "deny everyone"),
    ]
    return {s.name: s for s in specs}


_SPECS: dict[str, SolverSpec] | None = None


def solvers() -> dict[str, SolverSpec]:
    global _SPECS
    if _SPECS is None:
        _SPECS = _specs()
    return _SPECS


def parse_solvers(names: str | list[str] | None) -> list[str]:
    known = solvers()
    if names is None:
        return list(known)
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    names = [n.strip() for part in names for n in part.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise UserError(f"unknown solver {bad[0]!r}; choose from {', '.join(known)}" if bad else "no solver named")
    return list(dict.fromkeys(names))


def run(name: str, scenario: Scenario | Instance, **options) -> Result:
    spec = solvers()[name]
    n_users = len(scenario.users) if isinstance(scenario, Scenario) else scenario.N
    why = spec.available()
    if why is None and spec.max_users is not None and n_users > spec.max_users:
        why = f"N = {n_users} > {spec.max_users}"
    if why:
        return Result(name, None, None, 0.0, skipped=why)
    start = time.perf_counter()
    inst = Instance.of(scenario) if isinstance(scenario, Scenario) else scenario
    decision, info = spec.fn(inst, **options)
    runtime = time.perf_counter() - start
    return Result(name, decision, objective(inst, decision), runtime, info)


def run_all(scenario: Scenario, names: list[str] | None = None, options: dict[str, dict] | None = None) -> list[Result]:
    options = options or {}
    return [run(n, scenario, **options.get(n, {})) for n in (names or list(solvers()))]
