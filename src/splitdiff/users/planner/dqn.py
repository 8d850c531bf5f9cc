"""The paper's PER-DQN planner: users decided one by one (grant or deny), splits in closed form.

The MDP. Users are visited in request order. The state is one row per user,
[status, 0.01 alpha, tau, wait] (status: 0 undecided, 2 being decided, 1 granted,
-1 denied), the user being decided first (see Episode.observe), zero-padded to N_MAX
rows, then global features: the paper's six
[remaining capacity, undecided, granted, denied, k_e, h_e] (counts over N_MAX, k_e and h_e
times T) and two more, the link's seconds at B = 1 and the latency model, so that one
network serves both transmission forms and both latency models. Actions: 0 deny, 1 grant.
Granting the last free place denies everyone left, and ends the episode. The reward comes
at the end: the decision's objective (with the exact splits for its granted set) minus the
all-local objective, over 10 N_MAX.

The learner fixes what the released code leaves out: epsilon-greedy exploration that does
explore, episodes drawn from the whole scenario family instead of one fixed scenario,
importance-sampling weights in the loss, and the last reward kept when capacity ends an
episode. Prioritized replay is proportional (priority^0.7, beta annealed from 0.3 to 1)
and written here on numpy: torchrl's buffer needs its compiled extension, which does not
load against the pinned torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .exact import best_for_set
from .latency import Decision, Gains, gains
from .scenario import Instance

N_MAX = 20
ROW = 4
GLOBALS = 8
OBS = N_MAX * ROW + GLOBALS
HIDDEN = 256
WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights" / "planner"
WEIGHTS_FILE = "model.safetensors"
REWARD_SCALE = 10.0 * N_MAX


class QNet(nn.Module):
    """The paper's MLP: OBS-256-256-256-2, one Q-value per action (deny, grant)."""

    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(OBS, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


@dataclass
class Episode:
    """One scenario being decided: who is granted so far, and whose turn it is."""

    inst: Instance
    g: Gains
    order: np.ndarray  # visiting order (by request time)
    rows: np.ndarray  # (N_MAX, ROW) user rows in visiting order, status column filled as we go
    glob: np.ndarray  # the constant global features
    canon: np.ndarray  # each visited row's place in the observation's fixed order of users
    pos: int = 0
    left: int = 0  # free places

    @classmethod
    def start(cls, inst: Instance) -> "Episode":
        if inst.N > N_MAX:
            raise ValueError(f"the DQN planner takes N <= {N_MAX}")
        order = np.argsort(inst.request_time, kind="stable")
        rows = np.zeros((N_MAX, ROW), dtype=np.float32)
        rows[:inst.N, 1] = 0.01 * inst.alpha[order]
        rows[:inst.N, 2] = inst.tau[order]
        rows[:inst.N, 3] = inst.wait[order]
        glob = np.array([inst.k_e * inst.T, inst.h_e * inst.T, float(inst.tx_unit.mean()) if inst.N else 0.0,
                         float(inst.shrinking)], dtype=np.float32)
        canon = np.empty(inst.N, dtype=np.int64)
        canon[np.lexsort((-rows[:inst.N, 1], -rows[:inst.N, 2]))] = np.arange(inst.N)
        ep = cls(inst, gains(inst), order, rows, glob, canon, 0, inst.capacity)
        if ep.done:  # nobody to decide, or no place to give
            ep.rows[ep.pos:inst.N, 0] = -1
        else:
            ep.rows[0, 0] = 2
        return ep

    @property
    def done(self) -> bool:
        return self.pos >= self.inst.N or self.left == 0

    def observe(self) -> np.ndarray:
        """The rows laid out as: the user being decided, the undecided, the granted, the denied, padding.

        Within each group users keep one fixed order (slowest device first, then larger alpha),
        so the network finds the user it decides on in the first row and sees the others
        the same way whatever their request order.
        """
        N = self.inst.N
        granted = self.inst.capacity - self.left
        counts = np.array([self.left, N - self.pos, granted, self.pos - granted], dtype=np.float32) / N_MAX
        status = self.rows[:N, 0]
        group = np.select([status == 2, status == 0, status == 1], [0, 1, 2], 3)
        rows = np.zeros_like(self.rows)
        rows[:N] = self.rows[:N][np.argsort(group * N_MAX + self.canon, kind="stable")]
        return np.concatenate([rows.ravel(), counts, self.glob])

    def act(self, grant: bool) -> None:
        self.rows[self.pos, 0] = 1 if grant else -1
        self.left -= int(grant)
        self.pos += 1
        if self.done:
            self.rows[self.pos:self.inst.N, 0] = -1
        else:
            self.rows[self.pos, 0] = 2

    def granted(self) -> np.ndarray:
        mask = np.zeros(self.inst.N, dtype=bool)
        mask[self.order[:self.pos][self.rows[:self.pos, 0] == 1]] = True
        return mask

    def finish(self) -> tuple[Decision, float]:
        """The decision with exact splits for its granted set, and its objective."""
        return best_for_set(self.inst, self.granted(), self.g)

    def reward(self) -> float:
        return (self.finish()[1] - self.g.base) / REWARD_SCALE


class NumpyQ:
    """The same network on numpy, for deciding: a few small matrix products need no thread pool."""

    def __init__(self, net: QNet):
        layers = [m for m in net.net if isinstance(m, nn.Linear)]
        self.layers = [(m.weight.detach().double().numpy().T.copy(), m.bias.detach().double().numpy())
                       for m in layers]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        x = obs.astype(np.float64)
        for k, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if k < len(self.layers) - 1:
                np.maximum(x, 0, out=x)
        return x


def rollout(net: QNet | NumpyQ, insts: list[Instance]) -> list[tuple[Decision, float]]:
    """Greedy decisions for many scenarios at once (one forward pass per visiting position)."""
    q_of = net if isinstance(net, NumpyQ) else NumpyQ(net)
    eps = [Episode.start(i) for i in insts]
    while True:
        live = [e for e in eps if not e.done]
        if not live:
            break
        q = q_of(np.stack([e.observe() for e in live]))
        for e, a in zip(live, q.argmax(1).tolist()):
            e.act(bool(a))
    return [e.finish() for e in eps]


class PrioritizedReplay:
    """Proportional prioritized replay: P(i) ~ p_i^alpha, weights (N P(i))^-beta over their max.

    Sampling is a cumulative sum and a binary search: O(capacity) per batch, which at
    these sizes costs well under a millisecond and needs no segment tree.
    """

    def __init__(self, capacity: int, obs_dim: int = OBS, alpha: float = 0.7, seed: int = 0):
        self.capacity, self.alpha = capacity, alpha
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.action = np.zeros(capacity, dtype=np.int64)
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.done = np.zeros(capacity, dtype=np.float32)
        self.prio = np.zeros(capacity, dtype=np.float64)
        self.size, self.head, self.max_prio = 0, 0, 1.0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, obs, action, reward, next_obs, done) -> None:
        k = len(action)
        idx = (self.head + np.arange(k)) % self.capacity
        self.obs[idx], self.action[idx], self.reward[idx] = obs, action, reward
        self.next_obs[idx], self.done[idx] = next_obs, done
        self.prio[idx] = self.max_prio ** self.alpha  # new transitions are seen at least once
        self.head = (self.head + k) % self.capacity
        self.size = min(self.size + k, self.capacity)

    def sample(self, batch: int, beta: float):
        cum = np.cumsum(self.prio[:self.size])
        idx = np.searchsorted(cum, self.rng.random(batch) * cum[-1], side="right")
        idx = np.minimum(idx, self.size - 1)
        p = self.prio[idx] / cum[-1]
        w = (self.size * p) ** (-beta)
        w /= w.max()
        t = torch.from_numpy
        return idx, (t(self.obs[idx]), t(self.action[idx]), t(self.reward[idx]), t(self.next_obs[idx]),
                     t(self.done[idx]), t(w.astype(np.float32)))

    def update(self, idx: np.ndarray, td_error: np.ndarray) -> None:
        p = np.abs(td_error) + 1e-4
        self.max_prio = max(self.max_prio, float(p.max()))
        self.prio[idx] = p ** self.alpha


def dqn_loss(net: QNet, target: QNet, batch, double: bool = True):
    """Huber TD loss weighted by the importance weights; gamma = 1 (episodes end)."""
    obs, action, reward, next_obs, done, w = batch
    q = net(obs).gather(1, action[:, None])[:, 0]
    with torch.no_grad():
        q_next = target(next_obs)
        a_next = net(next_obs).argmax(1, keepdim=True) if double else q_next.argmax(1, keepdim=True)
        y = reward + (1 - done) * q_next.gather(1, a_next)[:, 0]
    td = q - y
    loss = (w * nn.functional.smooth_l1_loss(q, y, reduction="none")).mean()
    return loss, td.detach()


def load_net(path: Path | None = None) -> QNet:
    from ...io import load_tensors

    tensors, _ = load_tensors(Path(path or WEIGHTS_DIR / WEIGHTS_FILE))
    net = QNet()
    net.load_state_dict({k: v.float() for k, v in tensors.items()})
    return net.eval()


@lru_cache(maxsize=4)
def _shipped(path: str) -> NumpyQ:
    return NumpyQ(load_net(Path(path)))


def unavailable() -> str | None:
    return None if (WEIGHTS_DIR / WEIGHTS_FILE).exists() else "no trained weights (splitdiff train planner)"


def solve(inst: Instance, net: QNet | NumpyQ | None = None, weights: str | Path | None = None):
    net = net or _shipped(str(weights or WEIGHTS_DIR / WEIGHTS_FILE))
    d, _ = rollout(net, [inst])[0]
    return d, {"B": d.B}


def training_record(folder: Path = WEIGHTS_DIR) -> dict | None:
    f = folder / "training.json"
    return json.loads(f.read_text()) if f.exists() else None
