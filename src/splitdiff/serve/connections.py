"""Connection-level limits, below the app: no connection may hold the server without asking.

uvicorn counts every open connection against its concurrency limit and closes
idle ones only after a first response, so a few hundred connections that never
send a byte made every request, /healthz included, answer 503. Here each
connection must finish its request line and headers within `header_timeout`
seconds of opening (or of its previous answer, on keep-alive), or it is closed;
past `max_connections` open at once, new ones are closed at once. Both are
counted in /metrics. A slow body is the body reader's to time out (body.py).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

from .metrics import Metrics


def guarded_protocol(metrics: Metrics, header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline and a cap on open connections."""

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            metrics.connections.set(len(self.connections))
            if len(self.connections) > max_connections:
                metrics.refused.labels("too_many_connections").inc()
                transport.close()
                return
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)
            metrics.connections.set(len(self.connections))

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers are complete
                self._disarm()

        def on_response_complete(self) -> None:
            cycle = self.cycle
            self._arm()  # the next request on this connection has its own deadline
            super().on_response_complete()
            if self.cycle is not cycle or self.transport.is_closing():
                self._disarm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                metrics.refused.labels("header_timeout").inc()
                self.transport.close()

    return GuardedH11Protocol
