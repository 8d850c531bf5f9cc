"""A pool of patch-parallel ranks, started once per model: each rank loads the U-Net once and
then runs segment after segment sent to it as trajectory bytes.

Built on `ranks.launch` (the ranks are the same forked, torchrun-style processes, and a
failure stops them all and says which): the ranks' function is a loop that takes work
from a pipe until told to stop. Each segment parallelizes the loaded U-Net afresh and
removes the patches afterwards, so a segment is a new generation to the patches (its own
synchronous warm-up), exactly as a one-off launch would run it.
"""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

from ..core.runner import advance
from ..core.trajectory import Trajectory
from .comm import DEFAULT_TIMEOUT_S, setup
from .ranks import RankFailure, launch
from .run import load_unet
from .unet import parallelize

POLL_S = 0.05


class RankPool:
    """`ranks` local ranks holding `model_source` parallelized as `mode`; `advance` sends them a segment."""

    def __init__(self, model_source: str, ranks: int, mode: str = "pcpp", *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 **parallel_options: Any):
        self.ranks, self.segments = ranks, 0
        context = multiprocessing.get_context("fork")
        self._pipes = [context.Pipe() for _ in range(ranks)]  # (this end, the rank's end)
        kwargs = dict(model_source=model_source, mode=mode, options=parallel_options,
                      conns=[rank_end for _, rank_end in self._pipes])
        self._failure: BaseException | None = None
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(kwargs, timeout_s), name="splitdiff-ranks",
                                        daemon=True)
        self._thread.start()

    def _run(self, kwargs: dict, timeout_s: float) -> None:
        try:
            launch(_serve_rank, self.ranks, kwargs, timeout_s=timeout_s)
        except BaseException as e:  # noqa: BLE001 - reported by the next `advance`
            self._failure = e
        finally:
            self._ended.set()

    @property
    def alive(self) -> bool:
        return not self._ended.is_set()

    def advance(self, traj_bytes: bytes, steps: int, model_name: str) -> bytes:
        """`steps` more steps of the serialized trajectory on the ranks; the advanced trajectory's bytes."""
        if not self.alive:
            raise RankFailure(self._why())
        for here, _ in self._pipes:
            here.send((traj_bytes, steps, model_name))
        answers = [self._answer(here) for here, _ in self._pipes]
        self.segments += 1
        return answers[0]

    def _answer(self, here) -> bytes | None:
        while not here.poll(POLL_S):
            if not self.alive:
                raise RankFailure(self._why())
        try:
            return here.recv()
        except EOFError:
            self._ended.wait(5.0)
            raise RankFailure(self._why()) from None

    def _why(self) -> str:
        return str(self._failure) if self._failure is not None else "the ranks have stopped"

    def close(self) -> None:
        """Tell the ranks to stop and wait for them."""
        if self.alive:
            for here, _ in self._pipes:
                try:
                    here.send(None)
                except (BrokenPipeError, OSError):
                    pass
        self._thread.join(30)
        for here, rank_end in self._pipes:
            here.close()
            rank_end.close()

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve_rank(model_source: str, mode: str, options: dict, conns: list) -> None:
    """On every rank: load the U-Net once, then run each segment that arrives until told to stop."""
    import torch.distributed as dist

    rank = dist.get_rank()
    conn = conns[rank]
    unet = load_unet(model_source).to(setup())  # setup: the group is joined already; this rank's device
    while (work := conn.recv()) is not None:
        traj_bytes, steps, model_name = work
        handle = parallelize(unet, mode, **options)
        traj = Trajectory.from_bytes(traj_bytes)
        advance(unet, [traj], steps, model_name, where=f"{mode} x{handle.world_size}")
        handle.remove()
        conn.send(traj.to_bytes() if rank == 0 else None)
