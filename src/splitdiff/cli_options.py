"""Limits and checks that the command-line modules share (`splitdiff.cli`, `splitdiff.cli_parallel`).

A value no command could honour is a usage error, one line and exit 2, before any work.
"""

from __future__ import annotations

import math
import os

import typer

from .core.limits import MAX_GUIDANCE as GUIDANCE_MAX
from .core.limits import MAX_STEPS, SEED_MAX, SEED_MIN
from .errors import UserError


def finite(value: float | None) -> float | None:
    """Option callback: nan and inf pass typer's one-sided range checks (and nan every unbounded one)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def check_guidance(value: float) -> float:
    """Option callback for guidance scales: finite, 0..GUIDANCE_MAX (typer's own range check calls nan too big)."""
    finite(value)
    if not 0.0 <= value <= GUIDANCE_MAX:
        raise typer.BadParameter(f"{value} is not in the range 0..{GUIDANCE_MAX:g}")
    return value


def check_output(path: os.PathLike | str, flag: str) -> None:
    """Refuse an output that could not be written, before the work that would produce it."""
    from .io import unwritable_reason

    reason = unwritable_reason(path)
    if reason:
        raise UserError(f"{flag} {path}: {reason}")


RUN_DEVICE = typer.Option("auto", help="Where the U-Nets and decoder run: auto (the GPU when there is one), cpu or "
                          "cuda[:N].")
RUN_DTYPE = typer.Option("fp32", help="Their precision: fp32, fp16 or bf16 (trajectories stay fp32).")
