"""Putting a cloud server together and running it under uvicorn (in the foreground or a thread)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from ..errors import UserError
from .admission import Admission, AdmissionConfig
from .app import MAX_BODY_BYTES, create_app
from .connections import guarded_protocol
from .engine import Engine
from .schemas import MAX_STEPS
from .worker import Worker

MIB = 1024 * 1024


@dataclass
class Limits:
    """Every bound the server holds; docs/serving.md states them and what each refusal looks like."""

    max_batch: int = 8
    max_waiting: int = 256
    max_steps: int = MAX_STEPS
    max_size: int = 256
    max_body_bytes: int = MAX_BODY_BYTES
    max_queue_bytes: int = 512 * MIB  # bytes held by waiting and running work
    max_connections: int = 1024
    header_timeout: float = 5.0  # seconds for a connection to send a request's headers
    body_timeout: float = 30.0  # seconds for a request's whole body
    regather: float = 0.05  # seconds the engine waits for a finished wave's clients to send again (engine.py)


def build_app(model: str, *, name: str | None = None, vae: str | None = None, token: str | None = None,
              limits: Limits | None = None, admission: AdmissionConfig | None = None, device: str | None = None,
              dtype: str | None = None) -> FastAPI:
    """Load the model (onto `device`, in `dtype`) and wire worker, engine and app; the engine starts with the app.

    With `admission` (a policy other than "off"), requests that carry a user block are
    admitted by it; its profile is seeded by a short warm-up of the model here.
    """
    limits = limits or Limits()
    if limits.max_batch < 1 or limits.max_waiting < 1:
        raise UserError("--max-batch and --max-waiting must be at least 1")
    if not 1 <= limits.max_steps <= MAX_STEPS:
        raise UserError(f"--max-steps must be within 1..{MAX_STEPS}")
    if admission is not None and admission.policy == "off":
        admission = None
    if admission is not None:
        admission.check(limits.max_batch)
    worker = Worker.load(model, name, vae, device=device, dtype=dtype, max_steps=limits.max_steps,
                         max_size=limits.max_size)
    engine = Engine(worker, limits.max_batch, limits.max_waiting, max_bytes=limits.max_queue_bytes,
                    regather=limits.regather)
    if admission is not None and admission.warm_up:
        from .profile import warm_up

        engine.profile.seed(warm_up(worker, admission.capacity))
    return create_app(engine, token, limits.max_body_bytes, limits.body_timeout,
                      admission=Admission(engine, admission) if admission is not None else None)


def _config(app: FastAPI, log_level: str, limits: Limits | None, **kw) -> uvicorn.Config:
    """uvicorn's config with the connection guard in place of its concurrency limit (see connections.py)."""
    limits = limits or Limits()
    protocol = guarded_protocol(app.state.engine.metrics, limits.header_timeout, limits.max_connections)
    return uvicorn.Config(app, log_level=log_level, http=protocol, limit_concurrency=None,
                          timeout_graceful_shutdown=5, **kw)


class Server(uvicorn.Server):
    """uvicorn's server, which first answers in-flight work (503, Retry-After) when it shuts down.

    uvicorn waits for open requests before the app's lifespan ends, then cancels them:
    a request waiting on a long generation would be cut off with a bare 500. Stopping
    the engine first answers each of them in JSON while their connections are still open.
    """

    async def shutdown(self, sockets=None) -> None:
        state = self.config.app.state
        if getattr(state, "admission", None) is not None:
            await asyncio.to_thread(state.admission.stop)
        await asyncio.to_thread(state.engine.stop)
        await super().shutdown(sockets)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket whose connections skip Nagle's delay (asyncio only sets that on sockets it made)."""
    try:
        sock = socket.create_server((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted connections inherit it
    return sock


def run(app: FastAPI, host: str, port: int, log_level: str = "info", limits: Limits | None = None) -> None:
    """Serve until SIGINT or SIGTERM: HTTP on a thread, the engine's model calls in this, the main, thread.

    Why the main thread computes: torch's OpenMP (libgomp) spins only while a process has no
    more OpenMP threads than CPUs. The main thread's team exists from loading the model, so a
    second computing thread's team tips it over, its workers sleep between operations, and
    every operation pays a wake-up: on two cores the embedded cloud's step took 2.7x as long
    at batch 1 and 1.6x at batch 16 on the engine's own thread.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = listen(host, port)
    server = Server(_config(app, log_level, limits))
    engine = app.state.engine
    engine.claim()

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            engine.stop()  # however HTTP ended, the main thread's loop ends too

    http = threading.Thread(target=serve_http, name="splitdiff-http")
    old = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        engine.run_here()
        http.join()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class ThreadedServer:
    """A server on a free loopback port in a background thread (tests, benchmarks, embedding)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", log_level: str = "warning",
                 limits: Limits | None = None):
        self._sock = listen(host, 0)
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self.server = Server(_config(app, log_level, limits))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self, timeout: float = 60.0) -> "ThreadedServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self._sock.close()

    def __enter__(self) -> "ThreadedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
