"""`splitdiff plan`: every solver on one scenario, as a table or as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .registry import Result, parse_solvers, run_all
from .scenario import Scenario, load_scenario


def _share(r: Result, base: float | None, best: float | None) -> float | None:
    if r.objective is None or base is None or best is None or best - base <= 1e-12:
        return None
    return (r.objective - base) / (best - base)


def plan_results(scenario: Scenario, names: list[str] | None = None,
                 options: dict[str, dict] | None = None) -> list[Result]:
    """Each solver once on two of the users first, so that imports and weight loading stay out of the runtimes."""
    run_all(scenario.model_copy(update={"users": scenario.users[:2]}), names, options)
    return run_all(scenario, names, options)


def _reference(scenario: Scenario, results: list[Result]) -> tuple[float, float]:
    """The all-local and exact objectives, from the results when there, else computed."""
    by = {r.solver: r for r in results}
    from .registry import run

    base = by["all-local"].objective if "all-local" in by else run("all-local", scenario).objective
    best = by["exact"].objective if "exact" in by else run("exact", scenario).objective
    return base, best


def as_json(scenario: Scenario, results: list[Result]) -> str:
    base, best = _reference(scenario, results)
    ids = [u.id or str(i) for i, u in enumerate(scenario.users)]
    out = []
    for r in results:
        row = r.summary()
        row["share_of_exact"] = _share(r, base, best)
        if r.decision is not None:
            row["granted_ids"] = [ids[i] for i in row["granted"]]
        out.append(row)
    return json.dumps({"users": len(scenario.users), "latency": scenario.latency,
                       "transmission": scenario.transmission, "all_local": base, "exact": best, "solvers": out},
                      indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))


def _who(scenario: Scenario, r: Result, limit: int = 8) -> str:
    ids = [u.id or str(i) for i, u in enumerate(scenario.users)]
    who = [ids[i] for i in np.flatnonzero(r.decision.granted)]
    text = ",".join(who[:limit]) + (f",+{len(who) - limit}" if len(who) > limit else "")
    return text or "-"


def print_table(scenario: Scenario, results: list[Result], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    base, best = _reference(scenario, results)
    t = Table(title=f"{len(scenario.users)} users, {scenario.latency}, transmission {scenario.transmission}, "
                    f"capacity {scenario.server.capacity}")
    for col, just in (("solver", "left"), ("objective", "right"), ("share", "right"), ("B", "right"),
                      ("mean n", "right"), ("ms", "right"), ("granted", "left")):
        t.add_column(col, justify=just, no_wrap=col != "granted")
    for r in results:
        if r.skipped:
            t.add_row(r.solver, "-", "-", "-", "-", "-", f"[dim]skipped: {r.skipped}[/dim]")
            continue
        share = _share(r, base, best)
        n = r.decision.n[r.decision.granted]
        t.add_row(r.solver, f"{r.objective:.4f}", "-" if share is None else f"{100 * share:.2f}%",
                  str(r.decision.B), f"{n.mean():.1f}" if len(n) else "-", f"{1e3 * r.runtime_s:.3f}",
                  _who(scenario, r))
    t.caption = "share: of the exact optimum's improvement over all-local; ms: runtime, scenario to decision"
    (console or Console()).print(t)


def plan(path: Path, solvers: str | None = None, json_out: bool = False, milp_time_limit: float = 60.0,
         seed: int = 0, echo=print) -> list[Result]:
    scenario = load_scenario(path)
    names = parse_solvers(solvers)
    results = plan_results(scenario, names, {"milp": {"time_limit": milp_time_limit}, "ga": {"seed": seed}})
    if json_out:
        echo(as_json(scenario, results))
    else:
        print_table(scenario, results)
    return results


def schema_json() -> str:
    return json.dumps(Scenario.model_json_schema(), indent=1)
