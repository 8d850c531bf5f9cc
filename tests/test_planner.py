"""The users-axis planner: the maths of exact against numeric and exhaustive searches, and its command."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from splitdiff.errors import UserError
from splitdiff.users.planner import brute, exact, milp, registry
from splitdiff.users.planner.families import paper_scenario, splitdiff_scenario
from splitdiff.users.planner.latency import Decision, best_split, closed_form_split, objective, split_value
from splitdiff.users.planner.scenario import MAX_USERS, Instance, Scenario, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "scenario.json"
SCRIPT = Path(sys.executable).with_name("splitdiff")


def random_scenario(rng: np.random.Generator, N: int, latency: str, transmission: str, integer: bool = False,
                    T: int = 200) -> Scenario:
    """Wider than the paper's family: any capacity, a server cost that re-ranks users as B grows, any b."""
    lo = int(rng.integers(0, T // 2))
    hi = int(rng.integers(lo, T + 1))
    users = [dict(tau=float(rng.uniform(0.01, 0.4)), alpha=float(rng.uniform(0.5, 80)),
                  request_time=float(rng.uniform(0, 1)), payload_bits=float(rng.uniform(0, 8e6)),
                  bandwidth_hz=float(rng.uniform(5e7, 2e8))) for _ in range(N)]
    return Scenario.model_validate(dict(
        T=T, n_min=lo, n_max=hi, integer_splits=integer,
        pai=dict(a=float(rng.uniform(0.01, 0.2)) * 200 / T, b=float(rng.uniform(0, T))),
        server=dict(k_e=float(rng.uniform(0, 0.03)), h_e=float(rng.uniform(0, 0.01)),
                    capacity=int(rng.integers(0, N + 2)), shared_channel=bool(rng.random() < 0.7)),
        latency=latency, transmission=transmission, users=users))


def _value(alpha, tau, s, a, b, n, T=200.0):
    return alpha / (1 + np.exp(-a * (n - b))) - n * tau - (T - n) * s


# --- the per-user split --------------------------------------------------------------------------------------


def test_closed_form_matches_a_numeric_optimiser_when_concave():
    rng = np.random.default_rng(0)
    for _ in range(300):
        a, lo = rng.uniform(0.01, 0.1), rng.uniform(0, 150)
        b = rng.uniform(lo - 100, lo)  # b <= n_min: PAI concave on the range
        hi = rng.uniform(lo, 200)
        alpha, tau, s = rng.uniform(0.1, 100), rng.uniform(0, 0.4), rng.uniform(0, 0.1)
        n = float(closed_form_split(alpha, tau, s, a, b, lo, hi))
        f = lambda x: -_value(alpha, tau, s, a, b, x)
        num = minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
        best_num = max(-num.fun, -f(lo), -f(hi))
        assert -f(n) >= best_num - 1e-7 * max(1, abs(best_num))
        assert lo - 1e-9 <= n <= hi + 1e-9


@pytest.mark.parametrize("integer", [False, True])
def test_best_split_is_exact_for_any_b(integer):
    """Also where PAI is convex on part of the range (b > n_min): endpoints or the concave root."""
    rng = np.random.default_rng(1)
    for k in range(60):
        s_ = random_scenario(rng, 5, "constant-batch", "sound", integer=integer, T=200 if not integer else 40)
        inst = Instance.of(s_)
        s = rng.uniform(0, 0.05, size=3)
        n, v = best_split(inst, s)
        for i in range(inst.N):
            for j in range(len(s)):
                if integer:
                    grid = np.arange(inst.n_lo, inst.n_hi + 1)
                else:
                    grid = np.linspace(inst.n_lo, inst.n_hi, 20001)
                dense = split_value(inst, grid, s[j], idx=i).max()
                assert v[i, j] >= dense - 1e-9 * max(1, abs(dense))
                assert abs(split_value(inst, n[i, j], s[j], idx=i) - v[i, j]) < 1e-9
                if integer:
                    assert v[i, j] == pytest.approx(dense, abs=1e-9) and n[i, j] == round(n[i, j])


# --- exact against brute force -------------------------------------------------------------------------------


@pytest.mark.parametrize("latency", ["constant-batch", "shrinking-batch"])
@pytest.mark.parametrize("transmission", ["sound", "paper-code"])
def test_exact_equals_brute_force(latency, transmission):
    rng = np.random.default_rng(hash((latency, transmission)) % 2**32)
    for k in range(30):  # 4 x 30 = 120 scenarios, N <= 8
        N = int(rng.integers(1, 9))
        s = random_scenario(rng, N, latency, transmission) if k % 2 else \
            paper_scenario(N, rng, latency=latency, transmission=transmission)
        inst = Instance.of(s)
        de, ie = exact.solve(inst)
        db, ib = brute.solve(inst)
        ue, ub = objective(inst, de), objective(inst, db)
        assert ue == pytest.approx(ub, rel=1e-9, abs=1e-9)
        assert ue == pytest.approx(ie["value"], rel=1e-9, abs=1e-9)  # the decision reaches the predicted optimum


@pytest.mark.parametrize("latency", ["constant-batch", "shrinking-batch"])
def test_rank_identity_against_plain_enumeration(latency):
    """Every subset and every vector of whole splits, scored by the latency model itself (no rank argument)."""
    rng = np.random.default_rng(7)
    for _ in range(12):
        N = int(rng.integers(1, 5))
        s = random_scenario(rng, N, latency, "sound", integer=True, T=8)
        inst = Instance.of(s)
        best = -np.inf
        grid = np.arange(inst.n_lo, inst.n_hi + 1)
        for mask in itertools.product([False, True], repeat=N):
            granted = np.array(mask)
            if granted.sum() > inst.capacity:
                continue
            for ns in itertools.product(grid, repeat=int(granted.sum())):
                n = np.full(N, inst.T)
                n[granted] = ns
                best = max(best, objective(inst, Decision(granted, n)))
        d, _ = exact.solve(inst)
        assert objective(inst, d) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_brute_handles_twelve_users_in_both_models():
    for latency in ("constant-batch", "shrinking-batch"):
        s = paper_scenario(12, 3, latency=latency, transmission="paper-code")
        assert registry.run("brute", s).objective == pytest.approx(registry.run("exact", s).objective, rel=1e-9)


# --- MILP, heuristics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("latency", ["constant-batch", "shrinking-batch"])
def test_milp_equals_exact_on_the_same_grid(latency):
    rng = np.random.default_rng(11)
    for k in range(4):
        N = int(rng.integers(2, 6))
        s = paper_scenario(N, rng, latency=latency, transmission="paper-code" if k % 2 else "sound") if k < 2 \
            else random_scenario(rng, N, latency, "sound")
        inst = Instance.of(s)
        grid = milp.default_grid(inst, 7)
        dm, info = milp.solve(inst, grid=grid)
        de, _ = milp.exact_on_grid(inst, grid)
        assert info["optimal"]
        assert objective(inst, dm) == pytest.approx(objective(inst, de), rel=1e-7, abs=1e-7)
        assert objective(inst, dm) <= objective(inst, exact.solve(inst)[0]) + 1e-9


def test_heuristics_never_beat_exact():
    rng = np.random.default_rng(5)
    for k in range(12):
        latency = ("constant-batch", "shrinking-batch")[k % 2]
        s = random_scenario(rng, int(rng.integers(1, 15)), latency, ("sound", "paper-code")[k // 2 % 2])
        best = registry.run("exact", s).objective
        for name in ("ga", "greedy", "all-offload", "all-local"):
            r = registry.run(name, s, **({"generations": 30} if name == "ga" else {}))
            assert r.objective <= best + 1e-9 * max(1, abs(best)), name
            assert r.decision.B <= s.server.capacity


def test_ga_is_seeded():
    s = paper_scenario(30, 2, transmission="paper-code")
    a, b = (registry.run("ga", s, seed=4, generations=20).decision for _ in range(2))
    assert np.array_equal(a.granted, b.granted) and np.array_equal(a.n, b.n)


def test_exact_is_fast_at_100_users():
    for latency, limit in (("constant-batch", 2e-3), ("shrinking-batch", 50e-3)):
        s = paper_scenario(100, 0, latency=latency, transmission="paper-code")
        registry.run("exact", s)
        assert min(registry.run("exact", s).runtime_s for _ in range(5)) < limit * 5  # loose: a shared CI machine


def test_splitdiff_family_takes_measured_times():
    s = splitdiff_scenario(6, 0, k_e=0.004, h_e=0.02, device_taus=[0.015, 0.03, 0.06])
    assert s.T == 25 and s.integer_splits and s.latency == "shrinking-batch"
    d = registry.run("exact", s).decision
    assert np.all(d.n == np.round(d.n))
    assert registry.run("exact", s).objective == pytest.approx(registry.run("brute", s).objective, rel=1e-9)


# --- PER-DQN -------------------------------------------------------------------------------------------------


def test_dqn_shapes_and_episode():
    import torch

    from splitdiff.users.planner.dqn import OBS, Episode, QNet

    net = QNet()
    assert net(torch.zeros(5, OBS)).shape == (5, 2)
    inst = Instance.of(paper_scenario(7, 0))
    ep = Episode.start(inst)
    assert ep.observe().shape == (OBS,)
    while not ep.done:
        ep.act(True)
    d, u = ep.finish()
    assert d.B == 7 and u == pytest.approx(objective(inst, d))
    with pytest.raises(ValueError):
        Episode.start(Instance.of(paper_scenario(21, 0)))


def test_prioritized_replay_weights():
    from splitdiff.users.planner.dqn import PrioritizedReplay

    rb = PrioritizedReplay(100, obs_dim=3, seed=0)
    rb.add(np.zeros((10, 3)), np.zeros(10, dtype=int), np.arange(10), np.zeros((10, 3)), np.zeros(10))
    rb.update(np.arange(10), np.r_[np.full(9, 1e-3), 10.0])
    idx, (*_, w) = rb.sample(2000, beta=1.0)
    assert (idx == 9).mean() > 0.9  # the large error is replayed most...
    assert float(w[idx == 9].max()) < float(w[idx != 9].min())  # ...and weighted least


def test_dqn_training_improves_over_random(tmp_path):
    import torch

    from splitdiff.users.planner import train
    from splitdiff.users.planner.dqn import NumpyQ, load_net

    torch.manual_seed(0)
    val = train.validation_set(40, seed=3)
    best = train.train_planner(tmp_path / "run", tmp_path / "w", steps=400, envs=16, batch_size=64, lr=1e-3,
                               warmup=500, checkpoint_every=200, val_size=40, target_every=100, explore_steps=200)

    class Coin(NumpyQ):  # grant or deny at random
        def __init__(self):
            self.rng = np.random.default_rng(0)

        def __call__(self, obs):
            return self.rng.random((len(obs), 2))

    random_share = np.mean([train.share(Coin(), val) for _ in range(3)])
    trained = train.share(load_net(tmp_path / "w" / "model.safetensors"), val)
    assert best > random_share + 0.05 and trained > random_share + 0.05
    rec = json.loads((tmp_path / "w" / "training.json").read_text())
    assert rec["steps"] in (200, 400)
    # resumable: the same command goes on from the checkpoint
    train.train_planner(tmp_path / "run", tmp_path / "w", steps=450, envs=16, batch_size=64, warmup=200,
                        checkpoint_every=200, val_size=10)
    assert "resumed at step 400" in (tmp_path / "run" / "train.log").read_text()


# --- the scenario file and the command -----------------------------------------------------------------------


def _scenario_dict(**change):
    d = json.loads(EXAMPLE.read_text())
    for path, value in change.items():
        *parents, last = path.split("__")
        node = d
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = value
    return d


def test_scenario_errors_name_the_field():
    bad = {
        "capacity < 0": (_scenario_dict(server__capacity=-1), "server.capacity"),
        "unknown field": (_scenario_dict(colour="red"), "colour"),
        "negative time": (_scenario_dict(users__0__tau=-0.1), "users.0.tau"),
        "n outside 0..T": (_scenario_dict(n_max=201), "n range"),
        "late request": (_scenario_dict(users__1__request_time=2.0), "window"),
        "infinite": (_scenario_dict(users__0__alpha=float("inf")), "users.0.alpha"),
    }
    for why, (data, needle) in bad.items():
        with pytest.raises(UserError) as e:
            parse_scenario(json.loads(json.dumps(data)), "s.json")
        assert needle in str(e.value) and "\n" not in str(e.value), why
    too_many = _scenario_dict()
    too_many["users"] = too_many["users"][:1] * (MAX_USERS + 1)
    with pytest.raises(UserError, match="at most 1000"):
        parse_scenario(too_many)


def _splitdiff(*args, cwd):
    return subprocess.Popen([str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd)


def test_plan_command(tmp_path):
    """The real console script: one-line errors with exit 2, and every solver on the example scenario."""
    cases = {"unknown": _scenario_dict(colour="red"), "negative": _scenario_dict(users__0__tau=-1),
             }
    many = _scenario_dict()
    many["users"] = many["users"][:1] * (MAX_USERS + 1)
    cases["many"] = many
    procs = {}
    for name, data in cases.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        procs[name] = _splitdiff("plan", f"{name}.json", cwd=tmp_path)
    (tmp_path / "broken.json").write_text("{")
    procs["broken"] = _splitdiff("plan", "broken.json", cwd=tmp_path)
    procs["ok"] = _splitdiff("plan", EXAMPLE, "--json", "--milp-time-limit", "30", cwd=tmp_path)
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        if name == "ok":
            assert p.returncode == 0, err
            data = json.loads(out)
            by = {r["solver"]: r for r in data["solvers"]}
            assert set(by) == set(registry.solvers())
            assert by["exact"]["objective"] == pytest.approx(by["brute"]["objective"], rel=1e-9)
            assert by["exact"]["share_of_exact"] == pytest.approx(1.0)
            assert all(r.get("skipped") or r["objective"] <= by["exact"]["objective"] + 1e-9
                       for r in data["solvers"])
            continue
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("splitdiff: error: "), (name, err)
        assert out == ""


def test_plan_table_in_process(capsys):
    from splitdiff.users.planner.report import plan

    plan(EXAMPLE, "exact,greedy,all-local")
    out = capsys.readouterr().out
    assert "exact" in out and "100.00%" in out and "greedy" in out
    with pytest.raises(UserError, match="unknown solver"):
        plan(EXAMPLE, "exact,simplex")
    with pytest.raises(UserError, match="no such file"):
        load_scenario(Path("/nonexistent/s.json"))
