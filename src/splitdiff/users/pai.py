"""The personalization curve PAI(n): what a user gains from running the last n steps with their adapter.

The multi-user offloading paper summarises personalization by a logistic curve in n,
1 / (1 + exp(-a (n - b))), fitted once, offline. splitdiff's curve is measured on its
shipped adapters by `splitdiff bench personalize` (docs/benchmarks.md, "personalization
curve"): the pooled fit over the shipped users at T = 25 is the default everywhere a
planner weighs splits (the server's admission, `bench users`, splitdiff's scenario family).
"""

from __future__ import annotations

import math

from ..errors import UserError

# The pooled fit of the paper's form over ana, ben and cy at T = 25, K = 32 (splitdiff bench personalize):
# R^2 0.82 pooled, 0.86-0.94 per user; PAI(0) = 0.13 and PAI(25) = 0.59 on this curve.
MEASURED = (0.0895, 20.84)


def pai(n: float, curve: tuple[float, float] = MEASURED) -> float:
    a, b = curve
    return 1.0 / (1.0 + math.exp(-a * (n - b)))


def format_pai(curve: tuple[float, float] = MEASURED) -> str:
    return f"{curve[0]:g},{curve[1]:g}"


def parse_pai(text: str) -> tuple[float, float]:
    """'A,B' -> (A, B), the PAI curve's slope and midpoint."""
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--pai {text!r} must be A,B (two numbers, e.g. {format_pai()})") from None
    if not (math.isfinite(a) and math.isfinite(b)) or a < 0:
        raise UserError(f"--pai {text!r}: A must be a finite slope >= 0 and B a finite midpoint")
    return a, b
