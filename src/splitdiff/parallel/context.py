"""What every swapped-in module needs to know about the U-Net call under way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UserError
from .geometry import RowSplit

if TYPE_CHECKING:  # the CLI reads MODES from here without loading torch
    from .comm import Comm

MODES = ("sync", "distrifusion", "pcpp")
GROUPNORMS = ("sync", "async")


@dataclass(frozen=True)
class Options:
    """How patches talk. `sync` is exact; the others trade exactness for hidden communication."""

    mode: str = "pcpp"
    band: float = 0.3  # PCPP: rows of each neighbour's patch seen by self-attention, as a fraction of it
    warmup_steps: int = 4  # synchronous steps at the start of each generation
    groupnorm: str = "sync"  # "async": DistriFusion's corrected stale statistics (not with mode="sync")
    split_cfg: bool = False  # even rank counts: unconditional and conditional halves on two rank groups

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown parallel mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.groupnorm not in GROUPNORMS:
            raise UserError(f"unknown GroupNorm mode {self.groupnorm!r}; choose sync or async")
        if self.mode == "sync" and self.groupnorm == "async":
            raise UserError("mode 'sync' is exact and has no stale statistics; use groupnorm 'sync' with it")
        if not 0.0 < self.band <= 1.0:
            raise UserError(f"PCPP band must be a fraction of a patch in (0, 1], got {self.band}")
        if self.warmup_steps < (0 if self.mode == "sync" else 1):
            raise UserError(f"mode {self.mode!r} needs at least one warm-up step to have stale values to use")

    def groups(self, world: int) -> int:
        """Rank groups, one per image batch half: two with split_cfg, which then needs an even world."""
        if not self.split_cfg:
            return 1
        if world % 2:
            raise UserError(f"splitting classifier-free guidance needs an even number of ranks, not {world}")
        return 2


class Context:
    """Shared, mutable per-call state: the row split, this rank's patch, the step."""

    def __init__(self, options: Options, comm: Comm, members: tuple[int, ...]):
        self.options = options
        self.comm = comm
        self.members = members  # global ranks of the patches of this rank's image, top patch first
        self.index = members.index(comm.rank)
        self.split: RowSplit | None = None
        self.step = 0

    @property
    def fresh(self) -> bool:
        """True while exchanges are synchronous: always in sync mode, else during warm-up."""
        return self.options.mode == "sync" or self.step < self.options.warmup_steps

    def rank(self, patch: int) -> int:
        return self.members[patch]
