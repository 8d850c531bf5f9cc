"""The split-point planner: who is offloaded to the shared server, and where each user's split lies.

    from splitdiff.users.planner import load_scenario, run
    result = run("exact", load_scenario("examples/scenario.json"))
    result.decision.granted, result.decision.n, result.objective, result.runtime_s

Solvers (registry.solvers()): exact, brute, milp, dqn, ga, greedy, all-offload, all-local.
"""

from .latency import Decision, objective
from .registry import Result, run, run_all, solvers
from .scenario import Instance, Scenario, load_scenario, parse_scenario

__all__ = ["Decision", "Instance", "Result", "Scenario", "load_scenario", "objective", "parse_scenario", "run",
           "run_all", "solvers"]
