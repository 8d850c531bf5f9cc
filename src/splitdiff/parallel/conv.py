"""A stock Conv2d run on one row patch.

Between patches, the rows the kernel reaches across the cut (the halo) come from the
neighbour instead of zero padding; at the image's top and bottom the zeros stay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .comm import Displaced
from .context import Context


def halo(conv: nn.Conv2d) -> tuple[int, int]:
    """Rows needed above and below a patch so that its output rows come out whole."""
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    return p, max(0, d * (k - 1) - p - s + 1)


class PatchConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, context: Context):
        super().__init__()
        self.conv = conv
        self.context = context
        self.above, self.below = halo(conv)
        self.halos = Displaced()

    def reset(self) -> None:
        self.halos.reset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx, split, i = self.context, self.context.split, self.context.index
        rows = split.rows(split.level_of(i, rows=x.shape[2]))
        if min(rows) < max(self.above, self.below):
            raise UserError(
                f"a convolution needs {max(self.above, self.below)} halo rows but a patch has only {min(rows)} "
                "at its resolution; use fewer ranks or a larger image"
            )
        up = ctx.rank(i - 1) if i > 0 else None
        down = ctx.rank(i + 1) if i < split.parts - 1 else None
        sends, receives = {}, {}
        if up is not None:
            if self.below:
                sends[up] = x[:, :, : self.below]
            if self.above:
                receives[up] = x.new_empty(*x.shape[:2], self.above, x.shape[3])
        if down is not None:
            if self.above:
                sends[down] = x[:, :, -self.above :]
            if self.below:
                receives[down] = x.new_empty(*x.shape[:2], self.below, x.shape[3])
        got = self.halos(ctx.comm, "halo", sends, receives, ctx.fresh)

        def beyond(rank: int | None, n: int) -> torch.Tensor:  # the neighbour's rows, or the image's zero padding
            return got[rank] if rank is not None and n else x.new_zeros(*x.shape[:2], n, x.shape[3])

        x = torch.cat([beyond(up, self.above), x, beyond(down, self.below)], dim=2)
        c = self.conv
        return F.conv2d(x, c.weight, c.bias, c.stride, (0, c.padding[1]), c.dilation, c.groups)
