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


def tiny_clip_tokenizer(folder):
    """A CLIP tokenizer over single letters and digits, saved in `folder`: CLIP's real format, built offline."""
    import json
    from pathlib import Path

    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list("abcdefghijklmnopqrstuvwxyz0123456789,.")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(s + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16,
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def tiny_sdxl_unet(seed: int = 0, channels: tuple[int, ...] = (32, 64)) -> UNet2DConditionModel:
    """SDXL's U-Net shape in small: cross-attention to two encoders' states (32 + 32), pooled text and time ids."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
        norm_num_groups=min(32, channels[0]), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
    ).eval()


def tiny_sdxl_folder(path, seed: int = 0, unet_only: bool = False, channels: tuple[int, ...] = (32, 64)):
    """A tiny StableDiffusionXLPipeline saved with save_pretrained (or only its U-Net folder): the layout users have."""
    import tempfile
    from pathlib import Path

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    unet = tiny_sdxl_unet(seed, channels)
    if unet_only:
        unet.save_pretrained(str(path))
        return path
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                            num_attention_heads=4, num_hidden_layers=3, vocab_size=100, projection_dim=32,
                            max_position_embeddings=16)
    torch.manual_seed(seed + 1)
    encoder, encoder_2 = CLIPTextModel(config).eval(), CLIPTextModelWithProjection(config).eval()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = tiny_clip_tokenizer(scratch)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(seed), text_encoder=encoder, text_encoder_2=encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(path))
    return path
