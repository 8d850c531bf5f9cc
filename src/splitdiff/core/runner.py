"""Advance trajectories with a U-Net, and decode them with a VAE.

`denoise_step` is the one step of every sampler here: all trajectories (any prompts,
seeds, guidance scales, schedulers and step indices) share one batched U-Net call,
classifier-free guidance included, and then each trajectory's own scheduler takes
its step. Trajectories at different step indices batch together because timesteps
are passed per sample; this is what the server's step-level batching builds on.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Callable, Sequence

import torch

from .trajectory import Trajectory, TrajectoryError


class NonFiniteError(TrajectoryError):
    """A step left a trajectory's latents non-finite: its image would be black, so it is an error."""

    @classmethod
    def at(cls, traj: Trajectory) -> "NonFiniteError":
        """The error for the step `traj` was taking."""
        return cls(f"the latents became non-finite (nan or inf) at step {traj.step_index + 1} of "
                   f"{traj.num_steps} ({traj.scheduler_name}, guidance {traj.guidance_scale:g})")


def _context(trajs: Sequence[Trajectory], scaled: Sequence[torch.Tensor]):
    """The U-Net's inputs for one step: rows [uncond..., cond...] like StableDiffusionPipeline.

    Returns (guided trajectories, x, t, context, mask or None, added_cond_kwargs or None);
    the last is SDXL's pooled text embeddings and time ids, row for row.
    """
    guided = [(x, t) for x, t in zip(scaled, trajs) if t.uses_guidance]
    rows = [(x, t.timestep, t.negative_embeds, t.negative_mask, t.negative_added) for x, t in guided]
    rows += [(x, t.timestep, t.prompt_embeds, t.prompt_mask, t.prompt_added) for x, t in zip(scaled, trajs)]
    xs, ts, embeds, masks, added = zip(*rows)
    mask = None
    if any(m is not None for m in masks):
        mask = torch.stack([torch.ones(e.shape[0], dtype=torch.long) if m is None else m
                            for m, e in zip(masks, embeds)])
    extra = None
    if any(a is not None for a in added):
        if any(a is None or a.keys() != added[0].keys() for a in added):
            raise TrajectoryError("trajectories with and without added conditioning (SDXL) cannot share a step")
        extra = {k: torch.stack([a[k] for a in added]) for k in added[0]}
    return [t for _, t in guided], torch.cat(xs), torch.stack([t.float() for t in ts]), torch.stack(embeds), mask, \
        extra


def _scaled(traj: Trajectory) -> torch.Tensor:
    # scale_model_input is stateful for Euler schedulers: call it once per trajectory per step.
    return traj.scheduler.scale_model_input(traj.latents, traj.timestep)


@torch.no_grad()
def guided_noise(unet, trajs: Sequence[Trajectory], scaled: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Each trajectory's guided noise prediction, from one U-Net call (`scaled`: their scaled inputs, if made)."""
    guided, x, t, ctx, mask, added = _context(trajs, [_scaled(tr) for tr in trajs] if scaled is None else scaled)
    # One parameter says where the model is: diffusers' `unet.device` / `.dtype` walk every module
    # (for offloading hooks), 3 ms a call on the embedded cloud, a tenth of its step at batch 1.
    weight = next(unet.parameters())
    device, dtype = weight.device, weight.dtype
    extra = {} if added is None else {"added_cond_kwargs": {k: v.to(device, dtype) for k, v in added.items()}}
    out = unet(x.to(device, dtype), t.to(device), encoder_hidden_states=ctx.to(device, dtype),
               encoder_attention_mask=None if mask is None else mask.to(device), return_dict=False, **extra)[0]
    out = out.float().cpu()
    uncond = dict(zip((id(g) for g in guided), out[: len(guided)]))
    cond = out[len(guided):]
    preds = []
    for i, tr in enumerate(trajs):
        c = cond[i:i + 1]
        if id(tr) in uncond:
            u = uncond[id(tr)][None]
            c = u + tr.guidance_scale * (c - u)
        preds.append(c)
    return preds


def denoise_step(unet, trajs: Sequence[Trajectory]) -> dict[int, Exception]:
    """One step for every unfinished trajectory in `trajs`, in place, with one U-Net call.

    A failure that belongs to one trajectory does not stop the others: its scheduler
    refusing to scale or step it, or a step whose latents are not finite (NonFiniteError).
    Such failures are returned as {index in `trajs`: exception}; that trajectory keeps its
    latents and step index, but its scheduler may have moved on, so it must be dropped.
    Every other unfinished trajectory advances one step. A failure of the U-Net call
    itself concerns the whole batch and is raised.
    """
    failures: dict[int, Exception] = {}
    live, scaled = [], []
    for i, tr in enumerate(trajs):
        if tr.done:
            continue
        try:
            scaled.append(_scaled(tr))
        except Exception as e:  # noqa: BLE001 - reported to the caller, per trajectory
            failures[i] = e
            continue
        live.append((i, tr))
    if not live:
        return failures
    preds = guided_noise(unet, [tr for _, tr in live], scaled)
    for (i, tr), eps in zip(live, preds):
        try:
            latents = tr.scheduler.step(eps, tr.timestep, tr.latents, generator=tr.generator, return_dict=False)[0]
            if not bool(torch.isfinite(latents).all()):
                raise NonFiniteError.at(tr)
        except Exception as e:  # noqa: BLE001 - reported to the caller, per trajectory
            failures[i] = e
            continue
        tr.latents = latents
        tr.step_index += 1
    return failures


def model_fingerprint(unet) -> str:
    """16 hex digits of sha256 over the U-Net's config: the same name on two machines, the same model?

    A config hash, not a weights hash: cheap on every call, and it tells architectures and
    their settings apart (a pruned edge U-Net from a full one), which is what resuming needs.
    """
    cfg = json.dumps(dict(unet.config), sort_keys=True, default=str)
    return hashlib.sha256(cfg.encode()).hexdigest()[:16]


def advance(unet, trajs: Sequence[Trajectory], steps: int, model_name: str = "model", where: str = "local",
            on_step: Callable[[int], None] | None = None, adapter: str | None = None,
            adapter_sha256: str | None = None) -> float:
    """Advance each trajectory by `steps` (or to its end); record provenance; return U-Net seconds.

    `adapter` names the user adapter the U-Net computes with now (for the provenance only).
    The first trajectory failure of a step (see denoise_step) is raised.
    """
    total, fingerprint = 0.0, model_fingerprint(unet)
    for k in range(steps):
        live = [t for t in trajs if not t.done]
        if not live:
            break
        start = time.perf_counter()
        failures = denoise_step(unet, live)
        if failures:
            raise failures[min(failures)]
        dt = time.perf_counter() - start
        total += dt
        for t in live:
            t.record(model_name, 1, dt, where, adapter, adapter_sha256, fingerprint)
        if on_step:
            on_step(k)
    return total


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1], for AutoencoderKL and AutoencoderTiny alike."""
    scale = getattr(vae.config, "scaling_factor", 1.0) or 1.0
    x = (latents / scale).to(vae.device, vae.dtype)
    return vae.decode(x, return_dict=False)[0].float().cpu().clamp(-1, 1)


def to_pil(images: torch.Tensor):
    """B x 3 x H x W in [-1, 1] -> list of PIL images."""
    from PIL import Image

    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]
