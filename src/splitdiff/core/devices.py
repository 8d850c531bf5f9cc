"""Where models run and in what precision: `auto|cpu|cuda[:i]` and `fp32|fp16|bf16`, checked once.

Only the models move. A trajectory's state (latents, schedule, timesteps, generator)
stays float32 on the CPU whatever the model's dtype, so a paused run resumes the same
way on any machine; the runner casts each step's inputs to the model's device and dtype.
"""

from __future__ import annotations

import torch

from ..errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_device(spec: str) -> None:
    """A UserError unless `spec` reads as auto, cpu or cuda[:N] (whether that GPU is here is not asked)."""
    kind, _, index = str(spec).partition(":")
    if spec not in ("auto", "cpu") and (kind != "cuda" or (index and not index.isdigit())):
        raise UserError(f"unknown device {spec!r}; choose auto, cpu or cuda[:N]")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) is the GPU when there is one, else the CPU; a GPU that is not there is refused."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device {spec!r} asked for, but torch sees no GPU here")
    index = spec.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"device {spec!r} asked for, but there are {torch.cuda.device_count()} GPUs")
    return torch.device(spec)


def parse_dtype(spec: str | torch.dtype | None) -> torch.dtype:
    """'fp32' (or None), 'fp16', 'bf16', or a torch dtype among them."""
    if spec is None:
        return torch.float32
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise UserError(f"unsupported dtype {spec}; choose {', '.join(DTYPES)}")
        return spec
    if spec not in DTYPES:
        raise UserError(f"unknown dtype {spec!r}; choose {', '.join(DTYPES)}")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]
