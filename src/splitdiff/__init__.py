"""splitdiff: split diffusion-model inference across time, space and users.

The library's entry point is `SplitPipeline` (splitdiff.pipeline); the CLI is `splitdiff`.
"""

__version__ = "0.1.0"

__all__ = ["SplitPipeline", "SplitOutput", "Trajectory"]


def __getattr__(name: str):
    """Heavy modules (torch, diffusers) load on first use, so `splitdiff --help` stays quick."""
    if name in ("SplitPipeline", "SplitOutput"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "Trajectory":
        from .core.trajectory import Trajectory

        return Trajectory
    raise AttributeError(f"module 'splitdiff' has no attribute {name!r}")
