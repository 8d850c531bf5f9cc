"""The engine: one thread, one loop, step-level (continuous) batching.

Each iteration asks the scheduler for the batch, gives newly admitted requests their
trajectory (prompt encoding happens here, on the thread that owns the models), runs
one U-Net call for the whole batch, and hands finished trajectories back at once.
A request that arrives mid-flight joins at the next call, at its own step index.
Requests talk to the engine only through `submit` and the future it returns.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, InvalidStateError

from .metrics import Metrics
from .scheduler import Job, Scheduler
from .schemas import TrajectoryRequest
from .worker import Worker

log = logging.getLogger("splitdiff.serve")


class ShuttingDown(Exception):
    """The engine stopped before the request finished."""


class EngineFailure(Exception):
    """The model failed on a batch; the cause is in the server's log, not in answers."""


class Engine:
    def __init__(self, worker: Worker, max_batch: int = 8, max_waiting: int = 256, metrics: Metrics | None = None):
        self.worker = worker
        self.scheduler = Scheduler(max_batch, max_waiting)
        self.metrics = metrics or Metrics()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the requests' side ---------------------------------------------------------
    def submit(self, request: TrajectoryRequest) -> Job:
        """Queue a checked request; its `future` resolves to the trajectory after `cloud_steps`."""
        job = Job(request)
        with self._cv:
            if self._stopping:
                raise ShuttingDown("server is shutting down")
            self.scheduler.add(job)
            self.metrics.waiting.set(len(self.scheduler.waiting))
            self._cv.notify()
        return job

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def load(self) -> tuple[int, int]:
        with self._cv:
            return len(self.scheduler.waiting), len(self.scheduler.running)

    # -- life -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="splitdiff-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if not self.alive:  # a loop that never ran has answered nobody yet
            with self._cv:
                for job in self.scheduler.drain():
                    _settle(job.future, error=ShuttingDown("server is shutting down"))

    def _loop(self) -> None:
        try:
            self._serve()
        except Exception:
            log.exception("the engine loop failed; answering what it held")
        finally:  # whatever ended the loop, nobody is left waiting on it
            with self._cv:
                self._stopping = True
                for job in self.scheduler.drain():
                    _settle(job.future, error=ShuttingDown("the engine stopped"))

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.scheduler.has_work:
                    self._cv.wait()
                if self._stopping:
                    return
                admitted, batch = self.scheduler.schedule()
                self.metrics.waiting.set(len(self.scheduler.waiting))
                self.metrics.running.set(len(batch))
            done = self.step(admitted, batch)
            with self._cv:
                self.scheduler.retire(done)
                self.metrics.running.set(len(self.scheduler.running))

    # -- one iteration --------------------------------------------------------------
    def step(self, admitted: list[Job], batch: list[Job]) -> list[Job]:
        """Prefill `admitted`, run one call for `batch`; return the jobs that leave it (finished or failed)."""
        failed = []
        for job in admitted:
            try:
                job.traj = self.worker.prefill(job.request)
            except Exception:
                log.exception("prefill failed for request %d", job.id)
                failed.append(job)
                _settle(job.future, error=EngineFailure("the model failed to start this trajectory"))
        live = [j for j in batch if j not in failed]
        if live:
            try:
                seconds = self.worker.step([j.traj for j in live])
            except Exception:
                log.exception("U-Net step failed for a batch of %d", len(live))
                for job in live:
                    _settle(job.future, error=EngineFailure("the model failed on this request's batch"))
                return failed + live
            self.metrics.batch_size.observe(len(live))
            self.metrics.step_seconds.observe(seconds)
            for job in live:
                job.batch_total, job.calls = job.batch_total + len(live), job.calls + 1
        finished = [j for j in live if j.finished]
        for job in finished:
            _settle(job.future, result=job.traj)
        return failed + finished


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Resolve a future once; a future already resolved or cancelled is left alone."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass  # its requester gave up (cancelled) meanwhile
