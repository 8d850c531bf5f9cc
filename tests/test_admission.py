"""Admission in the cloud server, over real HTTP on loopback with tiny random models.

Users asking within one scheduling window are granted or denied as the exact planner
decides for the same scenario (their device times and alphas, the server's own live
profile); granted users get their trajectory at their own split, denied ones a 409
at once and finish locally; a failing or slow planner falls back to FIFO and is
counted; the profile is a least-squares fit of the server's own step timings.
"""

import os
import subprocess
import sys
import threading
import time
import types

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from splitdiff.core.plan import PlanSegment, parse_plan
from splitdiff.core.trajectory import Trajectory
from splitdiff.hybrid.pipeline import load_pipeline
from splitdiff.serve.admission import AdmissionConfig
from splitdiff.serve.app import create_app
from splitdiff.serve.client import CloudClient
from splitdiff.core.plan import fit_plan
from splitdiff.serve.edge import run_with_cloud
from splitdiff.serve.engine import Engine
from splitdiff.serve.order import order_from
from splitdiff.serve.profile import DEFAULT_K_E, StepProfile, fit
from splitdiff.serve.schemas import TrajectoryRequest
from splitdiff.serve.server import Limits, ThreadedServer, build_app
from splitdiff.users.planner import registry
from splitdiff.users.planner.scenario import Scenario

PROMPT = "a large red circle at the top left, on a navy background"
T = 8
PAI = (1.0, 4.0)
WINDOW = 1.0
LIMITS = Limits(max_batch=4, max_waiting=64, max_steps=50, max_size=64)
PAYLOAD = 1e6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a CPU shared with other jobs, spinning threads make steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def paths(tiny_models_dir):
    return {k: str(tiny_models_dir / k) for k in ("big", "small", "vae")}


@pytest.fixture(scope="module")
def server(paths):
    admission = AdmissionConfig("planner", window=WINDOW, capacity=2, pai=PAI, timeout=5.0)
    app = build_app(paths["big"], vae=paths["vae"], limits=LIMITS, admission=admission)
    with ThreadedServer(app, limits=LIMITS) as s:
        yield s


@pytest.fixture(scope="module")
def local(paths):
    return load_pipeline({"cloud": paths["big"], "edge": paths["small"]}, paths["vae"])


def body(user: str, tau: float, alpha: float, cloud_steps: int = 4, seed: int = 0) -> dict:
    return dict(prompt=PROMPT, steps=T, cloud_steps=cloud_steps, size=32, seed=seed,
                user=dict(id=user, device_step_seconds=tau, alpha=alpha, payload_bits=PAYLOAD))


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def send_together(url: str, bodies: list[dict]) -> list[tuple[httpx.Response, float]]:
    """POST every body at once (one thread each); each answer with its seconds."""
    answers: list = [None] * len(bodies)
    go = threading.Barrier(len(bodies))

    def send(i):
        go.wait()
        start = time.perf_counter()
        r = httpx.post(f"{url}/v1/trajectories", json=bodies[i], timeout=120)
        answers[i] = (r, time.perf_counter() - start)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def expected(profile: dict, users: list[tuple[str, float, float]], capacity: int = 2):
    """The exact planner's decision for these users on a server with this profile (the same scenario)."""
    scenario = Scenario.model_validate(dict(
        T=T, n_min=1, n_max=T - 1, integer_splits=True, pai=dict(a=PAI[0], b=PAI[1]),
        server=dict(k_e=profile["k_e"], h_e=profile["h_e"], capacity=capacity, shared_channel=False),
        latency="shrinking-batch", transmission="sound", spectral_efficiency=1.0, window=WINDOW,
        users=[dict(id=u, tau=tau, alpha=a, payload_bits=PAYLOAD + profile["overhead_s"] * 1e9, bandwidth_hz=1e9)
               for u, tau, a in users]))
    return registry.run("exact", scenario).decision


# -- over HTTP ----------------------------------------------------------------------------------
def test_four_users_in_one_window_are_admitted_as_the_exact_planner_decides(server, local):
    profile = httpx.get(f"{server.url}/v1/profile").json()
    assert profile["samples"] > 0 and profile["fitted"]  # seeded by the start-up warm-up
    step = 2 * profile["k_e"] + profile["h_e"]  # the server's step for a batch of two
    users = [("fast-a", step / 50, 0.2), ("slow-a", 10 * step, 0.5), ("fast-b", step / 20, 0.1),
             ("slow-b", 8 * step, 0.5)]
    want = expected(profile, users)
    assert [u for (u, *_), g in zip(users, want.granted) if g] == ["slow-a", "slow-b"]  # the case is not trivial
    windows = metric(server.url, "splitdiff_admission_windows_total")
    answers = send_together(server.url, [body(u, tau, a, seed=i) for i, (u, tau, a) in enumerate(users)])
    assert metric(server.url, "splitdiff_admission_windows_total") == windows + 1  # one window decided all four
    for (user, *_), granted, n, (r, seconds) in zip(users, want.granted, want.n, answers):
        if granted:
            assert r.status_code == 200, r.text
            m = T - int(n)
            assert r.headers["X-Splitdiff-Decision"] == "grant" and r.headers["X-Splitdiff-Policy"] == "planner"
            assert int(r.headers["X-Splitdiff-Cloud-Steps"]) == m
            assert int(r.headers["X-Splitdiff-Device-Steps"]) == int(n)
            traj = Trajectory.from_bytes(r.content)
            assert traj.step_index == m and traj.num_steps == T
            assert [(s.start, s.end, s.where) for s in traj.provenance] == [(0, m, "cloud")]
        else:
            assert r.status_code == 409 and r.headers["X-Splitdiff-Decision"] == "deny", r.text
            answer = r.json()
            assert answer["decision"] == "deny" and answer["user"] == user and answer["policy"] == "planner"
            assert answer["cloud_steps"] == 0 and answer["device_steps"] == T and answer["predicted_seconds"] > 0
            assert "\n" not in answer["error"]
            assert seconds < WINDOW + 2.0  # at once: the window, not the granted users' steps
    grants = metric(server.url, 'splitdiff_admission_decisions_total{decision="grant",policy="planner"}')
    assert grants >= 2


def test_the_edge_finishes_a_granted_user_at_its_split_and_runs_a_denied_one_locally(server, local):
    plan = parse_plan("cloud:4,edge:4")
    with CloudClient(server.url) as client:
        slow, h_slow = run_with_cloud(local, plan, client, PROMPT, steps=T, size=32, seed=1,
                                      user=dict(id="slow", device_step_seconds=30.0, alpha=0.3))
        fast, h_fast = run_with_cloud(local, plan, client, PROMPT, steps=T, size=32, seed=2,
                                      user=dict(id="fast", device_step_seconds=0.0005, alpha=0.3))
    m = h_slow.decision["cloud_steps"]
    assert h_slow.decision["decision"] == "grant" and 1 <= m < T and not slow.degraded
    assert [(s.model, s.start, s.end, s.where) for s in slow.provenance] == [
        ("cloud", 0, m, "cloud"), ("edge", m, T, "local")]
    assert h_fast.decision["decision"] == "deny" and not fast.degraded
    assert [(s.model, s.start, s.end, s.where) for s in fast.provenance] == [("edge", 0, T, "local")]
    alone = local.start(PROMPT, steps=T, seed=2, size=32)  # denied: exactly the all-local run
    local.run(alone, parse_plan(f"edge:{T}"))
    assert torch.equal(fast.latents, alone.latents)


def test_a_failing_or_slow_planner_falls_back_to_fifo_and_is_counted(server):
    admission = server.server.config.app.state.admission
    users = [("u1", 2.0, 0.5), ("u2", 1.8, 0.5), ("u3", 1.6, 0.5)]

    def boom(_scenario):
        raise RuntimeError("injected planner failure")

    def slow(scenario):
        time.sleep(1.0)
        return registry.run("exact", scenario).decision

    for planner, reason, timeout in ((boom, "error", 5.0), (slow, "timeout", 0.2)):
        before = metric(server.url, f'splitdiff_admission_fallbacks_total{{reason="{reason}"}}')
        admission.planner, admission.config.timeout = planner, timeout
        bodies = [body(u, tau, a, cloud_steps=c, seed=i) for i, ((u, tau, a), c) in enumerate(zip(users, (3, 5, 2)))]
        answers = {}

        def send(b):
            answers[b["user"]["id"]] = httpx.post(f"{server.url}/v1/trajectories", json=b, timeout=120)

        threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
        try:
            for t in threads:  # arrival order fixed: FIFO grants the first two at the split they asked for
                t.start()
                time.sleep(0.1)
            for t in threads:
                t.join()
        finally:
            admission.planner, admission.config.timeout = admission.solve, 5.0
        for b, granted in zip(bodies, (True, True, False)):
            r = answers[b["user"]["id"]]
            assert r.headers["X-Splitdiff-Policy"] == "fallback", r.text
            if granted:
                assert r.status_code == 200 and int(r.headers["X-Splitdiff-Cloud-Steps"]) == b["cloud_steps"]
                assert Trajectory.from_bytes(r.content).step_index == b["cloud_steps"]
            else:
                assert r.status_code == 409 and r.json()["policy"] == "fallback"
        assert metric(server.url, f'splitdiff_admission_fallbacks_total{{reason="{reason}"}}') == before + 1


def test_profile_gauges_and_the_deny_answer_are_documented(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("splitdiff_profile_k_e_seconds", "splitdiff_profile_h_e_seconds", "splitdiff_profile_samples",
                 "splitdiff_admission_windows_total", 'splitdiff_admission_fallbacks_total{reason="timeout"}'):
        assert name in text
    spec = httpx.get(f"{server.url}/openapi.json").json()
    op = spec["paths"]["/v1/trajectories"]["post"]
    assert "409" in op["responses"]
    schemas = spec["components"]["schemas"]
    assert {"UserBlock", "DenyBody"} <= set(schemas) and "user" in schemas["TrajectoryRequest"]["properties"]
    assert "/v1/profile" in spec["paths"]


def test_without_admission_a_user_block_changes_nothing(paths):
    app = build_app(paths["big"], vae=paths["vae"], limits=LIMITS)
    with ThreadedServer(app, limits=LIMITS) as s:
        r = httpx.post(f"{s.url}/v1/trajectories", json=body("ana", 0.001, 0.1, cloud_steps=3), timeout=120)
        plain = httpx.post(f"{s.url}/v1/trajectories", json={**body("x", 0, 0, cloud_steps=3), "user": None},
                           timeout=120)
        assert r.status_code == plain.status_code == 200
        assert "X-Splitdiff-Decision" not in r.headers
        assert Trajectory.from_bytes(r.content).step_index == 3
        assert torch.equal(Trajectory.from_bytes(r.content).latents, Trajectory.from_bytes(plain.content).latents)
        assert "splitdiff_admission" not in httpx.get(f"{s.url}/metrics").text


# -- the profile, with a stand-in worker of known step times --------------------------------------
K_E, H_E = 0.021, 0.034


class TimedWorker:
    """Stands in for the model: each call of B trajectories reports K_E B + H_E seconds, give or take 2%."""

    name, max_steps, max_size, factor = "cloud", 50, 64, 4

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def prefill_many(self, orders):
        return [types.SimpleNamespace(step_index=0, latents=torch.zeros(1, 4, o.size // 4, o.size // 4),
                                      prompt_embeds=torch.zeros(3, 8)) for o in orders]

    def step(self, trajs):
        for t in trajs:
            t.step_index += 1
        return (K_E * len(trajs) + H_E) * (1 + 0.02 * self.rng.standard_normal()), {}


def _order(steps):
    return order_from(TrajectoryRequest(prompt="x", steps=steps, cloud_steps=steps, size=16), (4, 4, 4), (3, 8))


def test_the_profile_endpoint_fits_the_workers_step_times():
    engine = Engine(TimedWorker(), max_batch=8)
    with ThreadedServer(create_app(engine)) as s:
        before = httpx.get(f"{s.url}/v1/profile").json()
        assert before == {"k_e": DEFAULT_K_E, "h_e": pytest.approx(0.1), "samples": 0, "fitted": False,
                          "overhead_s": 0.0}
        jobs = []
        for wave in ([6, 5, 4, 3, 2, 1, 6, 3], [4, 4], [7]):  # batches shrink as jobs leave: B from 8 to 1
            jobs += [j for j in engine.submit_all([_order(n) for n in wave])]
            for j in jobs:
                j.future.result(30)
        got = httpx.get(f"{s.url}/v1/profile").json()
    assert got["samples"] > 10 and got["fitted"]
    assert got["k_e"] == pytest.approx(K_E, rel=0.1) and got["h_e"] == pytest.approx(H_E, rel=0.1)


def test_the_fit_is_least_squares_with_nonnegative_coefficients():
    assert fit([(1, 0.3), (2, 0.5), (4, 0.9)]) == pytest.approx((0.2, 0.1))
    assert fit([(2, 0.5), (2, 0.7)], k_prior=0.1) == pytest.approx((0.1, 0.4))  # one batch size: slope kept
    assert fit([(1, 0.5), (4, 0.4)]) == pytest.approx((0.0, 0.45))  # falling: flat
    k, h = fit([(1, 0.1), (3, 0.35)])
    assert h == 0 and k == pytest.approx((0.1 + 3 * 0.35) / 10)  # through the origin
    p = StepProfile(max_samples=3)
    for b, sec in [(1, 9.0), (1, 0.3), (2, 0.5), (4, 0.9)]:  # the oldest falls out
        p.observe(b, sec, at=0.0)
    assert (p.k_e, p.h_e) == pytest.approx((0.2, 0.1)) and p.samples == 3


def test_the_profile_follows_the_load_without_bending_the_slope():
    """Idle warm-up at B = 1, 2, 4, then the machine is twice as busy and every call has B = 3."""
    p = StepProfile()
    p.seed([(1, 0.05), (2, 0.07), (4, 0.11)] * 3)  # k = 0.02, h = 0.03
    assert (p.k_e, p.h_e) == pytest.approx((0.02, 0.03))
    busy = [(3, 2 * 0.09)] * 24
    for i, (b, sec) in enumerate(busy):
        p.observe(b, sec, at=10 + 0.2 * i)
    assert (p.k_e, p.h_e) == pytest.approx((0.04, 0.06), rel=0.02)  # B = 1 now takes 0.1 s
    flat = fit([(1, 0.05), (2, 0.07), (4, 0.11)] * 3 + busy)  # one line through both loads
    assert abs(flat[0] + flat[1] - 0.1) > 0.02


# -- the edge's side -------------------------------------------------------------------------------
def test_the_edge_plan_is_resized_from_the_front():
    rest = parse_plan("a:5,b:10")
    assert fit_plan(rest, 15) == rest
    assert fit_plan(rest, 12) == (PlanSegment("a", 2), PlanSegment("b", 10))
    assert fit_plan(rest, 8) == (PlanSegment("b", 8),)
    assert fit_plan(rest, 20) == (PlanSegment("a", 10), PlanSegment("b", 10))
    assert fit_plan(rest, 0) == ()
    assert fit_plan((PlanSegment("edge", 15, "ana"),), 20) == (PlanSegment("edge", 20, "ana"),)  # adapters stay


def cli(*args):
    return subprocess.run([sys.executable, "-m", "splitdiff", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "SPLITDIFF_TOKEN"})


def test_generate_with_a_user_is_denied_and_finishes_locally_unmarked(tmp_path, server, paths):
    out = tmp_path / "denied.png"
    r = cli("generate", PROMPT, "--plan", "cloud:4,edge:4", "--steps", T, "--size", 32, "--cloud-url", server.url,
            "--user", "ana", "--alpha", 0.1, "--device-step-seconds", 0.0001, "--model", f"edge={paths['small']}",
            "--vae", paths["vae"], "--out", out)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).text["splitdiff.degraded"] == "false" and "denied" in r.stdout
    r = cli("generate", PROMPT, "--user", "ana", "--alpha", 1, "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "--cloud-url" in r.stderr and len(r.stderr.strip().splitlines()) == 1
