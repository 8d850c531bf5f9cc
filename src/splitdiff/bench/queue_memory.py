"""`splitdiff bench queue-memory`: what queued work costs the server, and what it gets back.

A server with one place in its batch runs a long generation while clients queue
requests of the largest embeddings the body limit lets through, each on its own
connection, then all give up at once. The server's RSS is read at idle, with the
queue full (as full as its byte budget allows: the rest are answered 503) and after
the cancellations, with the queue's own byte count from /metrics beside it.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from pathlib import Path

import httpx

from . import write_csv
from .serve import ServerProcess, scrape

MIB = 2 ** 20


def max_embeddings_body(width: int, body_limit: int, seed: int = 0) -> bytes:
    """A valid embeddings request as close under `body_limit` bytes as whole tokens allow."""
    rng = random.Random(seed)
    row = json.dumps([round(rng.uniform(-2, 2), 4) for _ in range(width)])
    tokens = max(1, min(512, (body_limit - 200) // (2 * (len(row) + 2))))
    rows = "[" + ",".join([row] * tokens) + "]"
    body = (f'{{"prompt_embeds": {rows}, "negative_embeds": {rows}, "steps": 25, "cloud_steps": 10, '
            f'"size": 64}}').encode()
    return body


def _hold(port: int, body: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/trajectories HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return s


def _answered_503(s: socket.socket) -> bool:
    s.settimeout(0.001)
    try:
        return s.recv(16).startswith(b"HTTP/1.1 503")
    except (TimeoutError, BlockingIOError):
        return False


def _wait_for_queue(server: ServerProcess, held: list[socket.socket], timeout: float = 300.0) -> int:
    """Wait until every held request is queued or refused; the number refused."""
    refused, pending = 0, list(held)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        still = []
        for s in pending:
            if _answered_503(s):
                refused += 1
            else:
                still.append(s)
        pending = still
        if httpx.get(f"{server.url}/healthz", timeout=30).json()["waiting"] + refused >= len(held):
            break
        time.sleep(0.2)
    return refused


def _settle(server: ServerProcess, seconds: float = 3.0) -> float:
    """RSS once it has stopped moving (MiB)."""
    last, deadline = server.rss_mib(), time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = server.rss_mib()
        if abs(now - last) < 1:
            return now
        last = now
    return last


def bench_queue_memory(out: Path, *, model: str = "cloud", vae: str | None = None, requests: int = 128,
                       budget_mib: int = 512, width: int = 384, body_limit: int = 4 * MIB) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    body = max_embeddings_body(width, body_limit)
    extra = ("--max-queue-mb", str(budget_mib), "--max-waiting", str(requests + 8))
    with ServerProcess(model, vae, 1, out / "server.log", extra) as server:
        idle = _settle(server)
        blocker = threading.Thread(target=lambda: httpx.post(
            f"{server.url}/v1/trajectories", json=dict(prompt="a red circle", steps=400, cloud_steps=400, size=64),
            timeout=600), daemon=True)
        blocker.start()
        while httpx.get(f"{server.url}/healthz").json()["running"] == 0:
            time.sleep(0.05)
        held = [_hold(server.port, body) for _ in range(requests)]
        refused = _wait_for_queue(server, held)
        queued_rss = _settle(server, 10.0)
        metrics = scrape(server.url)
        queue_bytes = metrics.get("splitdiff_queue_bytes", float("nan"))
        for s in held:
            s.close()
        time.sleep(1.0)
        after_rss = _settle(server, 10.0)
        after_bytes = scrape(server.url).get("splitdiff_queue_bytes", float("nan"))
    rows = [
        dict(phase="idle", rss_mib=idle, queue_mib=0.0, queued=0, refused_503=0),
        dict(phase="queued", rss_mib=queued_rss, queue_mib=queue_bytes / MIB, queued=requests - refused,
             refused_503=refused),
        dict(phase="cancelled", rss_mib=after_rss, queue_mib=after_bytes / MIB, queued=0, refused_503=refused),
    ]
    for row in rows:
        row.update(requests=requests, body_bytes=len(body), budget_mib=budget_mib)
    write_csv(out / "queue_memory.csv", rows)
    _plot(out / "queue_memory.png", rows)
    for row in rows:
        print(f"{row['phase']:>9}: RSS {row['rss_mib']:7.0f} MiB, queue {row['queue_mib']:6.1f} MiB, "
              f"{row['queued']} queued, {row['refused_503']} answered 503")
    return rows


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    phases = [r["phase"] for r in rows]
    ax.bar(phases, [r["rss_mib"] for r in rows], label="server RSS")
    ax.bar(phases, [r["queue_mib"] for r in rows], label="queue's byte count", alpha=0.8)
    ax.set_ylabel("MiB")
    ax.set_title(f"{rows[0]['requests']} largest embeddings requests, budget {rows[0]['budget_mib']} MiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
