"""Brute force: every grant subset with each granted user's best split; for tests (N <= 12).

Constant batch: all 2^N subsets are scored directly. Shrinking batch: the maximum over
every subset and every assignment of its users to the batch ranks 1..B, found by dynamic
programming over subsets (the user at rank |S| is the last one added to S): the same
maximum as listing all B! orders of every subset, in O(2^N N) instead of O(sum C(N,B) B!).
It relies on the rank identity in exact.py, not on the assignment solver; tests check that
identity itself against a plain enumeration of splits on a grid.
"""

from __future__ import annotations

import numpy as np

from .latency import Decision, gains
from .scenario import Instance

MAX_USERS = 12


def _masks(N: int) -> np.ndarray:
    ids = np.arange(2 ** N)
    return ((ids[:, None] >> np.arange(N)[None, :]) & 1).astype(bool)


def solve(inst: Instance, grid: np.ndarray | None = None):
    if inst.N > MAX_USERS:
        raise ValueError(f"brute force takes N <= {MAX_USERS}")
    g = gains(inst, grid)
    N, cap = inst.N, inst.capacity
    if cap == 0:
        return Decision.all_local(inst), {"B": 0, "value": g.base, "subsets": 1}
    masks = _masks(N)
    size = masks.sum(1)
    ok = size <= cap
    tx = np.stack([inst.tx(B) for B in range(N + 1)])  # (N+1, N): tx at batch B
    txsum = np.where(masks, tx[size], 0.0).sum(1)
    rank_of = None
    if not inst.shrinking:
        col = np.clip(size - 1, 0, cap - 1)
        val = np.where(masks, g.gain[:, col].T, 0.0).sum(1)
    else:
        val, last = np.full(len(masks), -np.inf), np.full(len(masks), -1)
        val[0] = 0.0
        for k in range(1, cap + 1):
            layer = np.flatnonzero(size == k)
            for i in range(N):
                has = layer[masks[layer, i]]
                cand = val[has ^ (1 << i)] + g.gain[i, k - 1]
                better = cand > val[has]
                val[has[better]], last[has[better]] = cand[better], i
        rank_of = last
        val = val - txsum
    val = np.where(ok, val, -np.inf)
    best = int(val.argmax()) if val.max() > 0 else 0
    d = Decision.all_local(inst)
    who = np.flatnonzero(masks[best])
    d.granted[who] = True
    B = len(who)
    if B and not inst.shrinking:
        d.n[who] = g.n[who, B - 1]
    elif B:
        m = best
        for r in range(B, 0, -1):
            i = rank_of[m]
            d.n[i] = g.n[i, r - 1]
            m ^= 1 << i
    return d, {"B": B, "value": g.base + float(max(val[best], 0.0)), "subsets": int(ok.sum())}
