"""Who takes part in the next U-Net call.

Admission is first come, first served into a running batch of at most `max_batch`.
A running job takes a step in every call until it has run its steps, then leaves at
once and frees its place for the oldest waiting job. Nobody is preempted and the
queue is FIFO, so every request is served after at most the work ahead of it.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..core.trajectory import Trajectory
from .schemas import TrajectoryRequest

_ids = itertools.count(1)


class Busy(Exception):
    """The waiting queue is full."""


@dataclass(eq=False)
class Job:
    """One request's life in the engine."""

    request: TrajectoryRequest
    future: Future = field(default_factory=Future)
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    traj: Trajectory | None = None
    batch_total: int = 0  # sum of the batch sizes of the calls it took part in
    calls: int = 0

    @property
    def finished(self) -> bool:
        return self.traj is not None and self.traj.step_index >= self.request.cloud_steps

    @property
    def mean_batch(self) -> float:
        return self.batch_total / self.calls if self.calls else 0.0


class Scheduler:
    def __init__(self, max_batch: int, max_waiting: int):
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, job: Job) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise Busy(f"server busy: {len(self.waiting)} requests are waiting; retry later")
        self.waiting.append(job)

    def schedule(self) -> tuple[list[Job], list[Job]]:
        """(jobs admitted now, the whole batch of the next call) — admitted jobs still need a trajectory."""
        self.running = [j for j in self.running if not j.future.cancelled()]  # requesters that gave up
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            job = self.waiting.popleft()
            if job.future.cancelled():
                continue
            job.admitted = time.perf_counter()
            admitted.append(job)
            self.running.append(job)
        return admitted, list(self.running)

    def retire(self, jobs: list[Job]) -> None:
        gone = set(map(id, jobs))
        self.running = [j for j in self.running if id(j) not in gone]

    def drain(self) -> list[Job]:
        """Every job, waiting or running, removed (for shutdown)."""
        jobs = [*self.running, *self.waiting]
        self.running, self.waiting = [], deque()
        return jobs
