"""Patch parallelism: one denoising step cut into row patches across ranks.

    handle = parallelize(unet, mode="pcpp")   # on every rank, in place
    out = unet(sample, t, encoder_hidden_states=ctx)   # full batch in, full output out

Modes: "sync" (exact), "distrifusion" and "pcpp" (stale exchanges after warm-up).
See docs/parallel.md.
"""

from .comm import PeerFailure, setup, teardown
from .context import MODES, Options
from .geometry import RowSplit
from .launch import RankFailure, launch
from .stats import CATEGORIES, Stats
from .unet import PatchParallel, parallelize

__all__ = [
    "CATEGORIES", "MODES", "Options", "PatchParallel", "PeerFailure", "RankFailure", "RowSplit", "Stats",
    "launch", "parallelize", "setup", "teardown",
]
