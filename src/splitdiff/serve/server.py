"""Putting a cloud server together and running it under uvicorn (in the foreground or a thread)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from ..errors import UserError
from .app import MAX_BODY_BYTES, create_app
from .engine import Engine
from .worker import Worker


@dataclass
class Limits:
    max_batch: int = 8
    max_waiting: int = 256
    max_steps: int = 1000
    max_size: int = 256
    max_body_bytes: int = MAX_BODY_BYTES


def build_app(model: str, *, name: str | None = None, vae: str | None = None, token: str | None = None,
              limits: Limits | None = None) -> FastAPI:
    """Load the model and wire worker, engine and app; the engine starts with the app."""
    limits = limits or Limits()
    if limits.max_batch < 1 or limits.max_waiting < 1:
        raise UserError("--max-batch and --max-waiting must be at least 1")
    worker = Worker.load(model, name, vae, max_steps=limits.max_steps, max_size=limits.max_size)
    return create_app(Engine(worker, limits.max_batch, limits.max_waiting), token, limits.max_body_bytes)


def _config(app: FastAPI, log_level: str, limits: Limits | None, **kw) -> uvicorn.Config:
    limits = limits or Limits()
    # beyond the queue and the batch, uvicorn itself answers 503 rather than accept more connections
    concurrency = limits.max_waiting + limits.max_batch + 64
    return uvicorn.Config(app, log_level=log_level, limit_concurrency=concurrency, timeout_graceful_shutdown=5,
                          **kw)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket whose connections skip Nagle's delay (asyncio only sets that on sockets it made)."""
    try:
        sock = socket.create_server((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted connections inherit it
    return sock


def run(app: FastAPI, host: str, port: int, log_level: str = "info", limits: Limits | None = None) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = listen(host, port)
    uvicorn.Server(_config(app, log_level, limits)).run(sockets=[sock])


class ThreadedServer:
    """A server on a free loopback port in a background thread (tests, benchmarks, embedding)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", log_level: str = "warning",
                 limits: Limits | None = None):
        self._sock = listen(host, 0)
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self.server = uvicorn.Server(_config(app, log_level, limits))
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
