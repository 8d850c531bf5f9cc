"""Structural pruning of a U-Net, as BK-SDM and Hybrid SD make their small models.

Each residual unit of the teacher (a ResnetBlock2D or a Transformer2DModel whose
output has its input's shape) gets a significance score: how much the mean and std of
the predicted noise move when that unit is bypassed. The student is a smaller diffusers
U-Net (fewer stages, fewer layers per stage, no attention where it costs most); each of
its units inherits the weights of the most significant teacher unit of the same kind,
at the same resolution, whose parameter shapes match. The rest is left to distillation.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from diffusers import UNet2DConditionModel

UNIT_KINDS = ("resnets", "attentions", "downsamplers", "upsamplers")


def units(unet: UNet2DConditionModel) -> dict[str, torch.nn.Module]:
    """'down_blocks.0.resnets.1' -> module, for every prunable unit."""
    out = {}
    for side in ("down_blocks", "up_blocks"):
        for b, block in enumerate(getattr(unet, side)):
            for kind in UNIT_KINDS:
                for i, m in enumerate(getattr(block, kind, None) or []):
                    out[f"{side}.{b}.{kind}.{i}"] = m
    return out


@torch.no_grad()
def significance(unet: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                 mask: torch.Tensor | None = None) -> dict[str, float]:
    """|Δ mean| + |Δ std| of the predicted noise with each bypassable unit removed."""
    def predict():
        return unet(x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample

    base = predict()
    scores = {}
    for name, module in units(unet).items():
        if name.split(".")[2] not in ("resnets", "attentions"):
            continue

        def bypass(mod, args, kwargs, output):
            inp = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
            out = output[0] if isinstance(output, tuple) else output
            if inp is None or not torch.is_tensor(out) or inp.shape != out.shape:
                raise _NotBypassable
            return (inp,) if isinstance(output, tuple) else inp

        handle = module.register_forward_hook(bypass, with_kwargs=True)
        try:
            pred = predict()
            scores[name] = float((pred.mean() - base.mean()).abs() + (pred.std() - base.std()).abs())
        except _NotBypassable:
            scores[name] = float("inf")
        finally:
            handle.remove()
    return scores


class _NotBypassable(Exception):
    pass


def _stage_key(name: str, n_blocks: int, n_teacher_blocks: int) -> tuple[str, int, str]:
    side, b, kind, _ = name.split(".")
    b = int(b)
    if side == "up_blocks":  # up blocks are aligned from the output end
        b += n_teacher_blocks - n_blocks
    return side, b, kind


def inherit(student: UNet2DConditionModel, teacher: UNet2DConditionModel, scores: dict[str, float]) -> dict[str, str]:
    """Copy teacher weights into the student, unit by unit; return student unit -> teacher unit."""
    shared = {k: v for k, v in teacher.state_dict().items() if not k.startswith(("down_blocks", "up_blocks",
                                                                                   "mid_block"))}
    own = student.state_dict()
    student.load_state_dict({k: shared[k] if k in shared and shared[k].shape == v.shape else v
                             for k, v in own.items()})
    if student.mid_block is not None and teacher.mid_block is not None:
        _copy_if_same(student.mid_block, teacher.mid_block)

    by_stage: dict[tuple, list[str]] = defaultdict(list)
    tu = units(teacher)
    n_t_down, n_t_up = len(teacher.down_blocks), len(teacher.up_blocks)
    for name in tu:
        by_stage[_stage_key(name, n_t_up if name.startswith("up") else n_t_down, n_t_down)].append(name)
    for names in by_stage.values():  # most significant first
        names.sort(key=lambda n: -scores.get(n, float("inf")))

    mapping, used = {}, set()
    n_s = len(student.up_blocks)
    for name, module in units(student).items():
        key = _stage_key(name, n_s, n_t_up)
        for cand in by_stage.get(key, []):
            if cand not in used and _copy_if_same(module, tu[cand]):
                mapping[name] = cand
                used.add(cand)
                break
    return mapping


def _copy_if_same(dst: torch.nn.Module, src: torch.nn.Module) -> bool:
    d, s = dst.state_dict(), src.state_dict()
    if d.keys() != s.keys() or any(d[k].shape != s[k].shape for k in d):
        return False
    dst.load_state_dict(s)
    return True
