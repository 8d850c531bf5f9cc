"""What one rank sent, received and waited for, step by step.

Bytes are counted when an exchange is posted; waiting is the time spent blocked on
exchanges (on CUDA the host rarely blocks, so there it mostly shows up as compute).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

CATEGORIES = ("attention", "halo", "groupnorm", "output")


@dataclass
class StepStats:
    step: int
    rank: int
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    received: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    compute_s: float = 0.0
    wait_s: float = 0.0

    def row(self) -> dict[str, float]:
        """One flat record (for CSV and JSON)."""
        out: dict[str, float] = {"step": self.step, "rank": self.rank}
        out.update({f"sent_{c}": self.sent[c] for c in CATEGORIES})
        out.update({f"received_{c}": self.received[c] for c in CATEGORIES})
        out.update(compute_s=self.compute_s, wait_s=self.wait_s)
        return out


class Stats:
    """Per-step records of this rank; each U-Net call is one step."""

    def __init__(self, rank: int):
        self.rank = rank
        self.steps: list[StepStats] = []
        self._open: StepStats | None = None
        self._started = 0.0

    def begin(self, step: int) -> None:
        self._open = StepStats(step, self.rank)
        self._started = time.perf_counter()

    def end(self) -> None:
        if self._open is not None:
            total = time.perf_counter() - self._started
            self._open.compute_s = max(0.0, total - self._open.wait_s)
            self.steps.append(self._open)
            self._open = None

    def traffic(self, category: str, sent: int, received: int) -> None:
        if self._open is not None:
            self._open.sent[category] += sent
            self._open.received[category] += received

    def waited(self, seconds: float) -> None:
        if self._open is not None:
            self._open.wait_s += seconds

    def rows(self) -> list[dict[str, float]]:
        return [s.row() for s in self.steps]

    def clear(self) -> None:
        self.steps.clear()


def per_step(rows: list[dict[str, float]], from_step: int = 0) -> dict[str, float]:
    """Bytes sent per step by category, summed over ranks; compute and wait per step, averaged.

    Only steps >= from_step count (pass the warm-up length for the steady state), unless
    there are none.
    """
    kept = [r for r in rows if r["step"] >= from_step] or rows
    steps = len({r["step"] for r in kept}) or 1
    ranks = len({r["rank"] for r in kept}) or 1
    out = {c: sum(r[f"sent_{c}"] for r in kept) / steps for c in CATEGORIES}
    out["total"] = sum(out[c] for c in CATEGORIES)
    out["compute_s"] = sum(r["compute_s"] for r in kept) / (steps * ranks)
    out["wait_s"] = sum(r["wait_s"] for r in kept) / (steps * ranks)
    return out
