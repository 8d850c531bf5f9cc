"""Exact planners for both latency models, polynomial in N and the capacity.

Constant batch (the paper's model). The batch size B couples the users only through B:
for a fixed B, a granted user's value alpha PAI(n) - n tau - (T - n)(k_e B + h_e) - tx(B)
depends on no one else. So U(G) = U(all local) + sum_{i in G} g_i(|G|), with g_i(B) the
user's best gain at batch B (its split from `best_split`), and
max_G U(G) = U(all local) + max_B (sum of the B largest g_i(B)). Enumerating
B = 0..capacity and re-ranking the users for each B is exact: O(N cap log N).

Shrinking batch (step-level batching). With m_i = T - n_i the server part of the
granted users' total latency is k_e sum_{i,j in G} min(m_i, m_j) + h_e sum m_i. For
m sorted in decreasing order, the pair (i, j) costs m at rank max(r_i, r_j), and exactly
2r - 1 ordered pairs have their larger rank equal to r, so
sum_{i,j} min(m_i, m_j) = sum_r (2r - 1) m_(r).
Any other one-to-one assignment pi of the users to ranks 1..B gives
sum_i (2 pi(i) - 1) m_i >= sum_r (2r - 1) m_(r) (rearrangement inequality: the largest m
against the smallest coefficient is the smallest pairing). Hence
-k_e sum_{i,j} min(m_i, m_j) = max_pi -k_e sum_i (2 pi(i) - 1) m_i, and
max_{G, n} U = U(all local) + max_B max_{G, pi} sum_{i in G} [w_i(pi(i)) - tx_i(B)], where
w_i(r) = max_n alpha_i PAI(n) - n tau_i - (T - n)(k_e(2r - 1) + h_e) - (alpha_i PAI(T) - T tau_i)
is the constant-batch gain at an effective batch of 2r - 1: a separate 1-D problem per (user, rank).
For each B that is a rectangular assignment of N users to B ranks, solved exactly by the
Hungarian algorithm (scipy's linear_sum_assignment). The assignment's splits, evaluated
with the true sorted order, are at least as good as its value (sorting can only lower the
server term) and no decision is better than the maximum: so they are optimal.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from .latency import Decision, Gains, gains
from .scenario import Instance


def solve_constant(inst: Instance, grid: np.ndarray | None = None, g: Gains | None = None):
    g = g or gains(inst, grid)
    if inst.capacity == 0:
        return Decision.all_local(inst), {"B": 0, "value": g.base}
    order = np.argsort(-g.gain, axis=0, kind="stable")  # (N, cap): users by gain, for each B
    top = np.take_along_axis(g.gain, order, 0).cumsum(0)  # top[k, B-1]: the k+1 largest gains at B
    Bs = np.arange(1, inst.capacity + 1)
    best = np.concatenate([[0.0], top[Bs - 1, Bs - 1]])
    B = int(best.argmax())
    d = Decision.all_local(inst)
    if B:
        who = order[:B, B - 1]
        d.granted[who] = True
        d.n[who] = g.n[who, B - 1]
    return d, {"B": B, "value": g.base + float(best[B])}


def solve_shrinking(inst: Instance, grid: np.ndarray | None = None, g: Gains | None = None):
    g = g or gains(inst, grid)
    best_val, best = 0.0, (np.array([], dtype=int), np.array([], dtype=int))
    for B in range(1, inst.capacity + 1):
        w = g.gain[:, :B] - inst.tx(B)[:, None]
        rows, cols = linear_sum_assignment(w, maximize=True)
        val = float(w[rows, cols].sum())
        if val > best_val:
            best_val, best = val, (rows, cols)
    d = Decision.all_local(inst)
    rows, cols = best
    d.granted[rows] = True
    d.n[rows] = g.n[rows, cols]
    return d, {"B": len(rows), "value": g.base + best_val}


def solve(inst: Instance, grid: np.ndarray | None = None):
    return (solve_shrinking if inst.shrinking else solve_constant)(inst, grid)


def best_for_set(inst: Instance, granted: np.ndarray, g: Gains | None = None,
                 grid: np.ndarray | None = None) -> tuple[Decision, float]:
    """The best splits for a given granted set, and the objective they reach (U, not the gain).

    The heuristics decide who; this sets where, exactly: constant batch, each user's best
    split at B = |G|; shrinking batch, the square assignment of the set to ranks 1..B.
    """
    g = g or gains(inst, grid)
    d = Decision.all_local(inst)
    who = np.flatnonzero(granted)
    B = len(who)
    if B == 0:
        return d, g.base
    d.granted[who] = True
    if inst.shrinking:
        w = g.gain[who, :B] - inst.tx(B)[who, None]
        rows, cols = linear_sum_assignment(w, maximize=True)
        d.n[who[rows]] = g.n[who[rows], cols]
        return d, g.base + float(w[rows, cols].sum())
    d.n[who] = g.n[who, B - 1]
    return d, g.base + float(g.gain[who, B - 1].sum())


def set_values(inst: Instance, masks: np.ndarray, g: Gains) -> np.ndarray:
    """Objective of many granted sets at once (masks: (P, N) bool, each |G| <= capacity), constant batch only."""
    B = masks.sum(1)
    cols = np.clip(B - 1, 0, max(inst.capacity - 1, 0))
    per = g.gain[:, cols].T if inst.capacity else np.zeros(masks.shape)  # (P, N)
    return g.base + np.where(masks, per, 0.0).sum(1)
