"""What the engine keeps of a trajectory request: its scalars, and its embeddings as tensors.

JSON numbers parsed into Python lists take about 32 bytes each; as float32 tensors
they take 4. A request becomes an order as soon as it is checked, so queued work
holds only tensors, and what it holds is known to the queue's memory budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .schemas import TrajectoryRequest

# Besides its embeddings, a running trajectory holds its latents several times over: the
# latents, the scaled model input (twice with guidance), the noise prediction and the
# scheduler's history (DPM-Solver++ keeps two model outputs). Eight copies bound them all.
LATENT_COPIES = 8
FLOAT_BYTES = 4


@dataclass(eq=False)
class Order:
    model: str | None
    prompt: str | None
    negative_prompt: str
    seed: int
    steps: int
    cloud_steps: int
    scheduler: str
    guidance: float
    size: int
    half: bool
    latent_shape: tuple[int, int, int]  # C x h x w
    context_shape: tuple[int, int]  # L x D of one embedding
    prompt_embeds: torch.Tensor | None = None
    negative_embeds: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """The memory this order's work holds while it waits and runs (an upper bound)."""
        c, h, w = self.latent_shape
        length, width = self.context_shape
        return FLOAT_BYTES * (2 * length * width + LATENT_COPIES * c * h * w)

    def release(self) -> None:
        """Drop the tensors (the work was cancelled or has become a trajectory)."""
        self.prompt_embeds = self.negative_embeds = self.prompt_mask = self.negative_mask = None


def order_from(req: TrajectoryRequest, latent_shape: tuple[int, int, int], prompt_context: tuple[int, int]) -> Order:
    """The request as an order; refuses embeddings that are finite in JSON but not in float32 (1e39)."""

    def tensor(name: str, dtype=torch.float32) -> torch.Tensor | None:
        rows = getattr(req, name)
        if rows is None:
            return None
        t = torch.tensor(rows, dtype=dtype)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{name} holds values beyond float32's range")
        return t

    prompt_embeds = tensor("prompt_embeds")
    return Order(
        model=req.model, prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed, steps=req.steps,
        cloud_steps=req.cloud_steps, scheduler=req.scheduler, guidance=req.guidance, size=req.size, half=req.half,
        latent_shape=latent_shape,
        context_shape=prompt_context if prompt_embeds is None else tuple(prompt_embeds.shape),
        prompt_embeds=prompt_embeds, negative_embeds=tensor("negative_embeds"),
        prompt_mask=tensor("prompt_mask", torch.long), negative_mask=tensor("negative_mask", torch.long),
    )
