"""Step plans: which model runs how many steps, in order, and with which user's adapter.

`cloud:10,edge:15` is Hybrid SD (large then small); `edge:5,cloud:20` is T-Stitch
(small then large); any number of segments in any order is allowed. A segment may
name a user's adapter after its model, `edge@ana:10`: the model computes with that
user's LoRA for those steps (the users axis; the core only carries the name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import UserError


@dataclass(frozen=True)
class PlanSegment:
    model: str
    steps: int
    adapter: str | None = None  # a user's adapter, by name

    @property
    def label(self) -> str:
        """How the segment is written: `edge` or `edge@ana`."""
        return self.model if self.adapter is None else f"{self.model}@{self.adapter}"


Plan = tuple[PlanSegment, ...]

_SEGMENT = re.compile(r"^([A-Za-z0-9_.\-]+)(?:@([a-z][a-z0-9_\-]{0,31}))?:(\d+)$")


def parse_plan(text: str) -> Plan:
    """'cloud:10,edge@ana:15' -> (PlanSegment('cloud', 10), PlanSegment('edge', 15, 'ana'))."""
    segments = []
    for part in text.split(","):
        m = _SEGMENT.match(part.strip())
        if not m:
            raise UserError(f"cannot read plan segment {part.strip()!r}; write MODEL:STEPS or MODEL@USER:STEPS, "
                            "e.g. cloud:10,edge@ana:15")
        if int(m.group(3)) < 1:
            raise UserError(f"plan segment {part.strip()!r} runs no steps")
        segments.append(PlanSegment(m.group(1), int(m.group(3)), m.group(2)))
    return tuple(segments)


def plan_steps(plan: Plan) -> int:
    return sum(s.steps for s in plan)


def check_plan(plan: Plan, total_steps: int, start: int = 0) -> None:
    """A plan must take a trajectory from step `start` exactly to its last step."""
    if plan_steps(plan) != total_steps - start:
        raise UserError(f"plan {format_plan(plan)} runs {plan_steps(plan)} steps but {total_steps - start} "
                        f"remain of {total_steps} (from step {start})")


def format_plan(plan: Plan) -> str:
    return ",".join(f"{s.label}:{s.steps}" for s in plan)


def fit_plan(plan: Plan, steps: int) -> Plan:
    """The segments resized to `steps`, the last segments kept whole first.

    A device's last steps are the ones that make the image its own, so a shorter plan is
    cut from the front and a longer one adds to the first segment. Segments keep their
    adapters.
    """
    total = plan_steps(plan)
    if steps >= total:
        return (replace(plan[0], steps=plan[0].steps + steps - total), *plan[1:])
    out, left = [], steps
    for seg in reversed(plan):
        if left <= 0:
            break
        out.append(replace(seg, steps=min(seg.steps, left)))
        left -= seg.steps
    return tuple(reversed(out))
