"""Random scenario families: the paper's (T = 200) and splitdiff's own (T = 25, measured times).

The paper's constants (Yang et al., IEEE TMC 2025, as its released code sets them):
eight device classes, drawn with weights rising linearly from 1 to 2 over the eight; alpha
uniform within bounds that grow from 7-29 (first class) to 26-76 (last class) — the code's
exact per-class bounds are not published, so they are interpolated linearly over the class
index; request times U(0, 1) within a 1 s window; each granted user sends 216 bits of prompt
and 4.4e6 bits of intermediate over W = 100 MHz shared by the batch, spectral efficiency 10.
"""

from __future__ import annotations

import numpy as np

from ..pai import MEASURED as MEASURED_PAI
from .scenario import Latency, Scenario, Transmission

PAPER_T = 200
PAPER_N_RANGE = (80.0, 200.0)
PAPER_CAPACITY = 18
PAPER_K_E, PAPER_H_E = 2.2788e-3, 8.604e-4
PAPER_PAI = (0.0413, 71.44)
PAPER_DEVICE_MS = (119.5, 120.1, 128.7, 206.8, 270.0, 239.6, 295.9, 305.8)
PAPER_CLASS_WEIGHTS = np.linspace(1.0, 2.0, 8) / np.linspace(1.0, 2.0, 8).sum()
PAPER_ALPHA_LO = np.linspace(7.0, 26.0, 8)
PAPER_ALPHA_HI = np.linspace(29.0, 76.0, 8)
PAPER_PAYLOAD_BITS = 216 + 4.4e6
PAPER_BANDWIDTH_HZ = 100e6
PAPER_ETA = 10.0


def paper_users(N: int, rng: np.random.Generator) -> list[dict]:
    cls = rng.choice(8, size=N, p=PAPER_CLASS_WEIGHTS)
    alpha = rng.uniform(PAPER_ALPHA_LO[cls], PAPER_ALPHA_HI[cls])
    t = rng.uniform(0.0, 1.0, size=N)
    return [dict(id=f"u{i}", tau=PAPER_DEVICE_MS[c] / 1000, alpha=float(a), request_time=float(ti),
                 payload_bits=PAPER_PAYLOAD_BITS, bandwidth_hz=PAPER_BANDWIDTH_HZ)
            for i, (c, a, ti) in enumerate(zip(cls, alpha, t))]


def paper_scenario(N: int, rng: np.random.Generator | int, latency: Latency = "constant-batch",
                   transmission: Transmission = "sound") -> Scenario:
    """One draw of the paper's family with N users."""
    rng = np.random.default_rng(rng)
    a, b = PAPER_PAI
    return Scenario.model_validate(dict(
        T=PAPER_T, n_min=PAPER_N_RANGE[0], n_max=PAPER_N_RANGE[1], pai=dict(a=a, b=b),
        server=dict(k_e=PAPER_K_E, h_e=PAPER_H_E, capacity=PAPER_CAPACITY), latency=latency,
        transmission=transmission, spectral_efficiency=PAPER_ETA, window=1.0, users=paper_users(N, rng)))


def splitdiff_scenario(N: int, rng: np.random.Generator | int, k_e: float, h_e: float,
                       device_taus: list[float] | tuple[float, ...], T: int = 25, capacity: int = 16,
                       pai: tuple[float, float] = MEASURED_PAI, alpha_range: tuple[float, float] = (0.5, 3.0),
                       n_range: tuple[int, int] = (0, 25), payload_bits: float = 8 * 160e3,
                       bandwidth_hz: float = 1e9, window: float = 0.05,
                       latency: Latency = "shrinking-batch") -> Scenario:
    """splitdiff's own family: pass the server's fitted k_e, h_e (seconds per step: k_e B + h_e) and the
    devices' measured seconds per step; users draw a device uniformly.

    The PAI curve is the one measured on the shipped adapters (users.pai); alpha's range
    is splitdiff's choice; the payload is a trajectory's size (latents, prompt embeddings, schedule).
    Whole splits and the shrinking batch: that is what splitdiff's server runs.
    """
    rng = np.random.default_rng(rng)
    taus = np.asarray(device_taus, dtype=float)
    dev = rng.integers(len(taus), size=N)
    alpha = rng.uniform(*alpha_range, size=N)
    t = rng.uniform(0.0, window, size=N)
    users = [dict(id=f"u{i}", tau=float(taus[d]), alpha=float(a), request_time=float(ti),
                  payload_bits=payload_bits, bandwidth_hz=bandwidth_hz)
             for i, (d, a, ti) in enumerate(zip(dev, alpha, t))]
    return Scenario.model_validate(dict(
        T=T, n_min=n_range[0], n_max=n_range[1], integer_splits=True, pai=dict(a=pai[0], b=pai[1]),
        server=dict(k_e=k_e, h_e=h_e, capacity=capacity, shared_channel=False), latency=latency,
        transmission="sound", spectral_efficiency=1.0, window=window, users=users))
