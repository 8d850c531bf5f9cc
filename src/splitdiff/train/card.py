"""Model cards: a README.md beside each shipped model, written from what training recorded.

Everything on a card is read back from the run (its checkpoint's step and wall time,
its log's last losses), else from the model's own `training.json` (the same facts, and
its `history`: what changed during training, such as a loss introduced part-way), and
from the exported model (config, parameters), so it can be rewritten at any time, also
where the run folder is gone, and never drifts from the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import load_tensors

ABOUT = {
    "vae": ("AutoencoderKL, 4 latent channels, 4x downsampling",
            "world renders: whole 64 px images and 64 px crops of 128 px images; L1 + L2 loss weighted 10x on "
            "objects, KL 1e-6", "splitdiff train vae"),
    "tiny-decoder": ("AutoencoderTiny (TAESD-style) decoder", "distilled from the VAE decoder's outputs on world "
                     "renders (L1 + L2)", "splitdiff train tiny-decoder"),
    "cloud": ("UNet2DConditionModel, cross-attention on MiniLM token states (48 x 384)",
              "cached VAE latents of world renders, 3 steps in 4 at 64 px, 1 in 4 at 128 px; epsilon prediction, "
              "SD scaled_linear schedule, offset noise 0.15, Min-SNR-5 weighting, 10% prompt dropout, EMA 0.999",
              "splitdiff train unet --role cloud"),
    "edge": ("UNet2DConditionModel pruned from the cloud U-Net (first two stages, one layer each, no attention "
             "at the highest resolution, no mid block)",
             "the cloud U-Net's training data (offset noise 0.15); loss = denoising + output KD + feature KD "
             "(1/1/1)",
             "splitdiff compress"),
}


def _run_facts(run_dir: Path) -> dict:
    facts = {}
    ckpt = run_dir / "checkpoint.safetensors"
    if ckpt.exists():
        from safetensors import safe_open

        with safe_open(str(ckpt), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("json", "{}"))
        facts["steps"] = meta.get("step")
        facts["wall_hours"] = round(meta.get("extra", {}).get("wall_seconds", 0.0) / 3600, 2)
    log = run_dir / "train.log"
    if log.exists():
        losses = [json.loads(line.split(" ", 2)[2]) for line in log.read_text().splitlines()
                  if '"loss"' in line]
        if losses:
            facts["last_logged_loss"] = round(losses[-1]["loss"], 5)
    return facts


def _record_facts(model_dir: Path) -> tuple[dict, list[str], dict]:
    """The facts, the history and the validation figures in the model's training.json (written with its weights)."""
    from .export import training_record

    record = training_record(model_dir) or {}
    facts = {"steps": record.get("steps"), "wall_hours": round(record["wall_seconds"] / 3600, 2)
             if "wall_seconds" in record else None, "last_logged_loss": record.get("last_logged_loss")}
    return ({k: v for k, v in facts.items() if v is not None}, list(record.get("history", [])),
            dict(record.get("validation", {})))


def write_card(name: str, model_dir: Path, run_dir: Path, validation: dict | None = None,
               facts: dict | None = None) -> None:
    arch, data, command = ABOUT[name]
    config = json.loads((model_dir / "config.json").read_text())
    params = sum(t.numel() for t in load_tensors(next(model_dir.glob("*.safetensors")))[0].values())
    recorded, history, validated = _record_facts(model_dir)
    facts = {**(facts or {}), **recorded, **_run_facts(run_dir)}
    validation = {**validated, **(validation or {})}
    lines = [
        f"# {name}", "", f"- architecture: {arch} (`{config.get('_class_name')}`)",
        f"- parameters: {params:,}", "- weights: fp16 safetensors, diffusers format",
        f"- data: {data}", f"- trained with: `{command}` (resumable; run folder `{run_dir}`)",
    ]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in facts.items()]
    if history:
        lines += ["", "## History", ""] + [f"- {event}" for event in history]
    if validation:
        lines += ["", "## Validation", ""] + [f"- {k}: {v}" for k, v in validation.items()]
    lines += ["", "## Config", "", "```json", json.dumps(config, indent=1, sort_keys=True), "```", ""]
    (model_dir / "README.md").write_text("\n".join(lines))
