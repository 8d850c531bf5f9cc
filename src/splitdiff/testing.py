"""Tiny random diffusers models built from configs: the test suite's fixtures, and stand-ins for smoke runs (`--tiny`)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

from .text import CONTEXT_DIM


def tiny_unet(seed: int = 0, channels: tuple[int, ...] = (32, 64), cross_attention_dim: int = CONTEXT_DIM,
              sample_size: int = 16) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=channels, norm_num_groups=min(32, channels[0]),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8,
    ).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """4 latent channels, 4x downsampling, like the embedded VAE."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, sample_size=64,
    ).eval()


def tiny_decoder(seed: int = 0) -> AutoencoderTiny:
    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4,
    ).eval()
