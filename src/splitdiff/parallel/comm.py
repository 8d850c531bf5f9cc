"""The communication manager: every byte between patch ranks goes through here.

Each exchange is one batch of point-to-point sends and receives, so uneven patch
sizes, neighbour-only traffic and "send only the band" all take the same path, and
the bytes are exactly what was put on the wire. Ranks post exchanges in the same
order (they run the same U-Net), so a running tag keeps gloo's messages matched;
NCCL matches by order and ignores it.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .stats import Stats

DEFAULT_TIMEOUT_S = 120.0


class PeerFailure(RuntimeError):
    """Another rank stopped answering: it exited, or hung past the process-group timeout."""


def setup(timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group described by torchrun's (or launch's) environment.

    gloo on CPU, NCCL on GPU. Without that environment this process is a group of one.
    The timeout bounds every wait on another rank, so a dead or hung rank ends the run.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return device


def teardown(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Leave the process group once every rank got here; names a rank that did not."""
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1 and dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
    dist.destroy_process_group()


class Exchange:
    """Posted sends and receives; `wait` returns the received tensors by source rank."""

    def __init__(self, comm: Comm, category: str, works: list, received: dict[int, torch.Tensor]):
        self.comm, self.category, self.works, self.received = comm, category, works, received

    def wait(self) -> dict[int, torch.Tensor]:
        started = time.perf_counter()
        try:
            for work in self.works:
                work.wait()
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise PeerFailure(
                f"rank {self.comm.rank} lost contact with rank(s) {sorted(self.received) or '?'} during the "
                f"{self.category} exchange (a rank exited, or hung past the timeout): {first_line}"
            ) from error
        finally:
            self.works = []
        self.comm.stats.waited(time.perf_counter() - started)
        return self.received


class Comm:
    def __init__(self, stats: Stats):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.stats = stats
        self._tag = 0
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def start(self, category: str, sends: dict[int, torch.Tensor], receives: dict[int, torch.Tensor]) -> Exchange:
        """Post sends (rank -> tensor) and receives into the given empty tensors (rank -> tensor)."""
        self._tag = (self._tag + 1) % 2**30
        ops = [dist.P2POp(dist.isend, t.contiguous(), r, tag=self._tag) for r, t in sends.items()]
        ops += [dist.P2POp(dist.irecv, t, r, tag=self._tag) for r, t in receives.items()]
        self.stats.traffic(category, _nbytes(sends), _nbytes(receives))
        works = dist.batch_isend_irecv(ops) if ops else []
        return Exchange(self, category, works, receives)


class Displaced:
    """One layer's exchange: fresh while synchronous, one step stale after warm-up.

    Asynchronously, the values this layer sends now are used by the others at the
    next step, while they use what arrived from the previous one; the wait for it
    has been hidden behind a whole step of compute (DistriFusion's displaced patches).
    """

    def __init__(self) -> None:
        self.stale: dict[int, torch.Tensor] = {}
        self.pending: Exchange | None = None

    def __call__(self, comm: Comm, category: str, sends, receives, fresh: bool) -> dict[int, torch.Tensor]:
        if fresh:
            self.reset()
            self.stale = comm.start(category, sends, receives).wait()
            return self.stale
        if self.pending is not None:
            self.stale = self.pending.wait()
        self.pending = comm.start(category, sends, receives)
        return self.stale

    def reset(self) -> None:
        if self.pending is not None:
            self.pending.wait()
        self.pending, self.stale = None, {}


def _nbytes(tensors: dict[int, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
