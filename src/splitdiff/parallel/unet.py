"""Patch parallelism for a stock diffusers U-Net, switched on in place.

`parallelize` swaps a few modules of the U-Net for patch-aware ones (halo-exchanging
convolutions, whole-image GroupNorm, self-attention over all patches) and hooks its
forward: the caller passes the full latent batch on every rank, each rank runs the
U-Net on its row patch, and the full output is gathered back on every rank. So the
caller's scheduler loop runs unchanged, and identically, on every rank.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from diffusers.models.attention_processor import Attention
from torch import nn

from ..errors import UserError
from .attention import PatchAttnProcessor
from .comm import Comm, setup
from .context import Context, Options
from .conv import PatchConv2d, halo
from .geometry import RowSplit
from .groupnorm import PatchGroupNorm
from .stats import Stats

UNSUPPORTED_BLOCKS = {"AdaGroupNorm", "SpatialNorm", "FirDownsample2D", "FirUpsample2D", "KDownsample2D", "KUpsample2D"}
ADAPTER_INPUTS = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals")


def parallelize(
    unet: nn.Module,
    mode: str = "pcpp",
    *,
    band: float = 0.3,
    warmup_steps: int = 4,
    groupnorm: str = "sync",
    split_cfg: bool = False,
) -> PatchParallel:
    """Make `unet` run as one row patch per rank of the default process group (joined if need be).

    mode: "sync" (exact), "distrifusion" (stale K/V of all patches after warm-up) or "pcpp"
    (stale K/V of a `band` of each neighbour's rows after warm-up, and only that band is sent).
    groupnorm: "sync", or "async" for DistriFusion's corrected stale statistics.
    split_cfg: with an even rank count, the first half of the batch (unconditional) goes to
    the first half of the ranks and the second half to the others.
    """
    options = Options(mode, band, warmup_steps, groupnorm, split_cfg)
    if getattr(unet, "_patch_parallel", None) is not None:
        raise UserError("this U-Net is already parallelized; call remove() on its handle first")
    setup()
    return PatchParallel(unet, options)


def downsamplings(unet: nn.Module) -> int:
    """2x downsamplings between the latent and the U-Net's lowest resolution, where rows are cut."""
    return sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))


def check_supported(unet: nn.Module) -> None:
    """A UserError naming (up to three of) the modules patches cannot cut; callable before any rank starts."""
    problems = []
    for name, module in unet.named_modules():
        kind = type(module).__name__
        if kind in UNSUPPORTED_BLOCKS or isinstance(module, nn.ConvTranspose2d):
            problems.append(f"{name} ({kind})")
        elif kind == "Downsample2D" and module.use_conv and module.padding == 0:
            problems.append(f"{name} (Downsample2D with padding 0 pads only bottom and right)")
        elif isinstance(module, Attention):
            if module.group_norm is not None or module.spatial_norm is not None or module.added_kv_proj_dim:
                problems.append(f"{name} (spatial or added-K/V attention)")
        elif isinstance(module, nn.Conv2d) and any(halo(module)):
            if isinstance(module.padding, str) or module.padding_mode != "zeros":
                problems.append(f"{name} (convolution padding {module.padding!r}/{module.padding_mode})")
    if problems:
        raise UserError(f"patch parallelism does not support {', '.join(problems[:3])}")


class PatchParallel:
    """The handle of a parallelized U-Net: new generations, traffic and timing, undoing the swap."""

    def __init__(self, unet: nn.Module, options: Options):
        world, rank = dist.get_world_size(), dist.get_rank()
        groups = options.groups(world)
        size = world // groups
        self.group = rank // size
        self.groups = groups
        self.unet = unet
        self.options = options
        self.stats = Stats(rank)
        self.context = Context(options, Comm(self.stats), tuple(range(self.group * size, (self.group + 1) * size)))
        self.levels = downsamplings(unet)
        self._signature = inspect.signature(unet.forward)
        self._shape: torch.Size | None = None
        self._step = 0
        self._swapped: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []  # parent, name, stock, patched
        self._processors: list[tuple[Attention, object]] = []
        self._swap_in()
        self._hooks = [
            unet.register_forward_pre_hook(self._enter, with_kwargs=True),
            unet.register_forward_hook(self._leave, with_kwargs=True),
        ]
        unet._patch_parallel = self

    @property
    def rank(self) -> int:
        return self.context.comm.rank

    @property
    def world_size(self) -> int:
        return self.context.comm.world_size

    def reset(self) -> None:
        """Start a new generation: warm-up again, forget stale values and stats. Call it on every rank."""
        self._drain()
        self._step, self._shape = 0, None
        self.stats.clear()

    def remove(self) -> None:
        """Give the U-Net its stock modules back (the stats stay readable)."""
        self._drain()
        for parent, name, stock, _ in self._swapped:
            setattr(parent, name, stock)
        for attn, stock in self._processors:
            attn.set_processor(stock)
        for hook in self._hooks:
            hook.remove()
        self._swapped, self._processors, self._hooks = [], [], []
        self.unet._patch_parallel = None

    def split(self, height: int, width: int) -> RowSplit:
        """The patches a height x width latent is cut into (a UserError if it cannot be)."""
        return RowSplit.of(height, width, len(self.context.members), self.levels)

    def gather_stats(self) -> list[dict[str, float]]:
        """Every rank's per-step records, on every rank (a collective: call it on all ranks)."""
        mine = self.stats.rows()
        keys = list(mine[0]) if mine else []
        comm = self.context.comm
        table = torch.tensor([[row[k] for k in keys] for row in mine], dtype=torch.float64, device=comm.device)
        table = table.reshape(len(mine), -1)
        others = [r for r in range(self.world_size) if r != self.rank]
        got = comm.start("stats", {r: table for r in others}, {r: torch.empty_like(table) for r in others}).wait()
        got[self.rank] = table
        whole = [k for k in keys if not k.endswith("_s")]  # step, rank and byte counts travel as floats
        rows = [dict(zip(keys, line)) for r in sorted(got) for line in got[r].tolist()]
        return [{k: int(v) if k in whole else v for k, v in row.items()} for row in rows]

    def _drain(self) -> None:
        """Finish the exchanges still in flight and forget stale values."""
        for _, _, _, patched in self._swapped:
            patched.reset()
        for attn, _ in self._processors:
            attn.processor.reset()

    # -- the swap ------------------------------------------------------------------------------

    def _swap_in(self) -> None:
        check_supported(self.unet)
        replacements: dict[nn.Module, nn.Module] = {}
        for module in self.unet.modules():
            if isinstance(module, nn.GroupNorm):
                replacements[module] = PatchGroupNorm(module, self.context)
            elif isinstance(module, nn.Conv2d) and any(halo(module)):
                replacements[module] = PatchConv2d(module, self.context)

        for parent in list(self.unet.modules()):
            for name, child in list(parent._modules.items()):
                if child in replacements:
                    setattr(parent, name, replacements[child])
                    self._swapped.append((parent, name, child, replacements[child]))
        for module in self.unet.modules():
            if isinstance(module, Attention):
                self._processors.append((module, module.processor))
                module.set_processor(PatchAttnProcessor(module.processor, self.context))

    # -- the forward hooks ---------------------------------------------------------------------

    def _enter(self, unet, args, kwargs):
        call = self._signature.bind(*args, **kwargs).arguments
        if any(call.get(name) is not None for name in ADAPTER_INPUTS):
            raise UserError("adapter residuals (ControlNet, T2I-Adapter) are not supported with patch parallelism")
        sample = call["sample"]
        if sample.shape != self._shape:  # a new shape is a new generation
            if self._shape is not None:
                self.reset()
            self._shape = sample.shape
        batch, _, height, width = sample.shape
        split = self.split(height, width)
        self.context.split, self.context.step = split, self._step
        self.stats.begin(self._step)

        if self.groups == 2:
            if batch % 2:
                raise UserError(f"splitting classifier-free guidance needs an even batch, got {batch}")
            half = slice(self.group * batch // 2, (self.group + 1) * batch // 2)
            call = {name: _take_batch(value, batch, half) for name, value in call.items()}
        start = split.start(self.context.index, 0)
        call["sample"] = call["sample"][:, :, start : start + split.rows(0)[self.context.index]]
        return (), call

    def _leave(self, unet, args, kwargs, output):
        local = output[0] if isinstance(output, tuple) else output.sample
        full = self._gather(local)
        if full.is_cuda:
            torch.cuda.synchronize(full.device)
        self.stats.end()
        self._step += 1
        return (full,) if isinstance(output, tuple) else type(output)(sample=full)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """The full output batch from every rank's patch (of its half of the batch, with split_cfg)."""
        batch, _, height, width = self._shape
        split, size = self.context.split, len(self.context.members)

        def place(rank: int) -> tuple[slice, slice]:  # (samples, rows) of the full output that `rank` computed
            group, index = divmod(rank, size)
            half = batch // self.groups
            start = split.start(index, 0)
            return slice(group * half, (group + 1) * half), slice(start, start + split.rows(0)[index])

        comm = self.context.comm
        others = [r for r in range(self.world_size) if r != self.rank]
        receives = {}
        for r in others:
            samples, rows = place(r)
            receives[r] = local.new_empty(samples.stop - samples.start, local.shape[1], rows.stop - rows.start, width)
        got = comm.start("output", {r: local for r in others}, receives).wait()
        got[self.rank] = local
        full = local.new_empty(batch, local.shape[1], height, width)
        for r, piece in got.items():
            samples, rows = place(r)
            full[samples, :, rows] = piece
        return full


def _take_batch(value, batch: int, half: slice):
    """This rank group's half of anything batched (tensors and dicts of them)."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[half]
    if isinstance(value, dict):
        return {k: _take_batch(v, batch, half) for k, v in value.items()}
    return value
