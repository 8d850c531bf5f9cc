"""Patch parallelism: one denoising step cut into row patches across ranks.

    handle = parallelize(unet, mode="pcpp")   # on every rank, in place
    out = unet(sample, t, encoder_hidden_states=ctx)   # full batch in, full output out

Modes: "sync" (exact), "distrifusion" and "pcpp" (stale exchanges after warm-up).
`advance_parallel` runs some steps of a serialized trajectory on local ranks: a step
plan's segment, patch-parallel.
See docs/parallel.md.
"""

from importlib import import_module

# name -> submodule; loaded on first use, so that the CLI (which only needs the modes) starts without torch
_WHERE = {
    "PeerFailure": "comm", "setup": "comm", "teardown": "comm", "MODES": "context", "Options": "context",
    "RowSplit": "geometry", "RankFailure": "ranks", "launch": "ranks", "advance_parallel": "segment",
    "check_parallel": "segment", "CATEGORIES": "stats", "Stats": "stats", "PatchParallel": "unet",
    "parallelize": "unet",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'splitdiff.parallel' has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
