"""`splitdiff bench plan`: every planner against the exact optimum on the paper's scenario family.

For each N and each (latency model, transmission form), the same random scenarios
(seeded by N and their index, so all four settings see the same users). Per solver: its
objective as a share of the exact optimum's improvement over all-local (1 = optimal,
0 = no better than all-local), averaged over scenarios, with the worst case, and its
runtime from scenario to decision (median, p95). The slow baselines run on the first
`slow_scenarios` scenarios only where they would take hours otherwise: the MILP, and the GA
under the shrinking batch (its fitness needs an assignment per genome); the CSV's
`scenarios` column says how many each figure is over. Brute force doubles as the check
of exact: `max_gap_to_exact` is the largest |U_solver - U_exact| seen.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..users.planner.families import paper_scenario
from ..users.planner.registry import run, solvers
from . import write_csv

SETTINGS = (("constant-batch", "paper-code"), ("constant-batch", "sound"),
            ("shrinking-batch", "paper-code"), ("shrinking-batch", "sound"))
ORDER = ("exact", "brute", "milp", "dqn", "ga", "greedy", "all-offload", "all-local")


def parse_users(users: str) -> list[int]:
    try:
        ns = [int(x) for x in users.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--users must be whole numbers separated by commas, not {users!r}") from None
    if not ns or min(ns) < 1 or max(ns) > 1000:
        raise UserError("--users must list values of N between 1 and 1000")
    return ns


def _runs_on(name: str, N: int, latency: str, k: int, scenarios: int, milp_max: int, slow: int) -> bool:
    if name == "milp":
        return N <= (milp_max if latency == "constant-batch" else min(milp_max, 8)) and k < slow
    if name == "ga" and latency == "shrinking-batch":
        return N <= 20 and k < slow
    return True


def _warm_up() -> None:
    """First calls pay for imports and weight loading; time only what follows."""
    s = paper_scenario(3, 0)
    for name in solvers():
        run(name, s)


def _read_csv(path: Path) -> list[dict]:
    import csv

    if not path.exists():
        return []
    num = {"N": int, "scenarios": int}
    with path.open() as f:
        return [{k: num.get(k, float)(v) if k not in ("latency", "transmission", "solver") else v
                 for k, v in row.items()} for row in csv.DictReader(f)]


def bench_plan(out: Path, scenarios: int = 200, users: str = "4,8,12,16,20,50,100", milp_max_users: int = 20,
               milp_time_limit: float = 30.0, seed: int = 0, slow_scenarios: int = 50,
               only: list[str] | None = None, echo=print) -> list[dict]:
    """With `only`, just those solvers run (exact and all-local too, as the reference) and their rows
    replace theirs in an existing plan.csv: a retrained DQN is benched without rerunning the MILP."""
    ns = parse_users(users)
    out.mkdir(parents=True, exist_ok=True)
    _warm_up()
    rows = []
    order = ORDER if only is None else tuple(n for n in ORDER if n in set(only) | {"exact", "all-local"})
    for latency, transmission in SETTINGS:
        for N in ns:
            start = time.monotonic()
            share, runtime, gap = defaultdict(list), defaultdict(list), defaultdict(float)
            skipped = {}
            for k in range(scenarios):
                s = paper_scenario(N, np.random.default_rng([seed, N, k]), latency=latency, transmission=transmission)
                res = {}
                for name in order:
                    if not _runs_on(name, N, latency, k, scenarios, milp_max_users, slow_scenarios):
                        continue
                    opts = {"time_limit": milp_time_limit} if name == "milp" else {"seed": k} if name == "ga" else {}
                    r = run(name, s, **opts)
                    if r.skipped:
                        skipped[name] = r.skipped
                        continue
                    res[name] = r
                base, best = res["all-local"].objective, res["exact"].objective
                for name, r in res.items():
                    runtime[name].append(r.runtime_s)
                    gap[name] = max(gap[name], abs(r.objective - best))
                    if best - base > 1e-9:
                        share[name].append((r.objective - base) / (best - base))
            for name in order:
                if name not in runtime:
                    continue
                t = np.array(runtime[name]) * 1e3
                sh = np.array(share[name])
                rows.append({"latency": latency, "transmission": transmission, "N": N, "solver": name,
                             "scenarios": len(t), "share_mean": float(sh.mean()), "share_min": float(sh.min()),
                             "runtime_ms_median": float(np.median(t)), "runtime_ms_p95": float(np.percentile(t, 95)),
                             "max_gap_to_exact": float(gap[name])})
            echo(f"{latency:16s} {transmission:10s} N={N:3d}: " + ", ".join(
                f"{r['solver']} {100 * r['share_mean']:.2f}%" for r in rows[-len(runtime):])
                + f"  ({time.monotonic() - start:.0f} s)")
    if only is not None:
        fresh = {(r["latency"], r["transmission"], r["N"], r["solver"]) for r in rows if r["solver"] in only}
        kept = [r for r in _read_csv(out / "plan.csv")
                if (r["latency"], r["transmission"], r["N"], r["solver"]) not in fresh]
        rows = [r for r in rows if r["solver"] in only] + kept
        rank = {n: k for k, n in enumerate(ORDER)}
        setting = {s: k for k, s in enumerate(SETTINGS)}
        rows.sort(key=lambda r: (setting[(r["latency"], r["transmission"])], r["N"], rank[r["solver"]]))
        ns = sorted({r["N"] for r in rows})
    write_csv(out / "plan.csv", rows)
    from ..io import atomic_write_bytes

    atomic_write_bytes(out / "plan.md", markdown(rows).encode())
    _plot(rows, out, ns)
    return rows


def _plot(rows: list[dict], out: Path, ns: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write_bytes
    import io

    plots = (("share_mean", "gap to the optimum, % of exact's improvement\nover all-local (0 = optimal)",
              "plan_share.png"),
             ("runtime_ms_median", "runtime, ms (median)", "plan_runtime.png"))
    for what, ylabel, fname in plots:
        fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True, sharey=True)
        for ax, (latency, transmission) in zip(axes.ravel(), SETTINGS):
            for name in ORDER:
                pts = [(r["N"], 100 * (1 - r[what]) if what == "share_mean" else r[what]) for r in rows
                       if r["solver"] == name and r["latency"] == latency and r["transmission"] == transmission]
                if pts and not (what == "share_mean" and name == "brute"):  # brute lies under exact
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_title(f"{latency}, transmission {transmission}", fontsize=10)
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(ns, [str(n) for n in ns])
            if what == "share_mean":
                ax.set_yscale("symlog", linthresh=0.01)
                ax.set_ylim(-0.001, 150)
            else:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        for ax in axes[-1]:
            ax.set_xlabel("users N")
        for ax in axes[:, 0]:
            ax.set_ylabel(ylabel)
        axes[0, 0].legend(fontsize=8)
        fig.suptitle("Planners on the paper's scenario family")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(out / fname, buf.getvalue())


def markdown(rows: list[dict]) -> str:
    """One table per setting: mean share of exact's improvement, then median / p95 runtime in ms."""
    out = []
    for latency, transmission in SETTINGS:
        sub = [r for r in rows if r["latency"] == latency and r["transmission"] == transmission]
        if not sub:
            continue
        ns = sorted({r["N"] for r in sub})
        out += [f"**{latency}, transmission {transmission}**: share of exact's improvement over all-local "
                "(mean over scenarios; worst in brackets when below 99.9%), then runtime ms (median / p95)", "",
                "| solver | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for name in ORDER:
            cells = []
            for n in ns:
                r = next((r for r in sub if r["solver"] == name and r["N"] == n), None)
                if r is None:
                    cells.append("–")
                    continue
                worst = f" ({100 * r['share_min']:.2f})" if r["share_min"] < 0.999 and name != "all-local" else ""
                cells.append(f"{100 * r['share_mean']:.2f}%{worst}<br>{r['runtime_ms_median']:.3g} / "
                             f"{r['runtime_ms_p95']:.3g}")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def check_targets(rows: list[dict]) -> dict:
    """The issue's targets, read off the rows."""
    def get(solver, latency, N, key, transmission=None):
        return [r[key] for r in rows if r["solver"] == solver and r["latency"] == latency and r["N"] == N
                and (transmission is None or r["transmission"] == transmission)]

    out = {}
    out["exact_equals_brute"] = all(r["max_gap_to_exact"] < 1e-6 for r in rows if r["solver"] == "brute")
    out["exact_ms_p95_N100_constant"] = max(get("exact", "constant-batch", 100, "runtime_ms_p95") or [np.nan])
    out["exact_ms_p95_N100_shrinking"] = max(get("exact", "shrinking-batch", 100, "runtime_ms_p95") or [np.nan])
    out["dqn_share_N20"] = {f"{r['latency']}/{r['transmission']}": r["share_mean"] for r in rows
                            if r["solver"] == "dqn" and r["N"] == 20}
    return out

