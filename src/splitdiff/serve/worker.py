"""The worker owns the cloud's models and does exactly what a local hybrid run does.

A prompt becomes a trajectory through `HybridPipeline.start` and steps go through
`core.runner.denoise_step`, so a request served alone gives the same bits as the
same plan run in-process; batched with others it differs only by float rounding.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..core.registry import UNET_NAMES
from ..core.runner import denoise_step
from ..core.trajectory import Trajectory, new_trajectory
from ..errors import UserError
from ..hybrid.pipeline import HybridPipeline, latent_factor, load_pipeline
from .schemas import TrajectoryRequest


class UnknownModel(UserError):
    """The request names a model this server does not serve."""


def default_vae(model: str) -> str:
    """A pipeline folder's own VAE, else the family's: the cloud needs it only for the latent shape."""
    return str(Path(model)) if (Path(model).expanduser() / "vae" / "config.json").exists() else "vae"


class Worker:
    def __init__(self, name: str, pipe: HybridPipeline, max_steps: int = 1000, max_size: int = 256):
        self.name, self.pipe, self.max_steps, self.max_size = name, pipe, max_steps, max_size
        self.unet = pipe.unets[name]
        self.factor = latent_factor(pipe.vae)
        self.context_dim = self.unet.config.cross_attention_dim

    @classmethod
    def load(cls, model: str, name: str | None = None, vae: str | None = None, **limits) -> "Worker":
        name = name or (model if model in UNET_NAMES else "cloud")
        return cls(name, load_pipeline({name: model}, vae or default_vae(model)), **limits)

    def check(self, req: TrajectoryRequest) -> None:
        """Refuse, in one line, what this server's model and limits cannot serve."""
        if req.model not in (None, self.name):
            raise UnknownModel(f"unknown model {req.model!r}; this server serves {self.name!r}")
        if req.steps > self.max_steps:
            raise UserError(f"steps {req.steps} exceeds this server's limit of {self.max_steps}")
        if req.size > self.max_size:
            raise UserError(f"size {req.size} exceeds this server's limit of {self.max_size}")
        if req.size % self.factor:
            raise UserError(f"size {req.size} is not a multiple of the VAE's factor {self.factor}")
        if req.prompt_embeds is not None and len(req.prompt_embeds[0]) != self.context_dim:
            raise UserError(f"embeddings are {len(req.prompt_embeds[0])} wide; the model takes {self.context_dim}")

    def prefill(self, req: TrajectoryRequest) -> Trajectory:
        """The request's trajectory at step 0 (encoding its prompt when it has one)."""
        common = dict(steps=req.steps, scheduler=req.scheduler, seed=req.seed, guidance_scale=req.guidance)
        if req.prompt is not None:
            return self.pipe.start(req.prompt, negative_prompt=req.negative_prompt, size=req.size, **common)
        side = req.size // self.factor

        def tensor(rows, dtype=torch.float32):
            return None if rows is None else torch.tensor(rows, dtype=dtype)

        return new_trajectory(
            tensor(req.prompt_embeds), tensor(req.negative_embeds), prompt_mask=tensor(req.prompt_mask, torch.long),
            negative_mask=tensor(req.negative_mask, torch.long), negative_prompt=req.negative_prompt,
            latent_shape=(self.unet.config.in_channels, side, side), noise_schedule=self.pipe.noise_schedule, **common)

    def step(self, trajs: list[Trajectory]) -> float:
        """One batched U-Net call for all `trajs`, each at its own step index; returns its seconds."""
        start = time.perf_counter()
        denoise_step(self.unet, trajs)
        seconds = time.perf_counter() - start
        for t in trajs:
            t.record(self.name, 1, seconds, where="cloud")
        return seconds
