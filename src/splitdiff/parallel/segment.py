"""A plan segment on patch-parallel ranks: the trajectory goes out as bytes and comes back advanced.

Composition, not a second sampler: every rank loads the U-Net, parallelizes it, and
runs the core's runner on the same deserialized trajectory. Each U-Net call returns
the full output on every rank, so all ranks hold the same trajectory afterwards, and
rank 0 sends its bytes back (safetensors, through the launcher's result file). A
hybrid plan's cloud segment can so run on N local ranks while the rest runs here;
provenance records where ("pcpp x4"). A new launch is a new generation to the
patches: each segment starts with its own synchronous warm-up.
"""

from __future__ import annotations

import torch

from ..core.runner import advance
from ..core.trajectory import Trajectory
from ..errors import UserError
from .comm import DEFAULT_TIMEOUT_S, setup
from .context import Options
from .geometry import RowSplit
from .ranks import launch
from .run import load_unet
from .unet import check_supported, downsamplings, parallelize


def advance_parallel(model_source: str, traj_bytes: bytes, steps: int, model_name: str, mode: str = "pcpp",
                     ranks: int = 2, *, timeout_s: float = DEFAULT_TIMEOUT_S, **parallel_options) -> bytes:
    """`steps` more steps of a serialized trajectory on `ranks` local ranks; the advanced trajectory's bytes.

    model_source: a registry name or diffusers folder ("tiny": a random tiny U-Net), loaded by each rank.
    parallel_options: band, warmup_steps, groupnorm, split_cfg (see `parallelize`). A rank that fails
    raises RankFailure; call `check_parallel` first to refuse what cannot be cut before any rank starts.
    """
    _check_ranks(ranks, Options(mode, **parallel_options))
    kwargs = dict(model_source=model_source, traj_bytes=traj_bytes, steps=steps, model_name=model_name, mode=mode,
                  options=parallel_options)
    return launch(_advance_rank, ranks, kwargs, timeout_s=timeout_s)[0]


def check_parallel(unet: torch.nn.Module, latent_shape: tuple[int, ...], mode: str, ranks: int,
                   **parallel_options) -> None:
    """A UserError, in this process, if `unet` on `ranks` ranks cannot take latents of this shape."""
    options = Options(mode, **parallel_options)
    _check_ranks(ranks, options)
    check_supported(unet)
    height, width = latent_shape[-2:]
    RowSplit.of(height, width, ranks // options.groups(ranks), downsamplings(unet))


def _check_ranks(ranks: int, options: Options) -> None:
    if ranks < 1:
        raise UserError(f"patch parallelism needs at least one rank, not {ranks}")
    options.groups(ranks)


def _advance_rank(model_source: str, traj_bytes: bytes, steps: int, model_name: str, mode: str,
                  options: dict) -> bytes | None:
    """On every rank: the same trajectory, the same steps; rank 0 returns the result."""
    unet = load_unet(model_source).to(setup())  # setup: the group is joined already; this rank's device
    handle = parallelize(unet, mode, **options)
    traj = Trajectory.from_bytes(traj_bytes)
    advance(unet, [traj], steps, model_name, where=f"{mode} x{handle.world_size}")
    handle.remove()
    return traj.to_bytes() if handle.rank == 0 else None
