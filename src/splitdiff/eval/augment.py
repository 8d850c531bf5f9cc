"""Augmentations that make clean renders look like generated images.

Generated images are slightly blurred, noisy, colour-shifted and warped; the
recognizer must read them as well as clean renders, so it trains on all of these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    k = 7
    r = torch.arange(k, dtype=x.dtype) - k // 2
    w = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    w = w / w.sum(1, keepdim=True)  # B x k
    b, c, h, wd = x.shape
    xs = x.reshape(1, b * c, h, wd)
    kh = w.repeat_interleave(c, 0)[:, None, :, None]
    kw = w.repeat_interleave(c, 0)[:, None, None, :]
    xs = F.conv2d(F.pad(xs, (0, 0, k // 2, k // 2), mode="replicate"), kh, groups=b * c)
    xs = F.conv2d(F.pad(xs, (k // 2, k // 2, 0, 0), mode="replicate"), kw, groups=b * c)
    return xs.reshape(b, c, h, wd)


def augment(x: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random blur, warp, colour shift and noise, per image; x in [-1, 1]."""
    b = x.shape[0]
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    # slight affine warp
    angle = (u(b) - 0.5) * 0.10 * strength
    scale = 1 + (u(b) - 0.5) * 0.06 * strength
    shift = (u(b, 2) - 0.5) * 0.04 * strength
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    # blur on about half the images
    sigma = u(b) * 1.3 * strength * (u(b) < 0.6)
    x = _gaussian_blur(x, sigma)
    # colour shift: per-channel gain and offset
    x = x * (1 + (u(b, 3, 1, 1) - 0.5) * 0.16 * strength) + (u(b, 3, 1, 1) - 0.5) * 0.14 * strength
    # pixel noise and smooth low-frequency blotches
    x = x + torch.randn(x.shape, generator=g) * (u(b, 1, 1, 1) * 0.10 * strength)
    blot = F.interpolate(torch.randn(b, 3, 4, 4, generator=g), size=x.shape[-2:], mode="bilinear", align_corners=False)
    x = x + blot * (u(b, 1, 1, 1) * 0.06 * strength)
    return x.clamp(-1, 1)
