"""Exporting a trained model as a diffusers folder, and warm-starting from one.

The folder holds fp16 safetensors, the config, and `training.json` (the step and wall
time it was exported at), so that a run whose checkpoint was lost can go on from the
shipped weights at the right step of its schedule.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from ..io import load_tensors

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
TRAINING_FILE = "training.json"


def export_diffusers(model: torch.nn.Module, out: Path, state=None, **config_updates) -> None:
    """save_pretrained in fp16 safetensors, written to a temporary folder then renamed."""
    m = copy.deepcopy(model).half()
    if config_updates:
        m.register_to_config(**config_updates)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    m.save_pretrained(tmp, safe_serialization=True)
    if state is not None:
        (tmp / TRAINING_FILE).write_text(json.dumps({"steps": state.step, **state.extra}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def training_record(folder: Path) -> dict | None:
    """The step and wall time an exported folder was written at, or None for weights from elsewhere."""
    record = Path(folder) / TRAINING_FILE
    return json.loads(record.read_text()) if record.exists() else None


def warm_start(folder: Path, *modules: torch.nn.Module) -> dict | None:
    """Load an exported folder's weights into `modules`; its training record, or None if there is none.

    Weights of another architecture (the trainer's config changed since they were exported)
    are not a starting point: None, and the run starts afresh.
    """
    record = training_record(folder)
    if record is None or not (folder / WEIGHTS_FILE).exists():
        return None
    tensors, _ = load_tensors(folder / WEIGHTS_FILE)
    shapes = {k: tuple(v.shape) for k, v in modules[0].state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in tensors.items()}:
        return None
    for m in modules:
        m.load_state_dict({k: v.float() for k, v in tensors.items()})
    return record
