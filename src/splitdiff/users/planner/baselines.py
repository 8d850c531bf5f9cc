"""Simple policies, each with the exact splits for the set it grants."""

from __future__ import annotations

import numpy as np

from .exact import best_for_set
from .latency import Decision, gains
from .scenario import Instance


def all_local(inst: Instance):
    return Decision.all_local(inst), {"B": 0}


def all_offload(inst: Instance):
    """First come, first served up to the capacity (everyone when they fit)."""
    granted = np.zeros(inst.N, dtype=bool)
    granted[np.argsort(inst.request_time, kind="stable")[:inst.capacity]] = True
    d, _ = best_for_set(inst, granted)
    return d, {"B": d.B}


def greedy(inst: Instance):
    """Users ranked once by their gain alone (B = 1, rank 1); the best prefix of that ranking.

    Cheap and blind to how the gains re-rank as B grows, which is what exact fixes.
    """
    g = gains(inst)
    if inst.capacity == 0:
        return Decision.all_local(inst), {"B": 0}
    solo = g.gain[:, 0] - (inst.tx(1) if inst.shrinking else 0.0)  # constant-batch gains include tx already
    order = np.argsort(-solo, kind="stable")
    best, best_d = g.base, Decision.all_local(inst)
    granted = np.zeros(inst.N, dtype=bool)
    for i in order[:inst.capacity]:
        granted[i] = True
        d, val = best_for_set(inst, granted, g)
        if val <= best:
            break
        best, best_d = val, d
    return best_d, {"B": best_d.B}
