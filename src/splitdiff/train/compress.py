"""`splitdiff compress`: the edge U-Net, pruned from the cloud one and distilled.

Hybrid SD / BK-SDM recipe: structural pruning (train/prune.py: the lowest-resolution
stage, the mid block, one layer in two and the attention at the highest resolution
go; the kept units inherit the most significant teacher units' weights), then
knowledge distillation: denoising loss + output KD + feature KD, weights 1/1/1.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from ..core.registry import load_unet
from ..text import CONTEXT_DIM
from .card import write_card
from .export import export_diffusers, training_record
from .loop import LoopConfig, optimize, run_training, set_cosine_lr
from .prune import inherit, significance
from ..core.devices import resolve_device
from .unet import DenoisingData, autocast, load_caches

KD_WEIGHTS = {"denoise": 1.0, "output": 1.0, "feature": 1.0}


def edge_from_cloud(cloud: UNet2DConditionModel) -> UNet2DConditionModel:
    """The edge architecture: the cloud's first two stages, one layer each, attention only at the lower one."""
    ch = cloud.config.block_out_channels
    return UNet2DConditionModel(
        sample_size=cloud.config.sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(ch[:2]), norm_num_groups=cloud.config.norm_num_groups,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type=None, cross_attention_dim=CONTEXT_DIM, attention_head_dim=cloud.config.attention_head_dim,
    )


class UpBlockFeatures:
    """Collects each up block's output: the feature-KD targets (teacher) and predictions (student)."""

    def __init__(self, unet: UNet2DConditionModel, offset: int = 0):
        self.feats: dict[int, torch.Tensor] = {}
        for i, block in enumerate(unet.up_blocks):
            block.register_forward_hook(lambda m, a, out, i=i + offset: self.feats.__setitem__(i, out))


def compress(run_dir: Path, out: Path, teacher: str = "cloud", steps: int = 4000, batch_size: int = 32,
             lr: float = 5e-4, max_minutes: float | None = None, vae: str = "vae", cache_dir: Path | None = None,
             n64: int = 30000, n128: int = 8000, seed: int = 0, device: str = "auto",
             batch_size_128: int | None = None, quarters_128: int = 1, checkpoint_every: int = 200,
             record: dict | None = None) -> None:
    torch.manual_seed(seed)
    dev = resolve_device(device)
    cloud = load_unet(teacher).to(dev)
    cloud.requires_grad_(False)
    caches = load_caches(cache_dir or run_dir.parent / "latent-cache", vae, n64, n128, dev)
    data = DenoisingData(caches, batch_size, dev, batch_size_128, quarters_128)
    edge = edge_from_cloud(cloud).to(dev)
    pruning = run_dir / "pruning.json"
    if not (run_dir / "checkpoint.safetensors").exists():
        xt, t, _, ctx, mask = data.batch(0, random.Random(seed), torch.Generator().manual_seed(seed))
        scores = significance(cloud, xt, t, ctx, mask)
        mapping = inherit(edge, cloud, scores)
        run_dir.mkdir(parents=True, exist_ok=True)
        pruning.write_text(json.dumps({"significance": scores, "inherited": mapping}, indent=1))
    t_feats = UpBlockFeatures(cloud)
    s_feats = UpBlockFeatures(edge, offset=len(cloud.up_blocks) - len(edge.up_blocks))
    opt = torch.optim.AdamW(edge.parameters(), lr=lr, weight_decay=0.01)

    def step(i: int) -> float:
        rng = random.Random(seed * 1_000_003 + i)
        g = torch.Generator().manual_seed(seed * 7919 + i)
        xt, t, noise, ctx, mask = data.batch(i, rng, g)
        with torch.no_grad(), autocast(dev):
            target = cloud(xt, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample.float()
        set_cosine_lr(opt, i, steps, lr, warmup=200)
        with autocast(dev):
            pred = edge(xt, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample.float()
        w = data.min_snr_weights(t)
        denoise = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * w).mean()
        output_kd = (F.mse_loss(pred, target, reduction="none").mean((1, 2, 3)) * w).mean()
        feature_kd = sum(F.mse_loss(s_feats.feats[k].float(), t_feats.feats[k].float()) for k in s_feats.feats
                         if s_feats.feats[k].shape == t_feats.feats[k].shape)
        loss = (KD_WEIGHTS["denoise"] * denoise + KD_WEIGHTS["output"] * output_kd
                + KD_WEIGHTS["feature"] * feature_kd)
        return optimize(opt, loss, clip=1.0)

    cfg = LoopConfig(run_dir, steps, max_minutes, checkpoint_every=checkpoint_every, ema_decay=0.999, warm_start=out,
                     record=record or {})
    card_facts = {"teacher": _describe_teacher(cloud)}
    run_training(cfg, edge, opt, step,
                 lambda state, model: (export_diffusers(model, out, state),
                                       write_card("edge", out, run_dir, facts=card_facts)),
                 desc="compress")


def _describe_teacher(cloud: UNet2DConditionModel) -> str:
    """The teacher as the edge's card names it: its folder, and its training step when it has a record."""
    folder = Path(cloud.config._name_or_path)
    record = training_record(folder)
    return f"`{folder.name}` at {record['steps']:,} steps" if record else f"`{folder}`"
