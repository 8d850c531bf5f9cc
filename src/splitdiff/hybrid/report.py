"""The cost table: who ran how many steps, for how long, and what share of U-Net time."""

from __future__ import annotations

from collections import OrderedDict

from rich.console import Console
from rich.table import Table

from ..core.trajectory import Trajectory


def cost_rows(traj: Trajectory) -> list[dict]:
    """One row per model (and place) in the order they ran, with its share of U-Net seconds."""
    rows: OrderedDict[tuple[str, str], dict] = OrderedDict()
    for seg in traj.provenance:
        row = rows.setdefault((seg.model, seg.where), {"model": seg.model, "where": seg.where, "steps": 0,
                                                       "seconds": 0.0})
        row["steps"] += seg.end - seg.start
        row["seconds"] += seg.seconds
    total = sum(r["seconds"] for r in rows.values()) or 1.0
    for r in rows.values():
        r["share"] = r["seconds"] / total
    return list(rows.values())


def print_cost_table(traj: Trajectory, extra: dict[str, str] | None = None, console: Console | None = None) -> None:
    table = Table(title="cost", show_edge=False)
    for col in ("model", "where", "steps", "U-Net s", "share"):
        table.add_column(col, justify="left" if col in ("model", "where") else "right")
    for r in cost_rows(traj):
        table.add_row(r["model"], r["where"], str(r["steps"]), f"{r['seconds']:.3f}", f"{100 * r['share']:.1f}%")
    for key, value in (extra or {}).items():
        table.add_row(key, "", "", value, "")
    (console or Console(stderr=False)).print(table)
