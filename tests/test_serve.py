"""The cloud server over real HTTP on loopback, with tiny random models.

Bit-exact handoff against the in-process hybrid run, step-level batching, the
fallbacks (unreachable, dying, failing, slow cloud), every class of bad input, auth,
metrics, and a property-based fuzz of the API that must never answer 5xx.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from splitdiff.core.plan import parse_plan
from splitdiff.core.runner import advance
from splitdiff.core.schedulers import SCHEDULERS
from splitdiff.core.trajectory import Trajectory
from splitdiff.errors import UserError
from splitdiff.hybrid.pipeline import load_pipeline
from splitdiff.serve.app import create_app
from splitdiff.serve.auth import load_token
from splitdiff.serve.client import CloudClient
from splitdiff.serve.edge import run_with_cloud
from splitdiff.serve.engine import Engine
from splitdiff.serve.order import order_from
from splitdiff.serve.batching import Busy, Job, BatchQueue
from splitdiff.serve.schemas import TrajectoryRequest
from splitdiff.serve.server import Limits, ThreadedServer, build_app
from splitdiff.serve.worker import Worker

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "a large red circle at the top left and a small blue star at the bottom right, on a navy background"
LIMITS = Limits(max_batch=4, max_waiting=64, max_steps=50, max_size=64, max_body_bytes=1_000_000)


@pytest.fixture(scope="module")
def paths(tiny_models_dir):
    return {k: str(tiny_models_dir / k) for k in ("big", "small", "vae")}


@pytest.fixture(scope="module")
def server(paths):
    app = build_app(paths["big"], vae=paths["vae"], token=TOKEN, limits=LIMITS)
    with ThreadedServer(app, limits=LIMITS) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def local(paths):
    """The in-process hybrid pipeline the server must agree with."""
    return load_pipeline({"cloud": paths["big"], "edge": paths["small"]}, paths["vae"])


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "splitdiff", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def post(http, body=None, *, raw=None, headers=None):
    if raw is not None:
        return http.post("/v1/trajectories", content=raw, headers=headers or {})
    return http.post("/v1/trajectories", json=body, headers=headers or {})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- what the cloud computes --------------------------------------------------------------
def test_cloud_url_image_equals_in_process_hybrid_bit_for_bit(tmp_path, server, local, paths):
    out = tmp_path / "cloud.png"
    r = cli("generate", PROMPT, "--plan", "cloud:3,edge:5", "--steps", 8, "--seed", 7, "--cloud-url", server.url,
            "--model", f"edge={paths['small']}", "--vae", paths["vae"], "--out", out, env={"SPLITDIFF_TOKEN": TOKEN})
    assert r.returncode == 0, r.stderr
    traj = local.start(PROMPT, steps=8, seed=7)
    local.run(traj, parse_plan("cloud:3,edge:5"))
    assert Image.open(out).tobytes() == local.decode(traj).tobytes()
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.strip()[:1].isalpha()}
    assert rows["cloud"][2] == "cloud" and rows["edge"][2] == "local"
    assert "network" in rows and "handoff" in rows and "degraded" not in r.stderr


def test_handoff_provenance_and_fp16_wire(server, local):
    plan = parse_plan("cloud:2,edge:4")
    with CloudClient(server.url, TOKEN) as client:
        full, handoff = run_with_cloud(local, plan, client, PROMPT, steps=6, size=32)
        half, half_handoff = run_with_cloud(local, plan, client, PROMPT, steps=6, size=32, half=True)
    assert [(s.model, s.start, s.end, s.where) for s in full.provenance] == [
        ("cloud", 0, 2, "cloud"), ("edge", 2, 6, "local")]
    assert not full.degraded and handoff.received_bytes > 0 and handoff.attempts == 1
    assert half_handoff.received_bytes < 0.6 * handoff.received_bytes
    assert (full.latents - half.latents).abs().max() < 5e-2


def test_embeddings_request_equals_prompt_request(http, local):
    emb, mask = local.encoder([PROMPT, "blurry"])
    common = dict(steps=4, cloud_steps=2, size=32, seed=3)
    by_prompt = post(http, dict(prompt=PROMPT, negative_prompt="blurry", **common))
    by_embeds = post(http, dict(prompt_embeds=emb[0].tolist(), negative_embeds=emb[1].tolist(),
                                prompt_mask=mask[0].tolist(), negative_mask=mask[1].tolist(),
                                negative_prompt="blurry", **common))
    assert by_prompt.status_code == by_embeds.status_code == 200, by_embeds.text
    a, b = Trajectory.from_bytes(by_prompt.content), Trajectory.from_bytes(by_embeds.content)
    assert torch.equal(a.latents, b.latents) and a.step_index == b.step_index == 2


def test_requests_in_flight_join_the_batch_at_their_own_step(server, http, local):
    bodies = [dict(prompt=p, steps=12, cloud_steps=c, size=32, seed=i)
              for i, (p, c) in enumerate([(PROMPT, 12), ("a small green square", 6), ("a blue moon", 4)])]
    calls_before = metric(http, "splitdiff_batch_size_count")
    results = {}

    def send(i):
        results[i] = post(http, bodies[i])

    first = threading.Thread(target=send, args=(0,))
    first.start()
    deadline = time.monotonic() + 30
    while http.get("/healthz").json()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    later = [threading.Thread(target=send, args=(i,)) for i in (1, 2)]
    for t in later:
        t.start()
    for t in [first, *later]:
        t.join()
    assert all(r.status_code == 200 for r in results.values())
    calls = metric(http, "splitdiff_batch_size_count") - calls_before
    assert calls < 12 + 6 + 4  # some steps were shared
    assert max(float(r.headers["X-Splitdiff-Mean-Batch"]) for r in results.values()) > 1
    for i, body in enumerate(bodies):  # batched differs from alone only by float rounding
        got = Trajectory.from_bytes(results[i].content)
        alone = local.start(body["prompt"], steps=12, seed=i, size=32)
        advance(local.unets["cloud"], [alone], body["cloud_steps"])
        assert got.step_index == body["cloud_steps"]
        assert (got.latents - alone.latents).abs().max() < 1e-4


# -- the engine's scheduling, with a stand-in worker ----------------------------------------
class RecordingWorker:
    """Stands in for the model: records who took part in each call at which step."""

    def __init__(self):
        self.calls = []

    def prefill(self, order):
        side = order.size // 4
        return types.SimpleNamespace(step_index=0, prompt=order.prompt, latents=torch.zeros(1, 4, side, side),
                                     prompt_embeds=torch.zeros(3, 8))

    def prefill_many(self, orders):
        return [self.prefill(o) for o in orders]

    def step(self, trajs):
        self.calls.append([(t.prompt, t.step_index) for t in trajs])
        failures = {i: UserError(f"{t.prompt} cannot step") for i, t in enumerate(trajs) if "bad" in t.prompt}
        for i, t in enumerate(trajs):
            t.step_index += i not in failures
        return 0.001, failures


def _req(name, cloud_steps, size=16):
    return order_from(TrajectoryRequest(prompt=name, steps=cloud_steps, cloud_steps=cloud_steps, size=size),
                      (4, size // 4, size // 4), (3, 8))


def _iterate(engine):
    admitted, batch = engine.queue.schedule()
    engine.queue.retire(engine.step(admitted, batch))


def test_engine_admits_mid_flight_and_retires_at_once_in_fifo_order():
    worker = RecordingWorker()
    engine = Engine(worker, max_batch=2)
    a = engine.submit(_req("a", 3))
    _iterate(engine)
    b, c = engine.submit(_req("b", 2)), engine.submit(_req("c", 1))
    _iterate(engine)
    assert not a.future.done()
    _iterate(engine)
    assert a.future.done() and b.future.done() and not c.future.done()
    _iterate(engine)
    assert c.future.done() and not engine.queue.has_work
    assert worker.calls == [[("a", 0)], [("a", 1), ("b", 0)], [("a", 2), ("b", 1)], [("c", 0)]]
    assert c.future.result().step_index == 1


def test_after_a_wave_the_engine_regathers_its_clients_before_the_next_call():
    """4 ran together and finished; their clients send again one by one: the next call takes all 4."""
    worker = RecordingWorker()
    engine = Engine(worker, max_batch=8, regather=2.0)
    first = [engine.submit(_req(f"a{i}", 1)) for i in range(4)]  # queued before the loop runs: one call
    engine.start()
    try:
        for job in first:
            job.future.result(10)
        started = time.perf_counter()
        second = [engine.submit(_req("b0", 1))]
        for i in range(1, 4):
            time.sleep(0.05)
            second.append(engine.submit(_req(f"b{i}", 1)))
        for job in second:
            job.future.result(10)
        waited = time.perf_counter() - started
    finally:
        engine.stop()
    assert [len(c) for c in worker.calls] == [4, 4] and waited < 1.0  # full, and not the whole 2 s
    alone = Engine(RecordingWorker(), max_batch=8, regather=2.0)  # one client: nothing to wait for
    alone.start()
    try:
        started = time.perf_counter()
        for i in range(3):
            alone.submit(_req(f"c{i}", 1)).future.result(10)
        assert time.perf_counter() - started < 1.0
    finally:
        alone.stop()


def test_scheduler_bounds_the_queue_and_drops_cancelled_jobs():
    s = BatchQueue(max_batch=1, max_waiting=2)
    jobs = [Job(_req(str(i), 1)) for i in range(3)]
    s.add(jobs[0])
    s.add(jobs[1])
    with pytest.raises(Busy):
        s.add(jobs[2])
    jobs[0].future.cancel()
    admitted, batch = s.schedule()
    assert admitted == batch == [jobs[1]]


def test_engine_failure_answers_the_batch_and_keeps_serving():
    worker = RecordingWorker()
    engine = Engine(worker, max_batch=4)
    worker.step = lambda trajs: 1 / 0
    job = engine.submit(_req("a", 1))
    _iterate(engine)
    assert "failed" in str(job.future.exception())
    assert not engine.queue.has_work and engine.queue.held_bytes == 0
    worker.step = RecordingWorker.step.__get__(worker)
    ok = engine.submit(_req("b", 1))
    _iterate(engine)
    assert ok.future.result().step_index == 1


def test_work_that_cannot_share_a_call_runs_in_calls_of_its_own():
    worker = RecordingWorker()
    engine = Engine(worker, max_batch=8)
    jobs = [engine.submit(_req(name, 2, size)) for name, size in (("a", 16), ("b", 32), ("c", 16), ("d", 48))]
    _iterate(engine)
    _iterate(engine)
    assert sorted(map(sorted, worker.calls[:3])) == [[("a", 0), ("c", 0)], [("b", 0)], [("d", 0)]]
    assert all(j.future.result().step_index == 2 for j in jobs) and len(worker.calls) == 6


def test_one_requests_failure_fails_that_request_alone():
    worker = RecordingWorker()
    engine = Engine(worker, max_batch=8)
    good, bad = engine.submit(_req("good", 2)), engine.submit(_req("bad", 2))
    _iterate(engine)
    assert isinstance(bad.future.exception(), UserError) and not good.future.done()
    _iterate(engine)
    assert good.future.result().step_index == 2

    def crash_on_bad(trajs):  # the shared call itself fails: each then runs alone
        if any("bad" in t.prompt for t in trajs):
            raise RuntimeError("boom")
        return RecordingWorker.step(worker, trajs)

    worker.step = crash_on_bad
    good, bad = engine.submit(_req("good", 1)), engine.submit(_req("bad", 1))
    _iterate(engine)
    assert good.future.result().step_index == 1 and "failed" in str(bad.future.exception())


def test_the_queue_is_bounded_by_bytes_and_cancelled_work_frees_them():
    order = _req("a", 1, size=64)
    s = BatchQueue(max_batch=1, max_waiting=100, max_bytes=3 * order.nbytes)
    jobs = [Job(_req(str(i), 1, size=64)) for i in range(4)]
    for job in jobs[:3]:
        s.add(job)
    with pytest.raises(Busy, match="MiB budget"):
        s.add(jobs[3])
    jobs[1].future.cancel()
    s.cancel(jobs[1])
    assert s.held_bytes == 2 * order.nbytes and jobs[1].order.prompt_embeds is None
    s.add(jobs[3])
    s.drain()
    assert s.held_bytes == 0


def test_a_dead_engine_loop_answers_what_it_held_and_refuses_more():
    from splitdiff.serve.engine import ShuttingDown

    engine = Engine(RecordingWorker())
    engine.queue.schedule = lambda: 1 / 0
    job = engine.submit(_req("a", 1))
    engine.start()
    with pytest.raises(ShuttingDown):
        job.future.result(timeout=10)
    engine.stop()
    assert not engine.alive
    with pytest.raises(ShuttingDown):
        engine.submit(_req("b", 1))


# -- when the cloud cannot be had ------------------------------------------------------------
def test_unreachable_cloud_falls_back_to_the_edge_and_still_writes_the_image(tmp_path, local, paths):
    out = tmp_path / "fallback.png"
    r = cli("generate", PROMPT, "--plan", "cloud:3,edge:5", "--steps", 8, "--cloud-url",
            f"http://127.0.0.1:{closed_port()}", "--model", f"edge={paths['small']}", "--vae", paths["vae"],
            "--out", out)
    assert r.returncode == 0, r.stderr
    assert "cloud unavailable" in r.stderr and "degraded" in r.stderr and "Traceback" not in r.stderr
    traj = local.start(PROMPT, steps=8)
    local.run(traj, parse_plan("edge:8"))
    assert Image.open(out).tobytes() == local.decode(traj).tobytes()


def test_cloud_dying_mid_run_falls_back(local, paths):
    port = closed_port()
    proc = subprocess.Popen([sys.executable, "-m", "splitdiff", "serve", "--model", paths["big"], "--vae",
                             paths["vae"], "--port", str(port), "--log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        result, warnings = {}, []

        def edge():
            with CloudClient(url, tries=2, backoff=0.05) as client:
                result["traj"], _ = run_with_cloud(local, parse_plan("cloud:40,edge:2"), client, PROMPT, steps=42,
                                                   size=32, warn=warnings.append)

        thread = threading.Thread(target=edge)
        thread.start()
        while httpx.get(f"{url}/healthz").json()["running"] == 0:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # mid-run: its request is in the batch
        thread.join(120)
    finally:
        proc.kill()
        proc.wait()
    traj = result["traj"]
    assert traj.degraded and traj.done and "cloud unavailable" in warnings[0]
    assert [(s.model, s.where) for s in traj.provenance] == [("edge", "local")]


class FaultyWorker:
    """The real worker, but its steps fail or hang on demand."""

    def __init__(self, worker):
        self.worker, self.mode = worker, "ok"
        self.name = worker.name

    def check(self, req):
        return self.worker.check(req)

    def prefill_many(self, orders):
        return self.worker.prefill_many(orders)

    def step(self, trajs):
        if self.mode == "fail":
            raise RuntimeError("injected fault")
        if self.mode == "slow":
            time.sleep(0.5)
        return self.worker.step(trajs)


@pytest.fixture(scope="module")
def faulty(paths):
    worker = FaultyWorker(Worker.load(paths["big"], vae=paths["vae"]))
    with ThreadedServer(create_app(Engine(worker, max_batch=4))) as s:
        yield s, worker


@pytest.mark.parametrize("mode, problem", [("fail", "HTTP 500"), ("slow", "Timeout")])
def test_failing_or_slow_cloud_is_retried_then_falls_back(faulty, local, mode, problem):
    server, worker = faulty
    local.encoder([PROMPT, ""])  # cached: the server's prefill and the fallback never tokenize at once
    worker.mode, warnings = mode, []
    try:
        with CloudClient(server.url, timeout=0.3, tries=2, backoff=0.01) as client:
            traj, handoff = run_with_cloud(local, parse_plan("cloud:6,edge:2"), client, PROMPT, steps=8, size=32,
                                           warn=warnings.append)
    finally:
        worker.mode = "ok"
    assert traj.degraded and handoff is None and problem in warnings[0] and "2 tries" in warnings[0]
    deadline = time.monotonic() + 30  # the requests that timed out leave the batch once their clients hang up
    while httpx.get(f"{server.url}/healthz").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    r = httpx.post(f"{server.url}/v1/trajectories", json=dict(prompt=PROMPT, steps=2, cloud_steps=1, size=16))
    assert r.status_code == 200  # and the server still serves
    if mode == "slow":
        assert 'splitdiff_requests_total{status="499"} 2.0' in httpx.get(f"{server.url}/metrics").text


def test_a_4xx_is_the_users_mistake_not_a_fallback(server, local):
    with CloudClient(server.url, "wrong-token") as client, pytest.raises(UserError, match="HTTP 401"):
        run_with_cloud(local, parse_plan("cloud:1,edge:1"), client, PROMPT, steps=2)
    with CloudClient(server.url, TOKEN) as client, pytest.raises(UserError, match="HTTP 404.*unknown model"):
        run_with_cloud(local, parse_plan("nope:1,edge:1"), client, PROMPT, steps=2)


# -- bad input -----------------------------------------------------------------------------
GOOD = dict(prompt="a red circle", steps=2, cloud_steps=1, size=16)
ROW = [0.0] * 384


@pytest.mark.parametrize("body, status, words", [
    ({}, 422, "exactly one of prompt and prompt_embeds"),
    ({**GOOD, "prompt_embeds": [ROW], "negative_embeds": [ROW]}, 422, "exactly one"),
    ({**GOOD, "steps": 0}, 422, "steps: Input should be greater than or equal to 1"),
    ({**GOOD, "steps": 51}, 422, "exceeds this server's limit of 50"),
    ({**GOOD, "steps": 10 ** 6}, 422, "steps"),
    ({**GOOD, "cloud_steps": 3}, 422, "cloud_steps 3 exceeds steps 2"),
    ({**GOOD, "scheduler": "plms"}, 422, "unknown scheduler 'plms'"),
    ({**GOOD, "model": "sdxl"}, 404, "unknown model 'sdxl'"),
    ({**GOOD, "size": 18}, 422, "not a multiple of the VAE's factor 4"),
    ({**GOOD, "size": 128}, 422, "exceeds this server's limit of 64"),
    ({**GOOD, "size": 8}, 422, "size"),
    ({**GOOD, "guidance": -1}, 422, "guidance"),
    ({**GOOD, "seed": 2 ** 80}, 422, "seed"),
    ({**GOOD, "prompt": "x" * 1001}, 422, "prompt: String should have at most 1000 characters"),
    ({**GOOD, "prompt": 42}, 422, "prompt: Input should be a valid string"),
    ({**GOOD, "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
    ({**GOOD, "negative_embeds": [ROW]}, 422, "go with prompt_embeds"),
    ({"prompt_embeds": [ROW], "steps": 2, "cloud_steps": 1}, 422, "needs negative_embeds"),
    ({"prompt_embeds": [ROW, ROW[:5]], "negative_embeds": [ROW, ROW], "steps": 2, "cloud_steps": 1}, 422, "L x D"),
    ({"prompt_embeds": [[0.0] * 8], "negative_embeds": [[0.0] * 8], "steps": 2, "cloud_steps": 1}, 422,
     "8 wide; the model takes 384"),
    ({"prompt_embeds": [ROW], "negative_embeds": [ROW], "prompt_mask": [1, 1], "steps": 2, "cloud_steps": 1}, 422,
     "prompt_mask has 2 entries"),
    ([1, 2, 3], 422, "send a JSON object"),
    ("just a string", 422, "send a JSON object"),
    (None, 422, "needs a JSON object body"),
])
def test_bad_requests_get_a_one_line_4xx(http, body, status, words):
    r = post(http, body)
    assert r.status_code == status and words in r.json()["error"], r.text
    assert "\n" not in r.json()["error"] and "Traceback" not in r.text


@pytest.mark.parametrize("raw, headers, status, words", [
    (b"{not json", {"Content-Type": "application/json"}, 422, "invalid JSON"),
    (b'{"prompt": "x", "guidance": NaN}', {"Content-Type": "application/json"}, 422, "finite number"),
    (b'{"prompt": "x", "guidance": Infinity}', {"Content-Type": "application/json"}, 422, "finite number"),
    (b"", {"Content-Type": "application/json"}, 422, "needs a JSON object body"),
    (b"null", {"Content-Type": "application/json"}, 422, "send a JSON object"),
    (b'{"prompt": "x"}', {"Content-Type": "text/plain"}, 422, "Content-Type: application/json"),
    (b"\xff\xfe\x00garbage", {"Content-Type": "application/json"}, 422, ""),
    (b"[" * 100_000, {"Content-Type": "application/json"}, 422, "recursion limit"),
    (b"x" * 1_000_001, {"Content-Type": "application/json"}, 413, "exceeds 1000000 bytes"),
    (iter([b"x" * 600_000, b"x" * 600_000]), {"Content-Type": "application/json"}, 413, "exceeds"),
])
def test_bad_bodies_get_a_one_line_4xx(http, raw, headers, status, words):
    r = post(http, raw=raw, headers=headers)
    assert r.status_code == status and words in r.json()["error"], r.text
    assert "\n" not in r.json()["error"]


def test_unknown_routes_and_methods_are_4xx_json(http):
    assert http.get("/v2/nothing").status_code == 404 and "error" in http.get("/v2/nothing").json()
    assert http.get("/v1/trajectories").status_code == 405


# -- auth, health, metrics, docs -----------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}])
def test_api_needs_the_bearer_token_before_reading_anything(server, headers):
    for content in (json.dumps(GOOD).encode(), b"{garbage"):
        r = httpx.post(f"{server.url}/v1/trajectories", content=content,
                       headers={"Content-Type": "application/json", **headers})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json() == {"error": "missing or wrong bearer token"}


def test_health_metrics_and_docs_are_open(server, http):
    assert post(http, GOOD).status_code == 200
    h = httpx.get(f"{server.url}/healthz").json()
    assert h["status"] == "ok" and h["model"] == "cloud" and h["max_batch"] == 4
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("splitdiff_queue_depth", "splitdiff_batch_size_bucket", "splitdiff_step_seconds_bucket",
                 'splitdiff_requests_total{status="200"}', 'splitdiff_requests_total{status="401"}',
                 'splitdiff_requests_total{status="422"}', "splitdiff_request_seconds_count"):
        assert name in text
    spec = httpx.get(f"{server.url}/openapi.json").json()
    op = spec["paths"]["/v1/trajectories"]["post"]
    assert "application/octet-stream" in op["responses"]["200"]["content"]
    assert {"401", "404", "413", "422", "503"} <= set(op["responses"]) and op["security"]
    assert "cloud_steps" in spec["components"]["schemas"]["TrajectoryRequest"]["properties"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_tokens_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SPLITDIFF_TOKEN", raising=False)
    assert load_token(None) is None
    monkeypatch.setenv("SPLITDIFF_TOKEN", "from-env")
    assert load_token(None) == "from-env"
    (tmp_path / "t").write_text("from-file\n")
    assert load_token(tmp_path / "t") == "from-file"
    (tmp_path / "empty").write_text("  \n")
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(UserError):
            load_token(bad)


def test_serve_command_refuses_bad_options_in_one_line():
    for args, words in ((["--role", "edge"], "is not served"), (["--model", "/no/such"], "not a diffusers folder")):
        r = cli("serve", *args)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# -- fuzz ----------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3), max_leaves=8)
FLOATS = st.floats() | st.sampled_from([0, 1, 5.0, 7.5, 100, 100.5, "5"])
NEAR_VALID = st.fixed_dictionaries({
    # what a request costs is bounded here: few steps, small images
    "steps": st.sampled_from([1, 2, 3, 0, -1, 51, 1001, "2", 2.0, 2.5, None, True, [2]]),
    "cloud_steps": st.sampled_from([1, 2, 0, 4, -3, 1001, "1", None, 1.5]),
    "size": st.sampled_from([16, 32, 0, 15, 18, -16, 128, 4096, "16", 32.0, None]),
}, optional={
    "prompt": st.text(max_size=40) | st.sampled_from(["x" * 1001, None, 7, ["a"]]),
    "negative_prompt": st.text(max_size=10) | st.integers(),
    "model": st.sampled_from([None, "cloud", "nope", "", 3]),
    "seed": st.integers(-2 ** 70, 2 ** 70) | st.sampled_from(["7", 1.5, None]),
    "scheduler": st.sampled_from([*SCHEDULERS, "plms", "", 1, None]),
    "guidance": FLOATS,
    "half": st.booleans() | st.sampled_from(["yes", 2, None]),
    "prompt_embeds": st.lists(st.lists(FLOATS, max_size=3), max_size=3),
    "negative_embeds": st.lists(st.lists(FLOATS, max_size=3), max_size=3),
    "prompt_mask": st.lists(st.integers(-1, 2), max_size=3),
    "extra": JSON,
})
VALID = st.fixed_dictionaries({
    # valid and cheap: one step of a 16 px image, prompts mostly already encoded
    "prompt": st.sampled_from([PROMPT, "a red circle", "a small blue star"]) | st.text(max_size=20),
    "steps": st.integers(1, 3), "cloud_steps": st.just(1), "size": st.just(16),
}, optional={
    "negative_prompt": st.sampled_from(["", "blurry"]), "seed": st.integers(-2 ** 63, 2 ** 64 - 1),
    "scheduler": st.sampled_from(list(SCHEDULERS)), "guidance": st.floats(0, 100), "half": st.booleans(),
    "model": st.just("cloud"),
})
FIELDS = ["prompt", "negative_prompt", "steps", "cloud_steps", "size", "seed", "scheduler", "guidance", "half",
          "model", "prompt_embeds", "negative_embeds", "prompt_mask", "negative_mask", "unknown"]
MUTATED = st.tuples(VALID, st.sampled_from(FIELDS), JSON | st.text()).map(lambda t: {**t[0], t[1]: t[2]})
CONTENT_TYPES = st.sampled_from(["application/json"] * 4 + ["application/json; charset=utf-8", "text/plain", None,
                                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
BODIES = st.one_of(
    *[MUTATED.map(lambda d: json.dumps(d).encode())] * 3,
    NEAR_VALID.map(lambda d: json.dumps(d).encode()),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    VALID.map(lambda d: json.dumps(d).encode()),
)


def test_fuzzed_requests_never_get_a_5xx(server, http):
    seen = {"requests": 0, "ok": 0}

    @settings(max_examples=1000, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=BODIES, content_type=CONTENT_TYPES)
    def check(body, content_type):
        headers = {"Content-Type": content_type} if content_type else {}
        r = post(http, raw=body, headers=headers)
        seen["requests"] += 1
        assert r.status_code < 500, (body, r.status_code, r.text)
        if r.status_code == 200:
            seen["ok"] += 1
            assert Trajectory.from_bytes(r.content).step_index >= 1
        else:
            error = r.json()["error"]
            assert error and "\n" not in error and "Traceback" not in error

    check()
    assert seen["requests"] >= 1000 and 10 <= seen["ok"] <= 300, seen
    assert http.get("/healthz").json()["status"] == "ok"


# -- the benchmark's measuring, on the in-thread server --------------------------------------
def test_bench_measures_a_concurrency_point(server):
    from splitdiff.bench.serve import Requests, concurrency_point

    row = concurrency_point(server, 4, 1.0, Requests(steps=3, cloud_steps=2, size=16), headers=AUTH)
    assert row["errors"] == 0 and row["requests"] >= 4 and row["images_per_s"] > 0
    assert 1 <= row["mean_batch"] <= 4 and 0 < row["handoff_share"] < 1 and row["handoff_bytes"] > 10_000
    assert row["p50_s"] <= row["p99_s"]


def test_the_readme_cloud_example_runs_against_a_real_server():
    """The README's edge-client example, as written, against `serve` on the embedded cloud model."""
    import re
    from pathlib import Path

    from splitdiff import SplitPipeline

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "CloudExecutor" in b)
    with ThreadedServer(build_app("cloud", limits=LIMITS), limits=LIMITS) as s:
        scope = {"SplitPipeline": SplitPipeline, "prompt": "a large red circle at the top left, on a navy background"}
        exec(compile(code.replace("http://127.0.0.1:8000", s.url), "README.md", "exec"), scope)
    traj = scope["out"].trajectories[0]
    assert not traj.degraded and traj.done
    assert [(p.model, p.start, p.end, p.where) for p in traj.provenance] == [
        ("cloud", 0, 10, "cloud"), ("edge", 10, 25, "local")]
