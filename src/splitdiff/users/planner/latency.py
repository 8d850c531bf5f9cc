"""Latency, objective, and each user's best split.

A decision grants a set G (|G| = B <= capacity) and gives each granted user a split
n_i: the last n_i of T steps run on its device, the first m_i = T - n_i on the server.

Latency L_i (seconds), both models:
- every user waits w_i = window - t_i (the paper charges it to all users: a constant of
  the instance, so it never changes which decision is best);
- a denied user then runs all T steps locally: L_i = w_i + T tau_i, and gets PAI(T);
- a granted user adds its transmission tx_i(B), the server's steps and its own n_i tau_i:
  constant batch (the paper's):  (T - n_i)(k_e B + h_e)
  shrinking batch (step-level batching): k_e sum_{j in G} min(m_i, m_j) + h_e m_i,
  since at each server step the batch holds only the users not yet handed back.

Objective U = sum_i alpha_i PAI(n_i) - sum_i L_i, over all N users.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenario import Instance


@dataclass
class Decision:
    granted: np.ndarray  # bool, one per user
    n: np.ndarray  # device steps; T for denied users

    @classmethod
    def all_local(cls, inst: Instance) -> "Decision":
        return cls(np.zeros(inst.N, dtype=bool), np.full(inst.N, inst.T))

    @property
    def B(self) -> int:
        return int(self.granted.sum())


def server_seconds(inst: Instance, granted: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Each granted user's time on the server (0 for denied users)."""
    out = np.zeros(inst.N)
    g = np.flatnonzero(granted)
    if len(g) == 0:
        return out
    m = inst.T - n[g]
    if inst.shrinking:
        out[g] = inst.k_e * np.minimum(m[:, None], m[None, :]).sum(1) + inst.h_e * m
    else:
        out[g] = m * (inst.k_e * len(g) + inst.h_e)
    return out


def latencies(inst: Instance, d: Decision) -> np.ndarray:
    """L_i for every user under the instance's latency model."""
    B = d.B
    n = np.where(d.granted, d.n, inst.T)
    tx = np.where(d.granted, inst.tx(B), 0.0)
    return inst.wait + tx + server_seconds(inst, d.granted, n) + n * inst.tau


def check_decision(inst: Instance, d: Decision) -> None:
    if d.B > inst.capacity:
        raise ValueError(f"{d.B} users granted, capacity {inst.capacity}")
    if d.B and not inst.splits_are_feasible(d.n[d.granted]):
        raise ValueError("a granted user's split lies outside the n range (or is not whole)")


def objective(inst: Instance, d: Decision) -> float:
    """U = sum alpha_i PAI(n_i) - sum L_i; denied users count with PAI(T)."""
    check_decision(inst, d)
    n = np.where(d.granted, d.n, inst.T)
    return float(np.sum(inst.alpha * inst.pai(n)) - np.sum(latencies(inst, d)))


def closed_form_split(alpha, tau, s, a, b, n_lo, n_hi):
    """The paper's per-user split at server cost s per step, valid when PAI is concave on the range (b <= n_lo).

    d/dn [alpha PAI(n) - n tau - (T - n) s] = alpha a P (1 - P) - c with c = tau - s, P = PAI(n).
    c <= 0: always rising, n_hi. With q = c / (alpha a): q >= 1/4 means alpha a P(1-P) <= c
    everywhere (P(1-P) <= 1/4), always falling, n_lo. Otherwise P(1-P) = q has the root
    P = (1 + r)/2, r = sqrt(1 - 4q), on the concave side, so n = b + (1/a) ln(P/(1-P))
    = b + (2/a) artanh(r), clipped to the range.
    """
    alpha, tau, s = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (alpha, tau, s)))
    c = tau - s
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.where(alpha > 0, c / (alpha * a), np.inf)
        r = np.sqrt(np.clip(1 - 4 * q, 0, 1))
        root = b + (2 / a) * np.arctanh(np.minimum(r, 1 - 1e-16))
    n = np.where(c <= 0, n_hi, np.where(q >= 0.25, n_lo, np.clip(root, n_lo, n_hi)))
    return n


def split_value(inst: Instance, n, s, idx=slice(None)):
    """alpha PAI(n) - n tau - (T - n) s: the parts of a granted user's value that depend on n."""
    al, ta = inst.alpha[idx], inst.tau[idx]
    shape = np.broadcast_shapes(np.shape(n), np.shape(s))
    al = al.reshape(al.shape + (1,) * (len(shape) - 1)) if al.ndim else al
    ta = ta.reshape(ta.shape + (1,) * (len(shape) - 1)) if ta.ndim else ta
    return al * inst.pai(n) - n * ta - (inst.T - n) * s


def best_split(inst: Instance, s, grid: np.ndarray | None = None):
    """Each user's best split n*(s) and its value, for server cost s per step (s: shape (K,) -> (N, K)).

    Exact for any b: alpha PAI(n) - n tau - (T - n) s falls, then rises, then falls (its
    derivative alpha a P(1-P) - c is positive only between the two roots of P(1-P) = q),
    so its maximum on [n_lo, n_hi] is at n_lo, n_hi or the concave root: compare the three.
    With whole splits the concave root is replaced by its floor and ceiling; on a grid,
    every grid point is compared.
    """
    s = np.atleast_1d(np.asarray(s, dtype=float))[None, :]
    if grid is not None:
        g = np.asarray(grid, dtype=float)
        vals = split_value(inst, g[None, None, :], s[..., None])  # (N, K, G)
        k = vals.argmax(-1)
        return g[k], np.take_along_axis(vals, k[..., None], -1)[..., 0]
    lo, hi = inst.n_lo, inst.n_hi
    root = closed_form_split(inst.alpha[:, None], inst.tau[:, None], s, inst.a, inst.b, lo, hi)
    cands = [np.full_like(root, lo), np.full_like(root, hi)]
    if inst.integer:
        cands += [np.clip(np.floor(root), lo, hi), np.clip(np.ceil(root), lo, hi)]
    else:
        cands.append(root)
    cands = np.stack(cands, -1)  # (N, K, C)
    vals = split_value(inst, cands, s[..., None])
    k = vals.argmax(-1)
    return np.take_along_axis(cands, k[..., None], -1)[..., 0], np.take_along_axis(vals, k[..., None], -1)[..., 0]


def rank_cost(inst: Instance, ranks: np.ndarray) -> np.ndarray:
    """Server seconds per step charged to the user at rank r (1 = leaves last) of a shrinking batch: k_e(2r - 1) + h_e."""
    return inst.k_e * (2 * np.asarray(ranks, dtype=float) - 1) + inst.h_e


@dataclass
class Gains:
    """Each user's gain from being granted, net of its all-local value, with the split that reaches it.

    Constant batch: column B-1 is batch size B. Shrinking batch: column r-1 is rank r,
    without the transmission (which depends on B alone: subtract inst.tx(B)).
    """

    gain: np.ndarray  # (N, capacity)
    n: np.ndarray  # (N, capacity)
    base: float = 0.0  # the all-local objective


def gains(inst: Instance, grid: np.ndarray | None = None) -> Gains:
    cols = np.arange(1, inst.capacity + 1)
    local = inst.local_value()
    if inst.shrinking:
        s = rank_cost(inst, cols)
    else:
        s = inst.k_e * cols + inst.h_e
    n, v = best_split(inst, s, grid)
    g = v - (local + inst.wait)[:, None]  # the wait is paid either way
    if not inst.shrinking:
        g = g - inst.tx_unit[:, None] * (cols[None, :] if inst.shared else 1)
    return Gains(g, n, float(local.sum()))
