"""The one training loop every `splitdiff train ...` command runs.

Resumable from its last checkpoint, a progress bar with loss and ETA, a log file,
`--max-minutes`, and a clean stop on Ctrl-C or SIGTERM (it saves before leaving).
A trainer only supplies `step(i) -> loss` and the modules to checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .checkpoint import load_checkpoint, save_checkpoint


@dataclass
class LoopConfig:
    run_dir: Path
    total_steps: int
    max_minutes: float | None = None
    checkpoint_every: int = 200
    ema_decay: float | None = None
    log_every: int = 20
    warm_start: Path | None = None  # an exported folder to go on from when the checkpoint is lost
    record: dict = field(default_factory=dict)  # kept in every checkpoint and training.json: what the run is made from


@dataclass
class TrainState:
    step: int = 0
    extra: dict = field(default_factory=dict)


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


class Ema:
    """diffusers' EMAModel, averaging straight into a frozen copy of the model (checkpointed and exported).

    EMAModel's decay with warm-up: min(decay, (1 + step) / (10 + step)), 0 at the first step.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module, self.decay = make_ema(model), decay
        self.resume(0)

    def resume(self, step: int) -> None:
        """Average on from `step` into the module's present weights (just loaded from a checkpoint)."""
        from diffusers.training_utils import EMAModel

        self.tracker = EMAModel(self.module.parameters(), decay=self.decay, foreach=True)
        self.tracker.shadow_params = list(self.module.parameters())  # in place: no second copy to keep in sync
        self.tracker.optimization_step = step

    def update(self, model: torch.nn.Module) -> None:
        self.tracker.step(model.parameters())
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)


def _logger(run_dir: Path) -> logging.Logger:
    log = logging.getLogger(f"splitdiff.train.{run_dir}")
    if not log.handlers:
        log.setLevel(logging.INFO)
        h = logging.FileHandler(run_dir / "train.log")
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(h)
    return log


def run_training(cfg: LoopConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 step_fn: Callable[[int], torch.Tensor | float], on_checkpoint: Callable[[TrainState, torch.nn.Module], None] | None = None,
                 desc: str = "train") -> TrainState:
    """Run `step_fn` until total_steps, the time limit or a signal; return the final state.

    The checkpoint is `run_dir/checkpoint.safetensors`; `on_checkpoint(state, model_to_ship)`
    is called after each save (the EMA when kept) so trainers can export weights.
    """
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = cfg.run_dir / "checkpoint.safetensors"
    log = _logger(cfg.run_dir)
    averaged = Ema(model, cfg.ema_decay) if cfg.ema_decay else None
    ema = averaged.module if averaged else None
    state = TrainState()
    if ckpt.exists():
        state.step, state.extra = load_checkpoint(ckpt, model, optimizer, ema)
        log.info("resumed at step %d", state.step)
    elif cfg.warm_start is not None:
        from .export import warm_start

        record = warm_start(cfg.warm_start, *[m for m in (model, ema) if m is not None])
        if record:
            state.step = int(record.pop("steps"))
            state.extra = record
            log.info("no checkpoint: warm start from %s at step %d (fresh optimizer state)", cfg.warm_start,
                     state.step)
    if averaged:
        averaged.resume(state.step)
    state.extra.update(cfg.record)
    stop = {"why": None}

    def _on_signal(signum, _frame):
        stop["why"] = signal.Signals(signum).name

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    start = time.monotonic()
    elapsed_before = float(state.extra.get("wall_seconds", 0.0))

    def _save():
        state.extra["wall_seconds"] = elapsed_before + time.monotonic() - start
        save_checkpoint(ckpt, state.step, model, optimizer, ema, state.extra)
        if on_checkpoint:
            on_checkpoint(state, ema if ema is not None else model)
        log.info("checkpoint at step %d", state.step)

    bar = tqdm(total=cfg.total_steps, initial=state.step, desc=desc, dynamic_ncols=True)
    losses: list[float] = []
    try:
        while state.step < cfg.total_steps:
            if stop["why"]:
                log.info("stopping on %s", stop["why"])
                break
            if cfg.max_minutes is not None and time.monotonic() - start > cfg.max_minutes * 60:
                log.info("stopping: --max-minutes %.1f reached", cfg.max_minutes)
                break
            model.train()
            losses.append(step_fn(state.step))  # a tensor stays on its device: no wait for the GPU each step
            if averaged:
                averaged.update(model)
            state.step += 1
            bar.update(1)
            if state.step % cfg.log_every == 0:
                mean = float(sum(torch.as_tensor(x, dtype=torch.float32) for x in losses)) / len(losses)
                bar.set_postfix(loss=f"{mean:.4f}")
                log.info(json.dumps({"step": state.step, "loss": mean}))
                state.extra["last_logged_loss"] = round(mean, 5)
                losses.clear()
            if state.step % cfg.checkpoint_every == 0 and state.step < cfg.total_steps:
                _save()  # the last step's checkpoint is the one below
        _save()
    finally:
        bar.close()
        for s, h in old.items():
            signal.signal(s, h)
    return state


def set_cosine_lr(optimizer: torch.optim.Optimizer, step: int, total: int, base_lr: float,
                  warmup: int = 100, floor: float = 0.05) -> None:
    """Warm-up then cosine decay, a pure function of the step (so resuming needs no state)."""
    import math

    if step < warmup:
        lr = base_lr * (step + 1) / warmup
    else:
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        lr = base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimize(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """One optimizer step on `loss` (gradients clipped to norm `clip` when given); the loss, detached."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    return loss.detach()
