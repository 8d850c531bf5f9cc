"""The engine: one thread, one loop, step-level (continuous) batching.

Each iteration asks the batch queue for the batch, gives newly admitted requests their
trajectory (prompt encoding happens here, on the thread that owns the models), runs
the batch's steps and hands finished trajectories back at once. A request that
arrives mid-flight joins at the next call, at its own step index.

Work that cannot share one U-Net call (other latent or embedding shapes) runs in a
call of its own in the same iteration, and a failure is confined to the request it
belongs to: a group whose call fails is retried one trajectory at a time, so only
the request at fault is answered with an error. Requests talk to the engine only
through `submit` and the future it returns.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import Future, InvalidStateError

from ..errors import UserError
from .background import BackgroundLoop
from .batching import BatchQueue, Job
from .memory import Trimmer
from .metrics import Metrics
from .order import Order
from .profile import StepProfile
from .worker import Worker, batch_key

log = logging.getLogger("splitdiff.serve")


class ShuttingDown(Exception):
    """The engine stopped before the request finished."""


class EngineFailure(Exception):
    """The model failed on a request; the cause is in the server's log, not in answers."""


class Engine(BackgroundLoop):
    thread_name = "splitdiff-engine"

    def __init__(self, worker: Worker, max_batch: int = 8, max_waiting: int = 256, metrics: Metrics | None = None,
                 max_bytes: int | None = None, profile: StepProfile | None = None, regather: float = 0.0):
        super().__init__()
        self.worker = worker
        self.regather = regather  # seconds; see _regather
        self._last_call = (0, 0.0)  # (batch size, when) of the last U-Net call
        self.queue = BatchQueue(max_batch, max_waiting, max_bytes)
        self.metrics = metrics or Metrics()
        self.profile = profile or StepProfile()
        self.metrics.watch_profile(self.profile)
        self._trimmer = Trimmer()

    # -- the requests' side ---------------------------------------------------------
    def submit(self, order: Order) -> Job:
        """Queue a checked order; its `future` resolves to the trajectory after `cloud_steps`."""
        job = Job(order)
        with self._cv:
            if self._stopping:
                raise ShuttingDown("server is shutting down")
            self.queue.add(job)
            self._gauge()
            self._cv.notify()
        job.future.add_done_callback(lambda f: f.cancelled() and self._cancelled(job))
        return job

    def submit_all(self, orders: list[Order]) -> list[Job | Exception]:
        """Queue orders at once, so that they are admitted to the same call when the batch has room.

        Each entry is the order's job, or why it was refused (Busy, ShuttingDown).
        """
        jobs: list[Job | Exception] = []
        with self._cv:
            for order in orders:
                if self._stopping:
                    jobs.append(ShuttingDown("server is shutting down"))
                    continue
                job = Job(order)
                try:
                    self.queue.add(job)
                except Exception as e:
                    jobs.append(e)
                    continue
                jobs.append(job)
            self._gauge()
            self._cv.notify()
        for job in jobs:
            if isinstance(job, Job):
                job.future.add_done_callback(lambda f, job=job: f.cancelled() and self._cancelled(job))
        return jobs

    def _cancelled(self, job: Job) -> None:
        with self._cv:
            self.queue.cancel(job)
            self._gauge()

    def _gauge(self) -> None:
        self.metrics.waiting.set(len(self.queue.waiting))
        self.metrics.held_bytes.set(self.queue.held_bytes)
        self._trimmer.observe(self.queue.held_bytes)

    def load(self) -> tuple[int, int]:
        with self._cv:
            return len(self.queue.waiting), len(self.queue.running)

    # -- life -------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new work, let the current call end, answer everyone still waiting with ShuttingDown."""
        self._halt(timeout)
        if not self.alive:  # a loop that never ran has answered nobody yet
            self._answer_all(ShuttingDown("server is shutting down"))

    def _answer_all(self, error: Exception) -> None:
        with self._cv:
            for job in self.queue.drain():
                _settle(job.future, error=error)
            self._gauge()

    def _loop(self) -> None:
        try:
            self._serve()
        except Exception:
            log.exception("the engine loop failed; answering what it held")
        finally:  # whatever ended the loop, nobody is left waiting on it
            with self._cv:
                self._stopping = True
            self._answer_all(ShuttingDown("server is shutting down"))

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.queue.has_work:
                    self._cv.wait()
                self._regather()
                if self._stopping:
                    return
                admitted, batch = self.queue.schedule()
                self._gauge()
                self.metrics.running.set(len(batch))
            done = self.step(admitted, batch)
            with self._cv:
                self.queue.retire(done)
                self._gauge()
                self.metrics.running.set(len(self.queue.running))

    def _regather(self) -> None:
        """Under the lock: when fewer trajectories are at hand than the last call just ran (a wave of
        requests finished and its clients are sending the next ones), wait up to `regather`
        seconds for them, so that the next calls run full rather than one step ahead with a few.

        Steady load never waits (as many are at hand as ran), nor does a lone client (one ran).
        """
        size, when = self._last_call
        if self.regather <= 0 or time.perf_counter() - when > 1.0:
            return
        deadline = time.perf_counter() + self.regather
        wanted = min(size, self.queue.max_batch)
        while not self._stopping and len(self.queue.running) + len(self.queue.waiting) < wanted:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._cv.wait(left)

    # -- one iteration --------------------------------------------------------------
    def step(self, admitted: list[Job], batch: list[Job]) -> list[Job]:
        """Prefill `admitted`, run one step for `batch`; return the jobs that leave it (finished or failed)."""
        failed = []
        for job, made in zip(admitted, self.worker.prefill_many([job.order for job in admitted])):
            job.order.release()
            if isinstance(made, Exception):
                failed.append(job)
                _settle(job.future, error=_answer(made, job, "start this trajectory"))
            else:
                job.traj = made
        live = [j for j in batch if j not in failed and j.traj is not None and not j.future.done()]
        groups = defaultdict(list)
        for job in live:
            groups[batch_key(job.traj)].append(job)
        for group in groups.values():
            failed += self._run(group)
        finished = [j for j in live if j not in failed and j.finished]
        for job in finished:
            _settle(job.future, result=job.traj)
        return failed + finished

    def _run(self, group: list[Job]) -> list[Job]:
        """One call for `group` (a shared key); the jobs that failed, each already answered."""
        try:
            seconds, failures = self.worker.step([j.traj for j in group])
        except Exception as e:
            if len(group) > 1:  # find the one at fault; the others go on alone
                return [job for one in group for job in self._run([one])]
            _settle(group[0].future, error=_answer(e, group[0], "take a step"))
            return group
        self._last_call = (len(group), time.perf_counter())
        self.metrics.batch_size.observe(len(group))
        self.metrics.step_seconds.observe(seconds)
        self.profile.observe(len(group), seconds)
        for i, job in enumerate(group):
            job.batch_total, job.calls = job.batch_total + len(group), job.calls + 1
            job.step_seconds += seconds
            if i in failures:
                _settle(job.future, error=_answer(failures[i], job, "take a step"))
        return [group[i] for i in failures]


def _answer(error: Exception, job: Job, doing: str) -> Exception:
    """What the requester is told: the request's own fault in its words, anything else logged and generic."""
    if isinstance(error, UserError):
        return error
    log.error("request %d: the model failed to %s", job.id, doing, exc_info=error)
    return EngineFailure(f"the model failed to {doing} for this request")


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Resolve a future once; a future already resolved or cancelled is left alone."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass  # its requester gave up (cancelled) meanwhile
