"""The server's Prometheus metrics, in a registry of its own (one per app, so servers never share)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.waiting = Gauge("splitdiff_queue_depth", "Requests waiting for a place in the batch", registry=r)
        self.running = Gauge("splitdiff_running", "Requests in the running batch", registry=r)
        self.batch_size = Histogram("splitdiff_batch_size", "Trajectories per U-Net call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.step_seconds = Histogram("splitdiff_step_seconds", "Seconds per batched U-Net step",
                                      buckets=STEP_BUCKETS, registry=r)
        self.request_seconds = Histogram("splitdiff_request_seconds", "Seconds from a trajectory request to its "
                                         "answer", buckets=REQUEST_BUCKETS, registry=r)
        self.requests = Counter("splitdiff_requests", "HTTP requests by status code", ["status"], registry=r)
        self.held_bytes = Gauge("splitdiff_queue_bytes", "Bytes held by waiting and running work", registry=r)
        self.connections = Gauge("splitdiff_connections", "Open HTTP connections", registry=r)
        self.refused = Counter("splitdiff_connections_refused", "Connections closed before a request was "
                               "answered, by reason", ["reason"], registry=r)
        for reason in ("header_timeout", "body_timeout", "too_many_connections"):
            self.refused.labels(reason)

    def watch_profile(self, profile) -> None:
        """Gauges that read the server's live per-step fit (serve/profile.py) when scraped."""
        if getattr(self, "_profile_gauges", False):
            return
        self._profile_gauges = True
        r = self.registry
        for name, what, read in (
                ("splitdiff_profile_k_e_seconds", "Fitted seconds per step per trajectory in the batch (k_e)",
                 lambda: profile.k_e),
                ("splitdiff_profile_h_e_seconds", "Fitted seconds per step, whatever the batch (h_e)",
                 lambda: profile.h_e),
                ("splitdiff_profile_samples", "Batched steps the fit is made from", lambda: profile.samples)):
            Gauge(name, what, registry=r).set_function(read)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class CountStatuses:
    """Counts every response by status, including those that middlewares answer (401, 413)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            self.metrics.requests.labels("500").inc()  # answered by the outermost error handler
            raise
