"""The paper's branch-and-bound baseline as a mixed-integer program, solved by HiGHS (scipy.optimize.milp).

Splits are restricted to a grid n_1..n_K (whole steps when the range is small, else K
evenly spaced points), so the program is exact on that grid, and only there.

Constant batch: binary x[i,k,B] (user i granted at split n_k in a batch of B) and a
one-hot y[B], B = 0..capacity:
  max sum gain(i, n_k, B) x[i,k,B]
  s.t. sum_B y[B] = 1;  sum_k x[i,k,B] <= y[B];  sum_{i,k} x[i,k,B] = B y[B].
Shrinking batch: binary x[i,k,r] (user i at split n_k holds batch rank r), each user and
each rank used at most once, ranks filled from 1 up, the one-hot y[B] tied to the number
granted, and z[i,B] >= granted_i + y[B] - 1 to charge the transmission at batch B:
  max sum w(i, n_k, r) x[i,k,r] - sum tx_i(B) z[i,B].
w is the rank-r gain of exact.py (effective batch 2r - 1); by the rearrangement argument
there, the best ranked assignment equals the best decision.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from .latency import Decision, rank_cost, split_value
from .scenario import Instance

MAX_USERS = 100
GRID_POINTS = 13  # the paper's range 80..200 every 10 steps


def default_grid(inst: Instance, points: int = GRID_POINTS) -> np.ndarray:
    if inst.integer and inst.n_hi - inst.n_lo + 1 <= 4 * points:
        return np.arange(inst.n_lo, inst.n_hi + 1)
    return np.unique(np.linspace(inst.n_lo, inst.n_hi, points))


class _Rows:
    """Sparse constraint rows, built one at a time."""

    def __init__(self):
        self.r, self.c, self.v, self.lo, self.hi = [], [], [], [], []

    def add(self, cols, vals, lo, hi):
        k = len(self.lo)
        cols = np.atleast_1d(cols)
        self.r.append(np.full(len(cols), k))
        self.c.append(cols)
        self.v.append(np.broadcast_to(np.asarray(vals, dtype=float), cols.shape))
        self.lo.append(lo)
        self.hi.append(hi)

    def constraint(self, n_vars: int) -> LinearConstraint:
        A = coo_array((np.concatenate(self.v), (np.concatenate(self.r), np.concatenate(self.c))),
                      shape=(len(self.lo), n_vars)).tocsr()
        return LinearConstraint(A, np.array(self.lo, dtype=float), np.array(self.hi, dtype=float))


def _values(inst: Instance, grid: np.ndarray, s: np.ndarray) -> np.ndarray:
    """(N, K, S): a granted user's gain over all-local at each grid split and server cost, transmission left out."""
    local = inst.alpha * inst.pai(inst.T) - inst.T * inst.tau
    v = split_value(inst, grid[None, :, None], s[None, None, :])
    return v - local[:, None, None]


def solve(inst: Instance, grid: np.ndarray | None = None, grid_points: int = GRID_POINTS,
          time_limit: float = 60.0):
    grid = default_grid(inst, grid_points) if grid is None else np.asarray(grid, dtype=float)
    N, K, cap = inst.N, len(grid), inst.capacity
    if cap == 0 or N == 0:
        return Decision.all_local(inst), {"B": 0, "status": "nobody can be granted", "optimal": True, "grid": K}
    ranks = np.arange(1, cap + 1)
    rows = _Rows()
    nx = N * K * cap  # x[i,k,c] at (c * N + i) * K + k, c = B - 1 or r - 1
    xi = (np.arange(cap)[:, None, None] * N + np.arange(N)[None, :, None]) * K + np.arange(K)[None, None, :]
    y0 = nx  # y[B] at y0 + B
    if not inst.shrinking:
        s = inst.k_e * ranks + inst.h_e
        gain = _values(inst, grid, s) - (inst.tx_unit[:, None, None] * (ranks if inst.shared else 1)[None, None, :])
        n_vars = nx + cap + 1
        c = np.zeros(n_vars)
        c[xi] = -np.transpose(gain, (2, 0, 1))
        rows.add(y0 + np.arange(cap + 1), 1.0, 1, 1)
        for B in ranks:
            for i in range(N):
                rows.add(np.append(xi[B - 1, i], y0 + B), np.append(np.ones(K), -1.0), -np.inf, 0)
            rows.add(np.append(xi[B - 1].ravel(), y0 + B), np.append(np.ones(N * K), -float(B)), 0, 0)
        integrality = np.ones(n_vars)
    else:
        w = _values(inst, grid, rank_cost(inst, ranks))  # (N, K, cap)
        z0 = y0 + cap + 1  # z[i,B] at z0 + (B - 1) * N + i
        n_vars = z0 + N * cap
        c = np.zeros(n_vars)
        c[xi] = -np.transpose(w, (2, 0, 1))
        tx = np.stack([inst.tx(B) for B in ranks])  # (cap, N)
        c[z0:] = tx.ravel()
        rows.add(y0 + np.arange(cap + 1), 1.0, 1, 1)
        for i in range(N):
            rows.add(xi[:, i].ravel(), 1.0, -np.inf, 1)
        for r in ranks:
            rows.add(xi[r - 1].ravel(), 1.0, -np.inf, 1)
            if r > 1:
                rows.add(np.concatenate([xi[r - 1].ravel(), xi[r - 2].ravel()]),
                         np.concatenate([np.ones(N * K), -np.ones(N * K)]), -np.inf, 0)
        rows.add(np.concatenate([xi.ravel(), y0 + ranks]), np.concatenate([np.ones(xi.size), -ranks.astype(float)]),
                 0, 0)
        for B in ranks:
            for i in range(N):
                rows.add(np.concatenate([xi[:, i].ravel(), [y0 + B, z0 + (B - 1) * N + i]]),
                         np.concatenate([np.ones(cap * K), [1.0, -1.0]]), -np.inf, 1)
        integrality = np.ones(n_vars)
        integrality[z0:] = 0
    res = milp(c, constraints=rows.constraint(n_vars), integrality=integrality, bounds=Bounds(0, 1),
               options={"time_limit": time_limit, "disp": False})
    d = Decision.all_local(inst)
    info = {"status": res.message, "optimal": res.status == 0, "grid": K, "variables": n_vars}
    if res.x is None:
        info["B"] = 0
        return d, info
    x = res.x[xi] > 0.5  # (cap, N, K)
    c_i, i_i, k_i = np.nonzero(x)
    d.granted[i_i] = True
    d.n[i_i] = grid[k_i]
    info["B"] = d.B
    return d, info


def exact_on_grid(inst: Instance, grid: np.ndarray | None = None, grid_points: int = GRID_POINTS):
    """The exact solver restricted to the MILP's grid: what the MILP must match."""
    from . import exact

    grid = default_grid(inst, grid_points) if grid is None else grid
    return exact.solve(inst, grid)

