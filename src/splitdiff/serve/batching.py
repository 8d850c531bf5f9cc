"""Who takes part in the next U-Net call.

Admission is first come, first served into a running batch of at most `max_batch`.
A running job takes a step in every call until it has run its steps, then leaves at
once and frees its place for the oldest waiting job. Nobody is preempted and the
queue is FIFO, so every request is served after at most the work ahead of it.

The queue is bounded twice: by the number of waiting jobs, and by the bytes that
waiting and running work holds (its embeddings and latents), so that a few large
requests cannot take the server's memory where many small ones would be fine.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..core.trajectory import Trajectory
from .order import Order

_ids = itertools.count(1)
MIB = 1024 * 1024


class Busy(Exception):
    """The waiting queue is full, by count or by bytes."""


@dataclass(eq=False)
class Job:
    """One request's life in the engine."""

    order: Order
    future: Future = field(default_factory=Future)
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    traj: Trajectory | None = None
    batch_total: int = 0  # sum of the batch sizes of the calls it took part in
    calls: int = 0
    step_seconds: float = 0.0  # seconds of the U-Net calls it took part in
    nbytes: int = 0  # what it holds, fixed at admission to the queue

    def __post_init__(self):
        self.nbytes = self.order.nbytes

    @property
    def finished(self) -> bool:
        return self.traj is not None and self.traj.step_index >= self.order.cloud_steps

    @property
    def mean_batch(self) -> float:
        return self.batch_total / self.calls if self.calls else 0.0

    def release(self) -> None:
        """Let go of its tensors; the answer (if any) lives on in the future."""
        self.order.release()
        self.traj = None


class BatchQueue:
    """The server's requests, waiting and running (named apart from diffusers' noise schedulers)."""

    def __init__(self, max_batch: int, max_waiting: int, max_bytes: int | None = None):
        self.max_batch, self.max_waiting, self.max_bytes = max_batch, max_waiting, max_bytes
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.held_bytes = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, job: Job) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise Busy(f"server busy: {len(self.waiting)} requests are waiting; retry later")
        if self.max_bytes is not None and self.held_bytes + job.nbytes > self.max_bytes:
            raise Busy(f"server busy: queued work holds {self.held_bytes / MIB:.1f} MiB of its "
                       f"{self.max_bytes / MIB:.0f} MiB budget and this request needs {job.nbytes / MIB:.1f}; "
                       "retry later")
        self.waiting.append(job)
        self.held_bytes += job.nbytes

    def schedule(self) -> tuple[list[Job], list[Job]]:
        """(jobs admitted now, the whole batch of the next call) — admitted jobs still need a trajectory."""
        self._forget([j for j in self.running if j.future.cancelled()])  # requesters that gave up
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            job = self.waiting.popleft()
            if job.future.cancelled():
                self._release(job)
                continue
            job.admitted = time.perf_counter()
            admitted.append(job)
            self.running.append(job)
        return admitted, list(self.running)

    def cancel(self, job: Job) -> None:
        """A requester gave up: a waiting job leaves the queue now and frees what it holds."""
        if job in self.waiting:
            self.waiting.remove(job)
            self._release(job)

    def retire(self, jobs: list[Job]) -> None:
        self._forget(jobs)

    def drain(self) -> list[Job]:
        """Every job, waiting or running, removed (for shutdown)."""
        jobs = [*self.running, *self.waiting]
        self.running, self.waiting = [], deque()
        for job in jobs:
            job.release()
        self.held_bytes = 0
        return jobs

    def _forget(self, jobs: list[Job]) -> None:
        gone = set(map(id, jobs))
        kept = []
        for job in self.running:
            if id(job) in gone:
                self._release(job)
            else:
                kept.append(job)
        self.running = kept

    def _release(self, job: Job) -> None:
        job.release()
        self.held_bytes -= job.nbytes
        job.nbytes = 0
