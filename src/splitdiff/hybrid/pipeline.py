"""Hybrid generation: one text encoder and VAE, several U-Nets, a step plan.

The models of one plan share the VAE's latent space and the text encoder's context
(as in Hybrid SD), so a trajectory started by one can be finished by another.
Composition only: encoding, advancing and decoding are the core's.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from ..core.plan import Plan, PlanSegment, check_plan, fit_plan
from ..core.runner import advance, decode, to_pil
from ..core.segments import Declined, Executor, SegmentFailed, StartRequest, advance_segment
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
    wants = getattr(cfg, "addition_embed_type", None) == "text_time"
    if wants != (traj.prompt_added is not None):
        raise TrajectoryError(f"model {model!r} {'needs' if wants else 'takes no'} pooled text embeddings and time "
                              f"ids (SDXL's added conditioning), and the trajectory has {'none' if wants else 'them'}")
    if wants:
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        if traj.prompt_added["text_embeds"].shape[-1] != pooled:
            raise TrajectoryError(f"trajectory's pooled text embeddings are {traj.prompt_added['text_embeds'].shape[-1]}"
                                  f" wide; model {model!r} takes {pooled}")


@dataclass
class HybridPipeline:
    unets: dict  # plan name -> UNet2DConditionModel
    vae: object
    encoder: Callable
    noise_schedule: dict | None = None
    context_dim: int | None = None
    timings: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # plan name -> registry name or folder (for other processes)
    # plan name -> where that model's segments run instead of here (patch-parallel ranks, a cloud server)
    executors: dict[str, Executor] = field(default_factory=dict)
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
        added = [None] * (len(prompts) + 1)
        if getattr(self.encoder, "pooled", False):  # SDXL: pooled embeddings, and time ids for this size
            emb, mask, pooled = self.encoder.with_pooled(list(prompts), negative_prompt)
            time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)  # original size, crop corner, target
            added = [{"text_embeds": row, "time_ids": time_ids} for row in pooled]
        else:
            emb, mask = self.encoder(list(prompts) + [negative_prompt])
        self.timings["encode"] = time.perf_counter() - start
        return [new_trajectory(
            emb[i], emb[-1], latent_shape=(channels, h // f, w // f), scheduler=name, steps=steps,
            seed=seed, guidance_scale=guidance_scale, prompt_mask=None if mask is None else mask[i],
            negative_mask=None if mask is None else mask[-1], noise_schedule=config,
            prompt=p, negative_prompt=negative_prompt, prompt_added=added[i], negative_added=added[-1])
            for i, (p, seed) in enumerate(zip(prompts, seeds))]

    def run(self, traj: Trajectory, plan: Plan, on_step: Callable[[str, int], None] | None = None) -> None:
        """Run the plan's segments in order, each with its own U-Net, on one trajectory."""
        check_plan(plan, traj.num_steps, traj.step_index)
        self.check(traj, plan)
        for seg in plan:
            self.run_segment(traj, seg, on_step)

    def check(self, traj: Trajectory, plan: Plan) -> None:
        """Refuse, before any step, a plan naming a model not loaded or one that cannot run `traj`.

        A model with an executor need not be loaded here (a cloud's), but the model its
        failed steps would run on must be.
        """
        for i, seg in enumerate(plan):
            executor = self.executors.get(seg.model)
            if executor is not None:
                if executor.here is not None and executor.here not in self.unets:
                    raise UserError(f"model {seg.model!r} falls back on {executor.here!r}, which is not loaded")
                if not executor.can_advance and (i or traj.step_index):
                    raise UserError(f"model {seg.model!r} only starts trajectories: its segment must come first")
            elif seg.model not in self.unets:
                raise UserError(f"plan names model {seg.model!r} but only {', '.join(self.unets)} are loaded")
            if seg.model in self.unets:
                check_trajectory(traj, self.unets[seg.model], seg.model)
            if seg.adapter is not None:
                if self.adapters is None:
                    raise UserError(f"plan segment {seg.label!r} names an adapter, but this pipeline has none")
                if executor is not None:
                    raise UserError(f"plan segment {seg.label!r}: adapters run on this device, not on "
                                    f"{seg.model!r}'s executor")
                self.adapters.resolve(seg.adapter)

    def run_segment(self, traj: Trajectory, seg: PlanSegment, on_step: Callable[[str, int], None] | None = None) -> None:
        """One segment: here with the model's U-Net, or on its executor under the failure policy."""
        self.check(traj, (seg,))
        executor = self.executors.get(seg.model)
        if executor is None:
            self._here(traj, seg, on_step)
            return
        here = lambda t, s: self._here(t, replace(s, model=executor.here or s.model), on_step)  # noqa: E731
        if advance_segment(executor, traj, seg, here) and on_step:
            for k in range(seg.steps):
                on_step(seg.label, k)

    def _here(self, traj: Trajectory, seg: PlanSegment, on_step: Callable[[str, int], None] | None = None) -> None:
        """The segment's steps with this process's own U-Net (and the segment's adapter)."""
        unet = self.unets[seg.model]
        progress = (lambda k, label=seg.label: on_step(label, k)) if on_step else None
        if seg.adapter is None:
            advance(unet, [traj], seg.steps, seg.model, on_step=progress)
            return
        with self.adapters.applied(unet, seg.adapter) as ref:
            advance(unet, [traj], seg.steps, seg.model, on_step=progress, adapter=seg.adapter,
                    adapter_sha256=ref.sha256)

    def run_request(self, request: StartRequest, plan: Plan,
                    on_step: Callable[[str, int], None] | None = None) -> Trajectory:
        """A whole generation from a request; the plan's first segment may be started by its executor.

        An executor that starts trajectories (a cloud) may run another number of steps than
        asked (an admission's split): the rest of the plan is then fitted to what remains,
        cut from the front. Declined, every step runs here as the plan's later segments;
        failed, or answered with a trajectory that cannot be finished here, the first
        segment's steps run here and the result is degraded.
        """
        check_plan(plan, request.steps)
        first, rest = plan[0], plan[1:]
        executor = self.executors.get(first.model)
        options = dict(negative_prompt=request.negative_prompt, seed=request.seed, steps=request.steps,
                       scheduler=request.scheduler, guidance_scale=request.guidance_scale,
                       height=request.height, width=request.width)
        if executor is None or not executor.can_start:
            traj = self.start(request.prompt, **options)
            self.run(traj, plan, on_step)
            return traj
        if not rest:
            raise UserError(f"model {first.model!r} starts trajectories: the plan needs a segment after it")

        def degraded() -> Trajectory:
            traj = self.start(request.prompt, **options)
            self._here(traj, replace(first, model=executor.here or rest[0].model), on_step)
            traj.degraded = True
            self.run(traj, rest, on_step)
            return traj

        try:
            traj = executor.start(request, first)
        except Declined:
            traj = self.start(request.prompt, **options)
            self.run(traj, fit_plan(rest, request.steps), on_step)
            return traj
        except SegmentFailed as failure:
            executor.warn(f"{failure}; running {first.label!r}'s {first.steps} steps here")
            return degraded()
        for k in range(traj.step_index if on_step else 0):
            on_step(first.label, k)
        try:
            self.run(traj, fit_plan(rest, request.steps - traj.step_index), on_step)
        except TrajectoryError as e:
            executor.warn(f"{first.model!r}'s trajectory could not be finished here ({e}); running its "
                          f"{first.steps} steps here")
            return degraded()
        return traj

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
                          getattr(encoder, "context_dim", None) or encoder.model.config.hidden_size,
                          sources=dict(model_sources),
                          scheduler_source=None if schedule is None else first)
