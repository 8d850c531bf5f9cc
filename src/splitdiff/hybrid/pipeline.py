"""Hybrid generation: one text encoder and VAE, several U-Nets, a step plan.

The models of one plan share the VAE's latent space and the text encoder's context
(as in Hybrid SD), so a trajectory started by one can be finished by another.
Composition only: encoding, advancing and decoding are the core's.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core.plan import Plan, PlanSegment, check_plan
from ..core.runner import advance, decode, to_pil
from ..core.trajectory import Trajectory, TrajectoryError, new_trajectory
from ..errors import UserError


def latent_factor(vae) -> int:
    """Pixels per latent along a side: 2 ** (number of down/up-sampling stages)."""
    cfg = vae.config
    channels = getattr(cfg, "block_out_channels", None) or getattr(cfg, "decoder_block_out_channels")
    return 2 ** (len(channels) - 1)


def check_compatible(unets: dict, vae, context_dim: int | None) -> None:
    """Models that share trajectories must agree on latent channels and context width."""
    latent = getattr(vae.config, "latent_channels", None) if vae is not None else None
    for name, unet in unets.items():
        if latent is not None and unet.config.in_channels != latent:
            raise UserError(f"model {name!r} takes {unet.config.in_channels} latent channels "
                            f"but the VAE makes {latent}")
        if context_dim is not None and unet.config.cross_attention_dim != context_dim:
            raise UserError(f"model {name!r} cross-attends to width {unet.config.cross_attention_dim} "
                            f"but the text encoder gives {context_dim}")
    channels = {n: u.config.in_channels for n, u in unets.items()}
    if len(set(channels.values())) > 1:
        raise UserError(f"models in one plan must share latent channels; got {channels}")


def check_trajectory(traj: Trajectory, unet, model: str) -> None:
    """A TrajectoryError unless `unet` can run `traj`: its latent channels, its latent sides
    (divisible by the U-Net's downsampling) and its context width."""
    cfg = unet.config
    channels, h, w = traj.latents.shape[1:]
    if channels != cfg.in_channels:
        raise TrajectoryError(f"trajectory has {channels} latent channels; model {model!r} takes {cfg.in_channels}")
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if h % factor or w % factor:
        raise TrajectoryError(f"trajectory latents are {h}x{w}; model {model!r} needs sides divisible by {factor}")
    width = getattr(cfg, "encoder_hid_dim", None) or cfg.cross_attention_dim
    if isinstance(width, int) and traj.prompt_embeds.shape[-1] != width:
        raise TrajectoryError(f"trajectory embeddings are {traj.prompt_embeds.shape[-1]} wide; model {model!r} "
                              f"cross-attends to width {width}")


@dataclass
class HybridPipeline:
    unets: dict  # plan name -> UNet2DConditionModel
    vae: object
    encoder: Callable
    noise_schedule: dict | None = None
    context_dim: int | None = None
    timings: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # plan name -> registry name or folder (for other processes)
    # plan name -> fn(traj, steps) that advances traj in place outside this process (e.g. on patch-parallel ranks)
    elsewhere: dict[str, Callable[[Trajectory, int], None]] = field(default_factory=dict)
    # what `model@name` segments mean: .resolve(name) -> ref with .sha256, and .applied(unet, name), a context
    # in which the U-Net computes with that adapter (the users axis' AdapterSet); None: plans name no adapters
    adapters: Any = None

    # `scheduler="folder"` runs the scheduler of this source (the plan's first model's folder)
    scheduler_source: str | None = None

    def __post_init__(self):
        check_compatible(self.unets, self.vae, self.context_dim)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "HybridPipeline":
        """Move the U-Nets and the decoder (the text encoder stays where it is: it runs once per prompt).

        Trajectories stay float32 on the CPU; each step's inputs are cast to the U-Net's device and dtype.
        """
        def moved(model):  # a copy: loaded models are cached and shared, and must not move under their other users
            same = (device is None or model.device == torch.device(device)) and (dtype is None or model.dtype == dtype)
            return model if same else copy.deepcopy(model).to(device=device, dtype=dtype)

        self.unets = {name: moved(unet) for name, unet in self.unets.items()}
        self.vae = moved(self.vae)
        return self

    def sides(self, size: int | None = None, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(height, width) in pixels: each given one, else `size`, else 64; refused unless the VAE's factor divides it."""
        h, w = height or size or 64, width or size or 64
        f = latent_factor(self.vae)
        for what, side in (("height", h), ("width", w)):
            if side % f:
                raise UserError(f"{what} {side} is not a multiple of the VAE's factor {f}")
        return h, w

    def start(self, prompt: str, *, negative_prompt: str = "", seed: int = 0, **options) -> Trajectory:
        """Encode the prompt and draw the seeded noise: a trajectory at step 0."""
        return self.start_many([prompt], [seed], negative_prompt=negative_prompt, **options)[0]

    def scheduler_for(self, scheduler: str) -> tuple[str, dict | None]:
        """(scheduler name, config) for a named scheduler over the models' noise schedule, or for "folder"."""
        from ..core.registry import folder_scheduler

        if scheduler != "folder":
            return scheduler, self.noise_schedule
        if self.scheduler_source is None:
            raise UserError("--scheduler folder needs the plan's first model to be a pipeline folder with "
                            "scheduler/scheduler_config.json")
        return folder_scheduler(self.scheduler_source)

    def start_many(self, prompts: list[str], seeds: list[int], *, negative_prompt: str = "", steps: int = 25,
                   scheduler: str = "dpmsolver++", guidance_scale: float = 5.0, size: int | None = None,
                   height: int | None = None, width: int | None = None) -> list[Trajectory]:
        """One trajectory at step 0 per (prompt, seed), sharing one negative prompt; one encoder call.

        `height` and `width` (pixels) default to `size`, which defaults to 64.
        """
        h, w = self.sides(size, height, width)
        f = latent_factor(self.vae)
        name, config = self.scheduler_for(scheduler)
        channels = next(iter(self.unets.values())).config.in_channels
        start = time.perf_counter()
        emb, mask = self.encoder(list(prompts) + [negative_prompt])
        self.timings["encode"] = time.perf_counter() - start
        return [new_trajectory(
            emb[i], emb[-1], latent_shape=(channels, h // f, w // f), scheduler=name, steps=steps,
            seed=seed, guidance_scale=guidance_scale, prompt_mask=None if mask is None else mask[i],
            negative_mask=None if mask is None else mask[-1], noise_schedule=config,
            prompt=p, negative_prompt=negative_prompt) for i, (p, seed) in enumerate(zip(prompts, seeds))]

    def run(self, traj: Trajectory, plan: Plan, on_step: Callable[[str, int], None] | None = None) -> None:
        """Run the plan's segments in order, each with its own U-Net, on one trajectory."""
        check_plan(plan, traj.num_steps, traj.step_index)
        self.check(traj, plan)
        for seg in plan:
            self.run_segment(traj, seg, on_step)

    def check(self, traj: Trajectory, plan: Plan) -> None:
        """Refuse, before any step, a plan naming a model not loaded or one that cannot run `traj`."""
        for seg in plan:
            if seg.model not in self.unets:
                raise UserError(f"plan names model {seg.model!r} but only {', '.join(self.unets)} are loaded")
            check_trajectory(traj, self.unets[seg.model], seg.model)
            if seg.adapter is not None:
                if self.adapters is None:
                    raise UserError(f"plan segment {seg.label!r} names an adapter, but this pipeline has none")
                if seg.model in self.elsewhere:
                    raise UserError(f"plan segment {seg.label!r}: adapters run on this device, not patch-parallel")
                self.adapters.resolve(seg.adapter)

    def run_segment(self, traj: Trajectory, seg: PlanSegment, on_step: Callable[[str, int], None] | None = None) -> None:
        """One segment: here with the model's U-Net, or wherever `elsewhere` sends that model's steps."""
        self.check(traj, (seg,))
        unet = self.unets[seg.model]
        progress = (lambda k, label=seg.label: on_step(label, k)) if on_step else None
        if seg.adapter is not None:
            with self.adapters.applied(unet, seg.adapter) as ref:
                advance(unet, [traj], seg.steps, seg.model, on_step=progress, adapter=seg.adapter,
                        adapter_sha256=ref.sha256)
            return
        if seg.model not in self.elsewhere:
            advance(unet, [traj], seg.steps, seg.model, on_step=progress)
            return
        self.elsewhere[seg.model](traj, seg.steps)
        for k in range(seg.steps if on_step else 0):
            on_step(seg.model, k)

    def decode(self, traj: Trajectory):
        """The trajectory's image (PIL); the decode time goes to `timings['decode']`."""
        start = time.perf_counter()
        image = to_pil(decode(self.vae, traj.latents))[0]
        self.timings["decode"] = time.perf_counter() - start
        return image


def load_pipeline(model_sources: dict[str, str], vae_source: str, dtype: torch.dtype = torch.float32,
                  variant: str | None = None, text_encoder: str | None = None) -> HybridPipeline:
    """Load the named U-Nets, the VAE and the one text encoder they share (text.encoder_source).

    `variant` picks a weights variant ("fp16") in every folder; without it a folder that
    ships only fp16-variant weights loads those.
    """
    from ..core.registry import load_unet, load_vae, noise_schedule
    from ..text import encoder_source, prompt_encoder_for

    shared = encoder_source(model_sources, text_encoder)  # refuses two different encoders before anything loads
    unets = {name: load_unet(src, dtype, variant) for name, src in model_sources.items()}
    first = next(iter(model_sources.values()))
    encoder = prompt_encoder_for(shared)
    schedule = noise_schedule(first)
    return HybridPipeline(unets, load_vae(vae_source, dtype, variant), encoder, schedule,
                          encoder.model.config.hidden_size, sources=dict(model_sources),
                          scheduler_source=None if schedule is None else first)
