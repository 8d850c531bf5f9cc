"""The server's own per-step profile: seconds per batched step = k_e * B + h_e, fitted live.

The planner needs what one U-Net call of B trajectories costs on this machine now,
not on the machine the paper measured. Every call the engine makes is a sample
(B, seconds). On a machine shared with other work the same call takes longer when the
machine is busier, so the fit is least squares with a load factor:
seconds = level(t) * (k B + h). The shape (k, h) is fitted over the recent calls, each
span of two seconds with its own level, together with the start-up warm-up's calls
(several batch sizes back to back, at one load: they always hold the slope); the
level now is fitted over the recent calls, the newest weighing most; k_e, h_e are the
shape times the level now. Fitting one line through all recent calls instead bends
it whenever the load changed between calls of different batch sizes (idle batches
of three, then busy batches of one, read as a flat profile).

Until anything is measured (and for a stand-in worker) a conservative default
holds, one that overstates the server's cost so that an unmeasured server grants too
few users rather than too many.

Beside the steps, a served request costs the server some seconds outside U-Net calls
(its batch's prompt encodings, serialization); their recent median is kept too, as a
per-request constant the planner adds to a granted user's latency.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict, deque

import numpy as np
import torch

DEFAULT_K_E = 0.05  # seconds per step per trajectory in the batch
DEFAULT_H_E = 0.10  # seconds per step, whatever the batch
MAX_SAMPLES = 64
HALF_LIFE = 16  # calls: in the level now, a call's weight halves with every 16 newer ones
SPAN_SECONDS = 2.0  # calls within one span share a level
MAX_OVERHEADS = 32


class StepProfile:
    """k_e, h_e from the warm-up's calls and the last `max_samples` calls (see the module's doc)."""

    def __init__(self, k_e: float = DEFAULT_K_E, h_e: float = DEFAULT_H_E, max_samples: int = MAX_SAMPLES,
                 half_life: float = HALF_LIFE, span_seconds: float = SPAN_SECONDS):
        self.half_life, self.span_seconds = half_life, span_seconds
        self._anchor: list[tuple[int, float]] = []
        self._samples: deque[tuple[float, int, float]] = deque(maxlen=max_samples)  # (when, B, seconds)
        self._overheads: deque[float] = deque(maxlen=MAX_OVERHEADS)
        self._lock = threading.Lock()
        self._k, self._h = float(k_e), float(h_e)
        self._stale = False  # samples came since the last fit (fitted when read, not on the engine's thread)
        self.overhead = 0.0  # seconds a served request spends on the server outside U-Net calls
        self.fitted = False  # False while k_e, h_e are the default

    def observe(self, batch: int, seconds: float, at: float | None = None) -> None:
        if batch < 1 or not seconds >= 0 or seconds == float("inf"):
            return
        with self._lock:
            self._samples.append((time.monotonic() if at is None else at, int(batch), float(seconds)))
            self._stale = True

    def seed(self, samples) -> None:
        """The warm-up's (B, seconds) calls: kept for the shape while live calls come and go."""
        with self._lock:
            self._anchor = [(int(b), float(s)) for b, s in samples if b >= 1 and s >= 0]
            self._stale = self._stale or bool(self._anchor)

    @property
    def k_e(self) -> float:
        return self.snapshot()["k_e"]

    @property
    def h_e(self) -> float:
        return self.snapshot()["h_e"]

    def observe_overhead(self, seconds: float) -> None:
        """A served request's seconds outside U-Net calls: its batch's prefills, serialization, the loop's turns."""
        if not seconds >= 0 or seconds == float("inf"):
            return
        with self._lock:
            self._overheads.append(float(seconds))
            self.overhead = statistics.median(self._overheads)

    @property
    def samples(self) -> int:
        return len(self._anchor) + len(self._samples)

    def snapshot(self) -> dict:
        with self._lock:
            if self._stale:
                self._refit()
            return {"k_e": self._k, "h_e": self._h, "samples": len(self._anchor) + len(self._samples),
                    "fitted": self.fitted, "overhead_s": self.overhead}

    def step_seconds(self, batch: int) -> float:
        p = self.snapshot()
        return p["k_e"] * batch + p["h_e"]

    def _refit(self) -> None:
        groups = defaultdict(list)
        for b, sec in self._anchor:
            groups[None].append((b, sec))
        for at, b, sec in self._samples:
            groups[int(at // self.span_seconds)].append((b, sec))
        k, h = fit_shape(list(groups.values()), (self._k, self._h))
        recent = [(b, sec) for _, b, sec in self._samples] or self._anchor
        level = fit_level(recent, k, h, self.half_life)
        self._k, self._h = level * k, level * h
        self._stale, self.fitted = False, True


def fit(samples, k_prior: float = DEFAULT_K_E) -> tuple[float, float]:
    """Least squares of seconds = k_e B + h_e with k_e, h_e >= 0, over (B, seconds) samples.

    With a single batch size the slope cannot be seen: keep `k_prior` and fit h_e alone.
    A negative coefficient (noise on a nearly flat or nearly proportional profile) is
    pinned at 0 and the other refitted, which is the constrained optimum in that case.
    """
    n = len(samples)
    if n == 0:
        return k_prior, DEFAULT_H_E
    b = np.array([x for x, _ in samples], dtype=float)
    s = np.array([y for _, y in samples], dtype=float)
    sbb = float(((b - b.mean()) ** 2).sum())
    if sbb <= 1e-12 * n:
        k = max(k_prior, 0.0)
        return k, max(float(s.mean()) - k * float(b.mean()), 0.0)
    k = float(((b - b.mean()) * (s - s.mean())).sum()) / sbb
    h = float(s.mean()) - k * float(b.mean())
    if k < 0:
        return 0.0, max(float(s.mean()), 0.0)
    if h < 0:
        return float((b * s).sum() / (b * b).sum()), 0.0
    return k, h


def fit_shape(groups: list[list[tuple[int, float]]], prior: tuple[float, float],
              iterations: int = 30) -> tuple[float, float]:
    """(k, h) >= 0 of seconds = level_g (k B + h), each group g with a level of its own (alternating least squares).

    Only groups with several batch sizes (or several groups) tell the slope; when none
    do, the prior's slope-to-intercept ratio is kept. The scale is the levels' mean.
    """
    bs = [np.array([b for b, _ in g], dtype=float) for g in groups if g]
    ss = [np.array([s for _, s in g], dtype=float) for g in groups if g]
    if not bs:
        return prior
    k, h = fit([(b, s) for bb, sv in zip(bs, ss) for b, s in zip(bb, sv)], prior[0])
    if k == 0 and h == 0:
        return k, h
    for _ in range(iterations):
        levels = [max(float((s * (k * b + h)).sum() / ((k * b + h) ** 2).sum()), 1e-9) for b, s in zip(bs, ss)]
        x1 = np.concatenate([lv * b for lv, b in zip(levels, bs)])
        x2 = np.concatenate([np.full(len(b), lv) for lv, b in zip(levels, bs)])
        y = np.concatenate(ss)
        a11, a12, a22 = float(x1 @ x1), float(x1 @ x2), float(x2 @ x2)
        det = a11 * a22 - a12 * a12
        if det <= 1e-12 * a11 * a22:  # one batch size in all: keep the prior's ratio
            ratio = prior[1] / prior[0] if prior[0] > 0 else float("inf")
            if not np.isfinite(ratio):
                return 0.0, float(y @ x2 / a22)
            scale = float(y @ (x1 + ratio * x2) / ((x1 + ratio * x2) @ (x1 + ratio * x2)))
            return scale, scale * ratio
        r1, r2 = float(x1 @ y), float(x2 @ y)
        k_new, h_new = (a22 * r1 - a12 * r2) / det, (a11 * r2 - a12 * r1) / det
        if k_new < 0:
            k_new, h_new = 0.0, r2 / a22
        elif h_new < 0:
            k_new, h_new = r1 / a11, 0.0
        mean = float(np.mean(levels))
        k_new, h_new = k_new * mean, h_new * mean
        if abs(k_new - k) <= 1e-9 * (1 + k) and abs(h_new - h) <= 1e-9 * (1 + h):
            return k_new, h_new
        k, h = k_new, h_new
    return k, h


def fit_level(samples, k: float, h: float, half_life: float) -> float:
    """The level now: least squares of seconds = level (k B + h) over (B, seconds) samples, oldest first,
    a sample's weight halving with every `half_life` newer ones."""
    if not samples or (k == 0 and h == 0):
        return 1.0
    n = len(samples)
    w = 0.5 ** ((n - 1 - np.arange(n)) / half_life)
    p = np.array([k * b + h for b, _ in samples], dtype=float)
    s = np.array([sec for _, sec in samples], dtype=float)
    return float((w * s * p).sum() / (w * p * p).sum())


def warm_up(worker, capacity: int, size: int = 64, steps: int = 25, guidance: float = 5.0,
            repeats: int = 3) -> list[tuple[int, float]]:
    """Time the worker's U-Net at a few batch sizes up to `capacity` (zero prompts, a typical request's shape).

    The first call at each size is dropped: it pays for allocations a running server has behind it.
    The text encoder runs once too, untimed, so that it is loaded before the first request.
    """
    from ..core.trajectory import new_trajectory

    size = max(worker.factor, min(size, worker.max_size) // worker.factor * worker.factor)
    side = size // worker.factor
    latent = (worker.unet.config.in_channels, side, side)
    zeros = torch.zeros(worker.prompt_length, worker.context_dim)
    sizes = sorted({b for b in (1, 2, 4, capacity) if 1 <= b <= capacity})
    worker.pipe.encoder(["", ""])  # a text encoder loads on first use: not in the first request's time
    samples = []
    for b in sizes:
        trajs = [new_trajectory(zeros, zeros, latent_shape=latent, steps=steps, seed=i, guidance_scale=guidance,
                                noise_schedule=worker.pipe.noise_schedule) for i in range(b)]
        for k in range(repeats + 1):
            seconds, _ = worker.step(trajs)
            if k:
                samples.append((b, seconds))
    return samples
