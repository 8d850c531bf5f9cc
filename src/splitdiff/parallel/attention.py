"""Self-attention of one row patch over the other patches' keys and values.

Queries are the patch's own tokens; keys and values are the tokens of the whole image
(`sync`, `distrifusion`) or of the patch plus a band of rows from each neighbour
(`pcpp` after warm-up). The K/V of other patches are fresh while synchronous and one
step stale after; the patch's own K/V are always fresh. Cross-attention attends to
the prompt, which every rank holds, so it runs the stock processor untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from .comm import Displaced
from .context import Context


class PatchAttnProcessor:
    def __init__(self, stock, context: Context):
        self.stock = stock  # the processor this one replaced; runs cross-attention, and comes back on removal
        self.context = context
        self.kv = Displaced()

    def reset(self) -> None:
        self.kv.reset()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None:
            return self.stock(
                attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask, temb=temb, **kwargs,
            )  # fmt: skip
        if attention_mask is not None:
            raise UserError("self-attention masks are not supported with patch parallelism")

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, H*D) -> (B, H, N, D)
            return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key, value = self.gather(torch.cat([attn.to_k(hidden_states), attn.to_v(hidden_states)], dim=-1)).chunk(2, -1)
        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).flatten(2).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def gather(self, kv: torch.Tensor) -> torch.Tensor:
        """This patch's fresh K/V joined, in row order, with what it sees of the other patches."""
        ctx, split, i = self.context, self.context.split, self.context.index
        level = split.level_of(i, tokens=kv.shape[1])
        cols, rows = split.cols(level), split.rows(level)
        band = ctx.options.mode == "pcpp" and not ctx.fresh

        def band_tokens(patch: int) -> int:
            return split.band(patch, level, ctx.options.band) * cols

        seen = [j for j in range(split.parts) if j != i and (not band or abs(j - i) == 1)]
        sends, receives = {}, {}
        for j in seen:
            if band:  # the sender crops: only the rows next to the neighbour travel
                sends[ctx.rank(j)] = kv[:, : band_tokens(i)] if j < i else kv[:, -band_tokens(i) :]
                receives[ctx.rank(j)] = kv.new_empty(kv.shape[0], band_tokens(j), kv.shape[2])
            else:
                sends[ctx.rank(j)] = kv
                receives[ctx.rank(j)] = kv.new_empty(kv.shape[0], rows[j] * cols, kv.shape[2])
        got = self.kv(ctx.comm, "attention", sends, receives, ctx.fresh)

        parts = []
        for j in sorted(seen + [i]):
            if j == i:
                parts.append(kv)
            elif band:  # cropping again is a no-op on a band, and cuts the warm-up's whole patch to one
                other = got[ctx.rank(j)]
                parts.append(other[:, -band_tokens(j) :] if j < i else other[:, : band_tokens(j)])
            else:
                parts.append(got[ctx.rank(j)])
        return torch.cat(parts, dim=1)
