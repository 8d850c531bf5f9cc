"""Admission by the planner: who of the users asking now is served, and for how many steps.

Requests that carry a user block wait for a short scheduling window that opens with
the first of them. When it closes, the window's users become a planning scenario
(their device step times, alphas, arrival times and payloads; this server's live
per-step profile k_e B + h_e; the shrinking-batch latency model, since the engine's
batch shrinks as users leave at their own splits) and a policy decides:

- `planner`: a solver of `users.planner` (exact by default) grants or denies each
  user and sets each granted user's split n_i; the server runs the first T - n_i steps;
- `fifo`: the earliest users up to the capacity, each at the split it asked for
  (its `cloud_steps`); this is also the fallback when the planner fails or times out;
- `all-offload`: the earliest users up to the capacity, at the planner's best splits;
- `all-local`: everyone is denied.

Granted users go to the engine together, so they start in the same U-Net call and
share steps until each leaves at its own split. A denied user is answered at once and
runs every step on its device: that is the plan, not a degraded result. The planner
sees only the capacity that work already on the server leaves free, and it assumes the
window's batch has the server to itself (it does not model a batch that overlaps the
previous window's).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Histogram

from ..errors import UserError
from ..users.pai import MEASURED as MEASURED_PAI
from ..users.planner import registry
from ..users.planner.latency import Decision, latencies
from ..users.planner.scenario import MAX_USERS, Instance, Scenario
from .background import BackgroundLoop
from .batching import Busy, Job
from .engine import Engine, EngineFailure, ShuttingDown
from .order import FLOAT_BYTES, Order
from .schemas import UserBlock

log = logging.getLogger("splitdiff.serve")

POLICIES = ("off", "planner", "fifo", "all-offload", "all-local")
PLANNER_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5)


@dataclass
class AdmissionConfig:
    """How the server admits requests that carry a user block (docs/serving.md, "Admission")."""

    policy: str = "planner"
    window: float = 0.2  # seconds from a window's first request to its decision
    capacity: int | None = None  # most users served at once; default: the engine's max batch
    solver: str = "exact"
    timeout: float = 1.0  # seconds the planner may take before the fallback decides
    pai: tuple[float, float] = MEASURED_PAI  # PAI(n) = 1 / (1 + exp(-a (n - b)))
    min_device_steps: int = 1  # fewest steps a granted user runs on its device
    bandwidth_bps: float = 1e9  # each user's link, for the handoff's transmission time
    warm_up: bool = True  # time the U-Net at start-up to seed the profile

    def check(self, max_batch: int) -> "AdmissionConfig":
        if self.policy not in POLICIES:
            raise UserError(f"--admission must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.capacity is None:
            self.capacity = max_batch
        if not 1 <= self.capacity <= max_batch:
            raise UserError(f"--capacity {self.capacity} must be within 1..--max-batch ({max_batch}): the users "
                            "granted in one window share one batch")
        if not 0 < self.window <= 60:
            raise UserError("--window must be within (0, 60] seconds")
        if not 0 < self.timeout <= 60:
            raise UserError("--planner-timeout must be within (0, 60] seconds")
        if self.policy == "planner":
            registry.parse_solvers(self.solver)
        a, b = self.pai
        if not (np.isfinite(a) and np.isfinite(b) and a > 0):
            raise UserError("--pai needs A > 0 and a finite B")
        if self.min_device_steps < 0 or not self.bandwidth_bps > 0:
            raise UserError("--min-device-steps must be >= 0 and the bandwidth positive")
        return self


@dataclass
class Verdict:
    """One user's decision: granted users get `cloud_steps` on the server, denied ones none."""

    granted: bool
    user: str
    steps: int
    cloud_steps: int
    policy: str
    predicted_seconds: float
    decided: float = field(default_factory=time.perf_counter)

    @property
    def device_steps(self) -> int:
        return self.steps - self.cloud_steps

    def headers(self) -> dict[str, str]:
        return {"X-Splitdiff-Decision": "grant" if self.granted else "deny",
                "X-Splitdiff-Cloud-Steps": str(self.cloud_steps),
                "X-Splitdiff-Device-Steps": str(self.device_steps),
                "X-Splitdiff-Policy": self.policy,
                "X-Splitdiff-Predicted-Seconds": f"{self.predicted_seconds:.6f}"}

    def deny_body(self) -> dict:
        return {"decision": "deny", "user": self.user, "steps": self.steps, "cloud_steps": 0,
                "device_steps": self.steps, "policy": self.policy,
                "predicted_seconds": round(self.predicted_seconds, 6),
                "error": f"admission denied ({self.policy}): run all {self.steps} steps on the device"}


@dataclass(eq=False)
class Ticket:
    """A request waiting for its window's decision; `future` resolves to (Verdict, Job | None)."""

    order: Order
    user: UserBlock
    arrived: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)


class PlannerTimeout(Exception):
    pass


class Admission(BackgroundLoop):
    thread_name = "splitdiff-admission"

    def __init__(self, engine: Engine, config: AdmissionConfig):
        super().__init__()
        self.engine, self.config = engine, config.check(engine.queue.max_batch)
        self.profile = engine.profile
        self.planner = self.solve  # (Scenario) -> Decision; replaceable (tests inject failures)
        self._pending: list[Ticket] = []
        r = engine.metrics.registry
        self.decisions = Counter("splitdiff_admission_decisions", "Users granted or denied, by policy",
                                 ["decision", "policy"], registry=r)
        self.fallbacks = Counter("splitdiff_admission_fallbacks", "Windows the fallback (FIFO up to capacity at "
                                 "the asked split) decided because the planner failed, by reason", ["reason"],
                                 registry=r)
        for reason in ("error", "timeout"):
            self.fallbacks.labels(reason)
        self.windows = Counter("splitdiff_admission_windows", "Scheduling windows decided", registry=r)
        self.planner_seconds = Histogram("splitdiff_admission_planner_seconds", "Seconds the policy took per "
                                         "window", buckets=PLANNER_BUCKETS, registry=r)

    # -- the requests' side ---------------------------------------------------------
    def submit(self, order: Order, user: UserBlock) -> Ticket:
        ticket = Ticket(order, user)
        with self._cv:
            if self._stopping:
                raise ShuttingDown("server is shutting down")
            if len(self._pending) >= min(self.engine.queue.max_waiting, MAX_USERS):
                raise Busy(f"server busy: {len(self._pending)} users are waiting for admission; retry later")
            self._pending.append(ticket)
            self._cv.notify()
        return ticket

    # -- life -------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        self._halt(timeout)
        self._answer_pending()

    def _answer_pending(self) -> None:
        with self._cv:
            pending, self._pending = self._pending, []
        for t in pending:
            t.order.release()
            _settle(t.future, error=ShuttingDown("server is shutting down"))

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopping and not self._pending:
                        self._cv.wait()
                    if self._stopping:
                        return
                    end = self._pending[0].arrived + self.config.window
                    while not self._stopping and (left := end - time.perf_counter()) > 0:
                        self._cv.wait(left)
                    if self._stopping:
                        return
                    tickets, self._pending = self._pending, []
                try:
                    self.decide(tickets, end - self.config.window)
                except Exception:  # one window's failure answers that window, not the server's life
                    log.exception("admission failed for a window of %d requests", len(tickets))
                    for t in tickets:
                        t.order.release()
                        _settle(t.future, error=EngineFailure("admission failed for this request"))
        except Exception:
            log.exception("the admission loop failed; answering what it held")
        finally:
            with self._cv:
                self._stopping = True
            self._answer_pending()

    # -- one window -------------------------------------------------------------------
    def decide(self, tickets: list[Ticket], opened: float) -> list[Verdict]:
        """Decide a window's tickets, hand the granted to the engine together, answer every ticket."""
        live = [t for t in tickets if not t.future.cancelled()]
        for t in tickets:
            if t.future.cancelled():
                t.order.release()
        if not live:
            return []
        self.windows.inc()
        waiting, running = self.engine.load()
        free = max(0, self.config.capacity - waiting - running)
        groups = defaultdict(list)  # one scenario per trajectory length T
        for t in live:
            groups[t.order.steps].append(t)
        verdicts: dict[int, Verdict] = {}
        start = time.perf_counter()
        for T, group in sorted(groups.items(), key=lambda kv: kv[1][0].arrived):
            for t, v in zip(group, self._decide_group(T, group, free, opened)):
                verdicts[id(t)] = v
                free -= v.granted
        self.planner_seconds.observe(time.perf_counter() - start)
        granted = [t for t in live if verdicts[id(t)].granted]
        for t in granted:
            t.order.cloud_steps = verdicts[id(t)].cloud_steps
        jobs = dict(zip(map(id, granted), self.engine.submit_all([t.order for t in granted])))
        for t in live:
            v = verdicts[id(t)]
            self.decisions.labels("grant" if v.granted else "deny", v.policy).inc()
            job = jobs.get(id(t))
            if isinstance(job, Exception):
                _settle(t.future, error=job)
                continue
            if job is None:
                t.order.release()
            if not _settle(t.future, result=(v, job)) and isinstance(job, Job):
                job.future.cancel()  # its requester left while the window was decided
        return [verdicts[id(t)] for t in live]

    def scenario(self, T: int, group: list[Ticket], capacity: int, opened: float) -> Scenario:
        """The window's users with this T as a planning scenario, with the server's profile now.

        A granted user's per-request seconds outside U-Net calls (the profile's overhead)
        ride in its transmission term, the model's other constant per granted user:
        with spectral efficiency 1 and a link of its own, bits / bandwidth + overhead.
        """
        c = self.config
        n_max = max(T - 1, 0)
        prof = self.profile.snapshot()
        extra_bits = prof["overhead_s"] * c.bandwidth_bps
        users = [dict(id=t.user.id[:200], tau=t.user.device_step_seconds, alpha=t.user.alpha,
                      request_time=min(max(t.arrived - opened, 0.0), c.window),
                      payload_bits=extra_bits + (t.user.payload_bits if t.user.payload_bits is not None
                                                 else payload_bits(t.order)),
                      bandwidth_hz=c.bandwidth_bps) for t in group]
        return Scenario.model_validate(dict(
            T=T, n_min=min(c.min_device_steps, n_max), n_max=n_max, integer_splits=True,
            pai=dict(a=c.pai[0], b=c.pai[1]),
            server=dict(k_e=prof["k_e"], h_e=prof["h_e"], capacity=capacity, shared_channel=False),
            latency="shrinking-batch", transmission="sound", spectral_efficiency=1.0, window=c.window, users=users))

    def solve(self, scenario: Scenario) -> Decision:
        """The configured solver's decision (the planner policy)."""
        result = registry.run(self.config.solver, scenario)
        if result.decision is None:
            raise RuntimeError(f"solver {self.config.solver} did not run: {result.skipped}")
        return result.decision

    def _decide_group(self, T: int, group: list[Ticket], capacity: int, opened: float) -> list[Verdict]:
        scenario = self.scenario(T, group, capacity, opened)
        inst = Instance.of(scenario)
        policy = self.config.policy
        if capacity == 0 or policy == "all-local":
            decision = Decision.all_local(inst)
        elif policy == "fifo":
            decision = fifo(inst, group)
        elif policy == "all-offload":
            decision = registry.run("all-offload", inst).decision
        else:
            try:
                decision = self._plan(scenario, inst)
            except PlannerTimeout:
                self.fallbacks.labels("timeout").inc()
                log.warning("the planner took longer than %.3g s; FIFO decides this window", self.config.timeout)
                decision, policy = fifo(inst, group), "fallback"
            except Exception:
                self.fallbacks.labels("error").inc()
                log.warning("the planner failed; FIFO decides this window", exc_info=True)
                decision, policy = fifo(inst, group), "fallback"
        predicted = latencies(inst, decision)
        return [Verdict(bool(g), t.user.id, T, T - int(round(n)) if g else 0, policy, float(p))
                for t, g, n, p in zip(group, decision.granted, decision.n, predicted)]

    def _plan(self, scenario: Scenario, inst: Instance) -> Decision:
        """The planner's decision within the timeout, checked against the scenario's bounds."""
        answer: Future = Future()

        def run():
            try:
                answer.set_result(self.planner(scenario))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                answer.set_exception(e)

        threading.Thread(target=run, name="splitdiff-planner", daemon=True).start()
        try:
            d = answer.result(self.config.timeout)
        except TimeoutError:
            raise PlannerTimeout() from None
        granted = np.asarray(d.granted, dtype=bool)
        n = np.where(granted, np.round(np.asarray(d.n, dtype=float)), inst.T)
        d = Decision(granted, n)
        if granted.shape != (inst.N,) or d.B > inst.capacity or not inst.splits_are_feasible(n[granted]):
            raise ValueError("the planner's decision breaks the scenario's capacity or split range")
        return d


def fifo(inst: Instance, group: list[Ticket]) -> Decision:
    """The earliest users up to the capacity, each at the split it asked for (clipped to the split range)."""
    d = Decision.all_local(inst)
    first = np.argsort(inst.request_time, kind="stable")[:inst.capacity]
    d.granted[first] = True
    asked = np.array([t.order.steps - t.order.cloud_steps for t in group], dtype=float)
    d.n[first] = np.clip(asked[first], inst.n_lo, inst.n_hi)
    return d


def payload_bits(order: Order) -> float:
    """What the answer carries, roughly: the latents and the two prompt embeddings."""
    c, h, w = order.latent_shape
    length, width = order.context_shape
    per = FLOAT_BYTES // 2 if order.half else FLOAT_BYTES
    return 8.0 * per * (c * h * w + 2 * length * width)


def _settle(future: Future, result=None, error: BaseException | None = None) -> bool:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
        return True
    except InvalidStateError:
        return False
