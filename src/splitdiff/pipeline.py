"""The library's face: one pipeline object, loaded and called the way diffusers' pipelines are.

    from splitdiff import SplitPipeline

    pipe = SplitPipeline.from_pretrained({"cloud": "cloud", "edge": "edge"})
    out = pipe("a large red circle at the top left, on a navy background", plan="cloud:10,edge:15")
    out.images[0].save("circle.png")

It composes what the axes build (the time axis' HybridPipeline, the users axis'
adapters) and adds nothing to the denoising loop: every step still runs through the
core's one runner, so what it makes is what `splitdiff generate` makes, bit for bit.
`start`, `run` and `decode` give mid-flight control: a trajectory can be paused after
any segment, sent elsewhere (`Trajectory.to_bytes`), forked, and finished by any model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .core.plan import Plan, check_plan, format_plan, parse_plan, plan_steps
from .core.trajectory import Trajectory
from .errors import UserError

OnStep = Callable[[str, int], None]  # (segment label, step within the segment)


@dataclass
class SplitOutput:
    images: list  # PIL images, one per prompt
    trajectories: list[Trajectory]  # finished; their provenance says which model ran which steps


class SplitPipeline:
    """U-Nets by plan name, one VAE and one text encoder; plans say which U-Net runs which steps."""

    def __init__(self, hybrid):
        self.hybrid = hybrid  # hybrid.pipeline.HybridPipeline: the models and the plan runner

    @classmethod
    def from_pretrained(cls, models: Mapping[str, str] | Sequence[str] = ("cloud", "edge"), vae: str | None = None,
                        decoder: str = "full", users: str | Path | None = None, *,
                        torch_dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                        variant: str | None = None, text_encoder: str | None = None) -> "SplitPipeline":
        """Load U-Nets by plan name: {"cloud": "cloud", "edge": "/path/to/unet-or-pipeline-folder"}.

        A value is a name of the embedded family or a diffusers folder; a sequence of names
        loads those names as they are. `vae` names the VAE (default: a pipeline folder's
        own, else the family's; `decoder="tiny"` takes the family's tiny decoder). `users`
        is the folder of users' adapters that plans like `edge@ana:10` look up (default:
        $SPLITDIFF_USERS, else the shipped ones). `torch_dtype` (fp32, fp16, bf16) and
        `device` (cpu, cuda[:N], auto) place the U-Nets and the decoder; `variant="fp16"`
        loads fp16-variant weight files (found by themselves when a folder has no others);
        `text_encoder` names a folder with text_encoder/ and tokenizer/ for bare U-Net folders.
        """
        from .core.devices import parse_dtype, resolve_device
        from .core.registry import resolve
        from .hybrid.pipeline import load_pipeline
        from .users.plans import AdapterSet

        specs = dict(models) if isinstance(models, Mapping) else {name: name for name in models}
        if not specs:
            raise UserError("from_pretrained needs at least one model")
        sources = {name: resolve(name, specs) for name in specs}
        if decoder not in ("full", "tiny"):
            raise UserError(f"decoder must be full or tiny, not {decoder!r}")
        if vae is None:  # the tiny decoder when asked for; else a pipeline folder's own VAE, else the family's
            first = Path(next(iter(sources.values())))
            vae = "tiny-decoder" if decoder == "tiny" else str(first) if (first / "vae" / "config.json").exists() \
                else "vae"
        dtype = parse_dtype(torch_dtype)
        place = resolve_device(device) if device is not None else None
        hybrid = load_pipeline(sources, vae, dtype, variant, text_encoder)
        hybrid.adapters = AdapterSet(Path(users) if users is not None else None)
        return cls(hybrid).to(place)

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> "SplitPipeline":
        """Move the U-Nets and the decoder, diffusers-style; trajectories stay float32 on the CPU."""
        from .core.devices import parse_dtype, resolve_device

        self.hybrid.to(resolve_device(device) if device is not None else None,
                       parse_dtype(dtype) if dtype is not None else None)
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self.hybrid.unets.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.hybrid.unets.values())).dtype

    @property
    def models(self) -> list[str]:
        return list(self.hybrid.unets)

    @property
    def executors(self) -> dict:
        """Model name -> where its segments run instead of here (core.segments.Executor): patch-parallel
        ranks, a cloud server. Failed segments run here and the result is marked degraded."""
        return self.hybrid.executors

    def plan(self, plan: str | Plan | None, steps: int, step_index: int = 0, pause: bool = False) -> Plan:
        """A plan string or segments, checked against the steps; None runs every step on the first model.

        With `pause`, the plan may stop short of the last step (the trajectory waits there).
        """
        if plan is None:
            plan = f"{self.models[0]}:{steps - step_index}"
        parsed = parse_plan(plan) if isinstance(plan, str) else tuple(plan)
        if pause:
            if plan_steps(parsed) > steps - step_index:
                raise UserError(f"plan {format_plan(parsed)} runs {plan_steps(parsed)} steps but only "
                                f"{steps - step_index} remain")
        else:
            check_plan(parsed, steps, step_index)
        for seg in parsed:
            if seg.adapter is not None:
                self.hybrid.adapters.resolve(seg.adapter)  # a missing adapter is refused before any work
        return parsed

    def start(self, prompt: str | Sequence[str], *, seed: int | Sequence[int] = 0, negative_prompt: str = "",
              steps: int = 25, scheduler: str = "dpmsolver++", guidance_scale: float = 5.0,
              size: int | None = None, height: int | None = None, width: int | None = None) -> list[Trajectory]:
        """Trajectories at step 0, one per prompt; `seed` is one per prompt, or a first seed counted up.

        `height` and `width` in pixels default to `size` (default 64); `scheduler="folder"`
        runs a pipeline folder's own scheduler with all its settings.
        """
        prompts, seeds = _prompts_and_seeds(prompt, seed)
        return self.hybrid.start_many(prompts, seeds, negative_prompt=negative_prompt, steps=steps,
                                      scheduler=scheduler, guidance_scale=guidance_scale, size=size, height=height,
                                      width=width)

    def check(self, traj: Trajectory, plan: str | Plan | None = None, pause: bool = False) -> Plan:
        """The plan, parsed, once it is sure to fit `traj` and these models (else a one-line error, before any step)."""
        parsed = self.plan(plan, traj.num_steps, traj.step_index, pause)
        self.hybrid.check(traj, parsed)
        return parsed

    def run(self, traj: Trajectory, plan: str | Plan | None = None, on_step: OnStep | None = None,
            pause: bool = False) -> Trajectory:
        """Run the plan's segments on `traj` from where it stands (None: the rest on the first model).

        With `pause` the plan may end early: `pipe.run(traj, "cloud:10", pause=True)`, then
        `traj.to_bytes()` to send it, and any pipeline with a fitting model finishes it.
        """
        parsed = self.check(traj, plan, pause)
        for seg in parsed:
            self.hybrid.run_segment(traj, seg, on_step)
        return traj

    def decode(self, traj: Trajectory):
        """The finished trajectory's image (PIL)."""
        return self.hybrid.decode(traj)

    def __call__(self, prompt: str | Sequence[str], plan: str | Plan | None = None, *, steps: int = 25,
                 scheduler: str = "dpmsolver++", seed: int | Sequence[int] = 0, guidance_scale: float = 5.0,
                 negative_prompt: str = "", size: int | None = None, height: int | None = None,
                 width: int | None = None, on_step: OnStep | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 callback_on_step_end: Callable | None = None) -> SplitOutput:
        """Generate one image per prompt with the plan; the trajectories come back with them.

        As in diffusers: `generator` (fresh CPU generators in place of `seed`: one per prompt,
        or one whose seed is counted up like `seed`'s), and `callback_on_step_end(pipe, step, timestep, {"latents": ...})`
        after each step run here, whose returned "latents", if any, replace the trajectory's.
        """
        parsed = self.plan(plan, steps)
        if generator is not None:
            seed = _seeds_of(generator)
        first = self.executors.get(parsed[0].model)
        if first is not None and first.can_start:  # e.g. a cloud: it encodes the prompts and runs the first steps
            from .core.segments import StartRequest

            if callback_on_step_end is not None:
                raise UserError(f"callback_on_step_end needs every step here, and {parsed[0].model!r} starts "
                                f"trajectories elsewhere")

            h, w = self.hybrid.sides(size, height, width)
            trajs = [self.hybrid.run_request(StartRequest(p, negative_prompt, s, steps, scheduler, guidance_scale, h, w),
                                             parsed, on_step) for p, s in zip(*_prompts_and_seeds(prompt, seed))]
        else:
            trajs = self.start(prompt, seed=seed, negative_prompt=negative_prompt, steps=steps, scheduler=scheduler,
                               guidance_scale=guidance_scale, size=size, height=height, width=width)
            for traj in trajs:
                self.run(traj, parsed, on_step if callback_on_step_end is None else
                         self._with_callback(traj, on_step, callback_on_step_end))
        return SplitOutput([self.decode(t) for t in trajs], trajs)

    def _with_callback(self, traj: Trajectory, on_step: OnStep | None, callback: Callable) -> OnStep:
        def step_done(label: str, k: int) -> None:
            if on_step is not None:
                on_step(label, k)
            done = traj.step_index - 1
            out = callback(self, done, traj.scheduler.timesteps[done], {"latents": traj.latents}) or {}
            if "latents" in out:
                traj.latents = out["latents"].detach().to("cpu", torch.float32).reshape(traj.latents.shape)
        return step_done


def _prompts_and_seeds(prompt: str | Sequence[str], seed: int | Sequence[int]) -> tuple[list[str], list[int]]:
    """One seed per prompt: given so, or a first seed counted up."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    seeds = list(seed) if isinstance(seed, Sequence) else [seed + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise UserError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    return prompts, seeds


def _seeds_of(generator: torch.Generator | Sequence[torch.Generator]) -> int | list[int]:
    """The seeds fresh CPU generators were made with: a trajectory carries its noise as a seed and a state."""
    many = not isinstance(generator, torch.Generator)
    seeds = []
    for g in (generator if many else [generator]):
        if g.device.type != "cpu":
            raise UserError(f"a generator on {g.device} draws other numbers: splitdiff draws its noise on the CPU, "
                            f"so pass a CPU generator or seed=")
        seed = g.initial_seed()
        if not torch.equal(g.get_state(), torch.Generator().manual_seed(seed).get_state()):
            raise UserError("a generator that has drawn numbers cannot start a trajectory: pass a fresh one "
                            "(torch.Generator().manual_seed(n)) or seed=n")
        seeds.append(seed)
    return seeds if many else seeds[0]
