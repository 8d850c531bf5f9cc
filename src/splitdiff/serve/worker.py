"""The worker owns the cloud's models and does exactly what a local hybrid run does.

A prompt becomes a trajectory through `HybridPipeline.start` and steps go through
`core.runner.denoise_step`, so a request served alone gives the same bits as the
same plan run in-process; batched with others it differs only by float rounding.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..core.registry import UNET_NAMES
from ..core.runner import denoise_step, model_fingerprint
from ..core.schedulers import max_steps
from ..core.trajectory import Trajectory, new_trajectory
from ..errors import UserError
from ..hybrid.pipeline import HybridPipeline, latent_factor, load_pipeline
from .order import Order, order_from
from .schemas import TrajectoryRequest


class UnknownModel(UserError):
    """The request names a model this server does not serve."""


def default_vae(model: str) -> str:
    """A pipeline folder's own VAE, else the family's: the cloud needs it only for the latent shape."""
    return str(Path(model)) if (Path(model).expanduser() / "vae" / "config.json").exists() else "vae"


def batch_key(traj: Trajectory) -> tuple:
    """Trajectories with equal keys can share one U-Net call: their tensors stack."""
    return (tuple(traj.latents.shape), tuple(traj.prompt_embeds.shape), traj.latents.dtype,
            traj.prompt_embeds.dtype)


class Worker:
    def __init__(self, name: str, pipe: HybridPipeline, max_steps: int = 500, max_size: int = 256):
        self.name, self.pipe, self.max_steps, self.max_size = name, pipe, max_steps, max_size
        self.unet = pipe.unets[name]
        self.fingerprint = model_fingerprint(self.unet)
        self.factor = latent_factor(pipe.vae)
        self.context_dim = self.unet.config.cross_attention_dim
        self.prompt_length = getattr(pipe.encoder, "max_length", None) or 77

    @classmethod
    def load(cls, model: str, name: str | None = None, vae: str | None = None, device: str | None = None,
             dtype: str | None = None, **limits) -> "Worker":
        """The served model on `device` (default: the CPU) in `dtype` (default: fp32)."""
        from ..core.devices import parse_dtype, resolve_device

        name = name or (model if model in UNET_NAMES else "cloud")
        torch_dtype = parse_dtype(dtype)
        pipe = load_pipeline({name: model}, vae or default_vae(model), torch_dtype)
        return cls(name, pipe.to(resolve_device(device) if device is not None else None), **limits)

    def check(self, req: TrajectoryRequest) -> Order:
        """Refuse, in one line, what this server's model and limits cannot serve; else the request's order."""
        if req.model not in (None, self.name):
            raise UnknownModel(f"unknown model {req.model!r}; this server serves {self.name!r}")
        if req.steps > self.max_steps:
            raise UserError(f"steps {req.steps} exceeds this server's limit of {self.max_steps}")
        schedule_limit = max_steps(self.pipe.noise_schedule, req.scheduler)
        if req.steps > schedule_limit:
            raise UserError(f"steps {req.steps} exceeds what {req.scheduler} spaces properly over this model's "
                            f"noise schedule ({schedule_limit})")
        if req.size > self.max_size:
            raise UserError(f"size {req.size} exceeds this server's limit of {self.max_size}")
        if req.size % self.factor:
            raise UserError(f"size {req.size} is not a multiple of the VAE's factor {self.factor}")
        if req.prompt_embeds is not None and len(req.prompt_embeds[0]) != self.context_dim:
            raise UserError(f"embeddings are {len(req.prompt_embeds[0])} wide; the model takes {self.context_dim}")
        side = req.size // self.factor
        return order_from(req, (self.unet.config.in_channels, side, side), (self.prompt_length, self.context_dim))

    def prefill(self, order: Order) -> Trajectory:
        """The order's trajectory at step 0 (encoding its prompt when it has one)."""
        common = dict(steps=order.steps, scheduler=order.scheduler, seed=order.seed, guidance_scale=order.guidance)
        if order.prompt is not None:
            return self.pipe.start(order.prompt, negative_prompt=order.negative_prompt, size=order.size, **common)
        return new_trajectory(
            order.prompt_embeds, order.negative_embeds, prompt_mask=order.prompt_mask,
            negative_mask=order.negative_mask, negative_prompt=order.negative_prompt,
            latent_shape=order.latent_shape, noise_schedule=self.pipe.noise_schedule, **common)

    def prefill_many(self, orders: list[Order]) -> list[Trajectory | Exception]:
        """Each order's trajectory at step 0, or why it could not start; batched like the steps.

        Orders with prompts that agree on everything but prompt and seed start together, in
        one `start_many` call; a group that fails starts again one order at a time, so that
        only the order at fault gets the error. The text encoder still encodes one prompt per
        pass (and caches it): MiniLM's rows from a batched pass differ in their last bits from
        the prompt's own pass (every row of a batch of 2, here), and a served trajectory must
        equal the local run bit for bit. Encoding a cached prompt costs nothing; a new one
        about 20 ms, against 40 to 400 ms for each of the cloud's steps.
        """
        made: dict[int, Trajectory | Exception] = {}
        groups: dict[tuple, list[int]] = {}
        for i, o in enumerate(orders):
            if o.prompt is None:
                made[i] = self._try(self.prefill, o)
            else:
                groups.setdefault((o.negative_prompt, o.steps, o.scheduler, o.guidance, o.size), []).append(i)
        for (negative, steps, scheduler, guidance, size), members in groups.items():
            try:
                trajs = self.pipe.start_many([orders[i].prompt for i in members], [orders[i].seed for i in members],
                                             negative_prompt=negative, steps=steps, scheduler=scheduler,
                                             guidance_scale=guidance, size=size)
                made.update(zip(members, trajs))
            except Exception:  # noqa: BLE001 - retried one by one, where each order gets its own answer
                made.update({i: self._try(self.prefill, orders[i]) for i in members})
        return [made[i] for i in range(len(orders))]

    @staticmethod
    def _try(fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - the caller answers it to its request
            return e

    def step(self, trajs: list[Trajectory]) -> tuple[float, dict[int, Exception]]:
        """One batched U-Net call for `trajs` (equal `batch_key`s), each at its own step index.

        Returns its seconds and the failures of single trajectories' scheduler steps, by
        index in `trajs`; those trajectories did not advance, the others did.
        """
        start = time.perf_counter()
        failures = denoise_step(self.unet, trajs)
        seconds = time.perf_counter() - start
        for i, t in enumerate(trajs):
            if i not in failures:
                t.record(self.name, 1, seconds, where="cloud", fingerprint=self.fingerprint)
        return seconds, failures
