"""A stock GroupNorm whose statistics cover the whole image, not one patch.

Each patch sends its per-group mean and variance; the image's are their row-weighted
combination (law of total variance), so synchronously the result equals the stock
layer on the full latent. Asynchronously (DistriFusion's corrected stale GroupNorm)
the image's moments are last step's, shifted by how much this patch's own moments
moved since: mean(stale) + (fresh_local - stale_local), for E[x] and E[x^2].
"""

from __future__ import annotations

import torch
from torch import nn

from .comm import Displaced
from .context import Context


class PatchGroupNorm(nn.Module):
    def __init__(self, norm: nn.GroupNorm, context: Context):
        super().__init__()
        self.norm = norm
        self.context = context
        self.exchange = Displaced()
        self.own_stale: torch.Tensor | None = None  # this patch's (mean, var) from the previous step

    def reset(self) -> None:
        self.exchange.reset()
        self.own_stale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx, split, i = self.context, self.context.split, self.context.index
        rows = split.rows(split.level_of(i, rows=x.shape[2]))
        weight = torch.tensor(rows, dtype=torch.float32, device=x.device) / sum(rows)

        groups = x.reshape(x.shape[0], self.norm.num_groups, -1)
        var, mean = torch.var_mean(groups.float(), dim=-1, correction=0)
        local = torch.stack([mean, var])  # 2 x batch x groups
        others = [ctx.rank(j) for j in range(split.parts) if j != i]
        fresh = ctx.fresh or ctx.options.groupnorm == "sync"
        got = self.exchange(
            ctx.comm, "groupnorm", {r: local for r in others}, {r: torch.empty_like(local) for r in others}, fresh
        )

        if fresh:
            stats = torch.stack([local if j == i else got[ctx.rank(j)] for j in range(split.parts)])
            mean = _weighted(weight, stats[:, 0])
            var = _weighted(weight, stats[:, 1] + (stats[:, 0] - mean) ** 2)
        else:
            stale = torch.stack([self.own_stale if j == i else got[ctx.rank(j)] for j in range(split.parts)])
            mean = _weighted(weight, stale[:, 0]) + (local[0] - self.own_stale[0])
            square = _weighted(weight, stale[:, 1] + stale[:, 0] ** 2) + (
                local[1] + local[0] ** 2 - self.own_stale[1] - self.own_stale[0] ** 2
            )
            var = square - mean**2
            var = torch.where(var < 0, local[1], var)  # the correction can overshoot; fall back to the patch's own
        self.own_stale = local

        out = ((groups - mean[..., None]) * torch.rsqrt(var[..., None] + self.norm.eps)).reshape(x.shape).to(x.dtype)
        if self.norm.affine:
            out = out * self.norm.weight[:, None, None] + self.norm.bias[:, None, None]
        return out


def _weighted(weight: torch.Tensor, per_patch: torch.Tensor) -> torch.Tensor:
    return torch.einsum("p,p...->...", weight, per_patch)
