"""`splitdiff train planner`: the PER-DQN on episodes drawn from the paper's scenario family.

Each update first advances a few parallel episodes by one decision (epsilon-greedy), then
learns from a prioritized batch. Every episode is a fresh scenario: N users (N_MAX half the
time, else 2..N_MAX-1), either transmission form, either latency model. Resumable through
the common training loop; the replay memory is not checkpointed (it is hundreds of MB), so
a resumed run refills it before learning again. At each checkpoint the online network is
scored on a fixed validation set at N = N_MAX (the share of the exact solver's improvement
over all-local) and exported when it beats the best so far.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...io import atomic_write_bytes, save_tensors
from . import exact
from .dqn import (N_MAX, OBS, WEIGHTS_DIR, WEIGHTS_FILE, Episode, PrioritizedReplay, QNet, dqn_loss, rollout,
                  training_record)
from .families import paper_scenario
from .latency import gains
from .scenario import Instance


def draw_instance(rng: np.random.Generator) -> Instance:
    N = N_MAX if rng.random() < 0.5 else int(rng.integers(2, N_MAX))
    latency = "shrinking-batch" if rng.random() < 0.5 else "constant-batch"
    transmission = "paper-code" if rng.random() < 0.5 else "sound"
    return Instance.of(paper_scenario(N, rng, latency=latency, transmission=transmission))


def validation_set(n: int = 200, seed: int = 20_250, N: int = N_MAX) -> list[tuple[Instance, float, float]]:
    """(instance, all-local objective, exact objective): half per transmission form, the paper's latency model."""
    out = []
    rng = np.random.default_rng(seed)
    for k in range(n):
        inst = Instance.of(paper_scenario(N, rng, transmission="paper-code" if k % 2 else "sound"))
        out.append((inst, gains(inst).base, exact.solve(inst)[1]["value"]))
    return out


def share(net, val: list[tuple[Instance, float, float]]) -> float:
    """Mean share of exact's improvement over all-local that the greedy policy reaches."""
    results = rollout(net, [v[0] for v in val])
    shares = [(u - base) / (best - base) for (_, base, best), (_, u) in zip(val, results) if best - base > 1e-9]
    return float(np.mean(shares))


def export(net: QNet, out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / WEIGHTS_FILE, {k: v.detach().float().contiguous() for k, v in net.state_dict().items()},
                 {"record": record})
    atomic_write_bytes(out / "training.json", (json.dumps(record, indent=1) + "\n").encode())
    write_card(out, record, sum(p.numel() for p in net.parameters()))


def write_card(out: Path, record: dict, params: int) -> None:
    """The model card, from the training record alone (rewritten with every export)."""
    lines = [
        "# planner (PER-DQN)", "",
        f"- architecture: MLP {OBS}-256-256-256-2 (`splitdiff.users.planner.dqn.QNet`), {params:,} parameters, "
        "fp32 safetensors",
        f"- decides grant / deny for up to {N_MAX} users visited in request order; granted users' splits come "
        "from the exact per-set solver",
        "- data: episodes drawn from the paper's scenario family (N_MAX half the time, else 2..N_MAX-1; both "
        "transmission forms; both latency models)",
        "- trained with: `splitdiff train planner` (resumable; run folder `runs/planner`)",
    ]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in record.items()]
    lines += ["", f"validation share: the mean, over {record.get('validation_scenarios')} fixed scenarios at "
              f"N = {record.get('validation_N')} (constant batch, half per transmission form), of the greedy "
              "policy's improvement over all-local as a share of the exact optimum's.", ""]
    atomic_write_bytes(out / "README.md", "\n".join(lines).encode())


def train_planner(run_dir: Path, out: Path = WEIGHTS_DIR, steps: int = 200_000, max_minutes: float | None = None,
                  seed: int = 0, envs: int = 16, batch_size: int = 128, lr: float = 2.5e-4,
                  replay_size: int = 200_000, target_every: int = 1000, explore_steps: int | None = None,
                  warmup: int = 2_000, checkpoint_every: int = 2_000, val_size: int = 200, threads: int = 1) -> float:
    """Train (or go on training) and return the best validation share reached.

    One thread by default: the network is small, and more threads only wait on each other.
    """
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(run_dir, out, steps, max_minutes, seed, envs, batch_size, lr, replay_size, target_every,
                      explore_steps, warmup, checkpoint_every, val_size)
    finally:
        torch.set_num_threads(threads_before)


def _train(run_dir, out, steps, max_minutes, seed, envs, batch_size, lr, replay_size, target_every, explore_steps,
           warmup, checkpoint_every, val_size) -> float:
    from ...train.loop import LoopConfig, optimize, run_training

    torch.manual_seed(seed)
    net, target = QNet(), QNet()
    target.load_state_dict(net.state_dict())
    model = nn.ModuleDict({"online": net, "target": target})
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    replay = PrioritizedReplay(replay_size, seed=seed)
    explore_steps = explore_steps or max(1, steps // 5)
    val = validation_set(val_size)
    run: dict = {}

    def epsilon(i: int) -> float:
        return max(0.05, 1.0 - 0.95 * i / explore_steps)

    def advance(eps: float) -> None:
        rng, live = run["rng"], run["envs"]
        obs = np.stack([e.observe() for e in live])
        with torch.no_grad():
            greedy = net(torch.from_numpy(obs)).argmax(1).numpy()
        explore = rng.random(len(live)) < eps
        action = np.where(explore, rng.integers(0, 2, len(live)), greedy)
        reward, done, nxt = np.zeros(len(live), np.float32), np.zeros(len(live), np.float32), []
        for k, (e, a) in enumerate(zip(live, action)):
            e.act(bool(a))
            nxt.append(e.observe())
            if e.done:
                reward[k], done[k] = e.reward(), 1.0
                live[k] = _fresh(rng)
        replay.add(obs, action, reward, np.stack(nxt), done)

    def _fresh(rng) -> Episode:
        while True:
            e = Episode.start(draw_instance(rng))
            if not e.done:
                return e

    def step(i: int) -> float:
        if not run:  # first step of this process: fresh episodes, and a replay memory to learn from
            run["rng"] = np.random.default_rng([seed, i])
            run["envs"] = [_fresh(run["rng"]) for _ in range(envs)]
            while len(replay) < warmup:
                advance(max(epsilon(i), 0.5) if i else 1.0)
        advance(epsilon(i))
        beta = min(1.0, 0.3 + 0.7 * i / steps)
        idx, batch = replay.sample(batch_size, beta)
        loss, td = dqn_loss(net, target, batch)
        replay.update(idx, td.numpy())
        value = optimize(opt, loss, clip=10.0)
        if (i + 1) % target_every == 0:
            target.load_state_dict(net.state_dict())
        return value

    def on_checkpoint(state, _m) -> None:
        s = share(net, val)
        shipped = training_record(out) or {}
        best = max(state.extra.get("best_share", -math.inf), shipped.get("validation_share", -math.inf)
                   if shipped.get("seed") == seed else -math.inf)
        state.extra.setdefault("validation", []).append([state.step, round(s, 5)])
        if s > best:
            state.extra["best_share"] = s
            export(net, out, {"steps": state.step, "validation_share": round(s, 5), "validation_N": N_MAX,
                              "validation_scenarios": val_size, "wall_seconds": round(state.extra.get(
                                  "wall_seconds", 0.0), 1), "seed": seed, "envs": envs,
                              "batch_size": batch_size, "lr": lr, "replay_size": replay_size,
                              "target_every": target_every, "exported_at": time.strftime("%Y-%m-%d %H:%M:%S")})

    cfg = LoopConfig(Path(run_dir), steps, max_minutes, checkpoint_every=checkpoint_every, log_every=200,
                     record={"planner": "per-dqn"})
    state = run_training(cfg, model, opt, step, on_checkpoint, desc="planner")
    return float(state.extra.get("best_share", float("nan")))
