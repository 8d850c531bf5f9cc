"""Request bodies, read whole up to a limit and a deadline before the app sees them.

A declared Content-Length over the limit is refused without reading; a streamed body
is refused as soon as it passes the limit, and one that trickles in slower than
`timeout` seconds in all is answered 408, so a client cannot hold a request open by
sending its body a byte at a time. The app then reads the buffered body as one
message, so its parsing errors stay its own (4xx) and never become a 500.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics
from .schemas import error_response


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = 30.0, metrics: Metrics | None = None):
        self.app, self.max_bytes, self.timeout, self.metrics = app, max_bytes, timeout, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"request body exceeds {self.max_bytes} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await too_large(scope, receive, send)
        try:
            async with asyncio.timeout(self.timeout):
                body = await self._read(receive)
        except TimeoutError:
            if self.metrics is not None:
                self.metrics.refused.labels("body_timeout").inc()
            return await error_response(408, f"request body not received within {self.timeout:g} s",
                                        {"Connection": "close"})(scope, receive, send)
        if body is None:  # the client went away
            return
        if len(body) > self.max_bytes:
            return await too_large(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal body, replayed
            if replayed:
                return await receive()  # waits for the disconnect, as the app expects
            message = {"type": "http.request", "body": body, "more_body": False}
            body, replayed = b"", True  # the app owns the bytes now; this frame keeps no copy
            return message

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or as soon as it passes the limit a prefix one byte longer than it."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
            if size > self.max_bytes or not message.get("more_body", False):
                return b"".join(chunks)
