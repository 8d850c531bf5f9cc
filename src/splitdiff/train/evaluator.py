"""`splitdiff train evaluator`: the recognizer on augmented renders at mixed resolutions."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..eval.augment import augment
from ..eval.metrics import WEIGHTS
from ..eval.recognizer import INPUT_SIZE, Recognizer, recognition_loss, scene_targets
from ..io import save_tensors
from ..world import render_images, sample_scene
from .loop import LoopConfig, optimize, run_training, set_cosine_lr


def _batch(rng: random.Random, batch_size: int):
    scenes = [sample_scene(rng) for _ in range(batch_size)]
    size = rng.choice([48, 64, 64, 96, 128])
    x = Recognizer.prepare(render_images(scenes, size, rng))
    return x, scene_targets(scenes)


def train_evaluator(run_dir: Path, steps: int = 4000, batch_size: int = 64, lr: float = 2e-3,
                    max_minutes: float | None = None, out: Path = WEIGHTS, seed: int = 0,
                    checkpoint_every: int = 250) -> None:
    torch.manual_seed(seed)
    model = Recognizer()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

    def step(i: int) -> float:
        rng = random.Random(seed * 1_000_003 + i)  # data depends only on the step: resumable
        g = torch.Generator().manual_seed(seed * 7919 + i)
        x, targets = _batch(rng, batch_size)
        x = augment(x, g, strength=float(rng.random() < 0.8))
        set_cosine_lr(opt, i, steps, lr)
        loss = recognition_loss(model(x), targets)
        return optimize(opt, loss)

    def export(state, m):
        save_tensors(out, {k: v.half() for k, v in m.state_dict().items()},
                     {"config": {}, "step": state.step, "input_size": INPUT_SIZE})

    run_training(LoopConfig(run_dir, steps, max_minutes, checkpoint_every=checkpoint_every), model, opt, step, export,
                 desc="evaluator")
