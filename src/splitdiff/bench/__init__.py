"""Benchmarks: each writes CSV and PNG plots beside the figures it prints."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..io import atomic_write_bytes


def write_csv(path: Path, rows: list[dict]) -> None:
    """One CSV of the rows (columns: every key, in first-seen order; floats to 6 significant digits).

    Written atomically, so an interrupted benchmark never leaves a half-written table.
    """
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    atomic_write_bytes(path, buf.getvalue().encode())
