"""Patch parallelism: one denoising step cut into row patches across ranks.

    handle = parallelize(unet, mode="pcpp")   # on every rank, in place
    out = unet(sample, t, encoder_hidden_states=ctx)   # full batch in, full output out

Modes: "sync" (exact), "distrifusion" and "pcpp" (stale exchanges after warm-up).
`advance_parallel` runs some steps of a serialized trajectory on local ranks: a step
plan's segment, patch-parallel.
See docs/parallel.md.
"""

from .comm import PeerFailure, setup, teardown
from .context import MODES, Options
from .geometry import RowSplit
from .launch import RankFailure, launch
from .segment import advance_parallel, check_parallel
from .stats import CATEGORIES, Stats
from .unet import PatchParallel, parallelize

__all__ = [
    "CATEGORIES", "MODES", "Options", "PatchParallel", "PeerFailure", "RankFailure", "RowSplit", "Stats",
    "advance_parallel", "check_parallel", "launch", "parallelize", "setup", "teardown",
]
