"""Run a function on N local ranks; when one fails, stop the others and say which.

The ranks are forked from this process, so they start without re-importing torch and
share the function and its arguments as they are (nothing is serialized); each rank
joins the process group the way torchrun's ranks do, and returns a JSON result or
bytes (a serialized trajectory, say), which come back through a file as they are. For
several machines, use torchrun instead: it stops all ranks when one fails, too.

Forked ranks run torch on one thread each, as DataLoader workers do: a thread pool
the parent already used does not survive a fork, and a second thread would wait on
it forever. (One core per rank is also the fair way to run patches on a CPU.) And
fork before touching CUDA in this process: a forked child cannot re-initialize it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .comm import DEFAULT_TIMEOUT_S, PeerFailure, setup, teardown


class RankFailure(RuntimeError):
    """A rank of a local launch failed; the message names it and what it said."""


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    kwargs: dict[str, Any] | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    deadline_s: float | None = None,
) -> list[Any]:
    """Call fn(**kwargs) on ranks 0..nprocs-1 and return their results (JSON-able, or bytes), by rank.

    timeout_s bounds each wait of one rank on another (process-group timeout);
    deadline_s, if given, bounds the whole run.
    """
    if torch.cuda.is_initialized():
        raise RuntimeError("launch forks its ranks, and CUDA is already initialized here; use torchrun instead")
    port = _free_port()
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="splitdiff-ranks-") as tmp:
        out = Path(tmp)
        procs = [
            context.Process(
                target=_rank_main, args=(fn, kwargs or {}, rank, nprocs, port, out, timeout_s), daemon=True
            )
            for rank in range(nprocs)
        ]
        for proc in procs:
            proc.start()
        try:
            _watch(procs, out, deadline_s)
        finally:
            _stop(procs)
        return [_result(out, r) for r in range(nprocs)]


def _rank_main(fn, kwargs, rank, nprocs, port, out: Path, timeout_s: float) -> None:
    """One rank: torchrun's environment, the process group, fn, its result or its error."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    code = 0
    try:
        setup(timeout_s)
        result = fn(**kwargs)
        teardown(timeout_s)
        if isinstance(result, bytes):
            (out / f"rank{rank}.bin").write_bytes(result)
        else:
            (out / f"rank{rank}.json").write_text(json.dumps(result))
    except BaseException as error:  # noqa: BLE001 - every failure must reach the launcher
        traceback.print_exc()
        kind = "lost" if isinstance(error, PeerFailure) else "failed"
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        (out / f"rank{rank}.error").write_text(json.dumps({"kind": kind, "message": f"{type(error).__name__}: {message}"}))
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _result(out: Path, rank: int) -> Any:
    binary = out / f"rank{rank}.bin"
    return binary.read_bytes() if binary.exists() else json.loads((out / f"rank{rank}.json").read_text())


def _watch(procs, out: Path, deadline_s: float | None) -> None:
    """Wait for all ranks; on the first failure give the others a moment to report, then raise."""
    started = time.monotonic()
    while True:
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            return
        if any(c not in (None, 0) for c in codes):
            _grace(procs, seconds=2.0)
            raise RankFailure(_report(procs, out))
        if deadline_s is not None and time.monotonic() - started > deadline_s:
            raise RankFailure(f"the ranks did not finish within {deadline_s:g} s; stopped all of them")
        time.sleep(0.02)


def _grace(procs, seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until and any(p.exitcode is None for p in procs):
        time.sleep(0.02)


def _stop(procs) -> None:
    """Terminate the ranks still running, then kill what ignores that."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    until = time.monotonic() + 3.0
    for p in procs:
        p.join(max(0.0, until - time.monotonic()))
        if p.exitcode is None:
            os.kill(p.pid, signal.SIGKILL)
            p.join()


def _report(procs, out: Path) -> str:
    """One line: what the ranks that failed on their own said, then those that lost them, then the stopped."""
    failed: dict[str, list[int]] = {}
    lost: dict[str, list[int]] = {}
    stopped = []
    for rank, p in enumerate(procs):
        error = out / f"rank{rank}.error"
        if p.exitcode is None:
            stopped.append(rank)
        elif error.exists():
            info = json.loads(error.read_text())
            (lost if info["kind"] == "lost" else failed).setdefault(info["message"], []).append(rank)
        elif p.exitcode != 0:
            how = f"was killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exited with code {p.exitcode}"
            failed.setdefault(how, []).append(rank)
    parts = [
        f"{_ranks(ranks)} {message}" if message[0].islower() else f"{_ranks(ranks)}: {message}"
        for message, ranks in [*failed.items(), *lost.items()]
    ]
    if stopped:
        parts.append(f"stopped {_ranks(stopped)}")
    return "; ".join(parts)


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
