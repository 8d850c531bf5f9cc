"""The standing hostile suite for the cloud server, over real HTTP on loopback.

Requests that cannot share a U-Net call, connections that never speak, queues of
large requests, values that overflow float32, a SIGTERM mid-generation, and a
schema-driven fuzz of the API from its own OpenAPI document: no 5xx, no traceback,
and the server keeps serving.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from splitdiff.core.schedulers import SCHEDULERS
from splitdiff.core.trajectory import Trajectory
from splitdiff.serve.server import Limits, ThreadedServer, build_app

PROMPT = "a large red circle at the top left, on a navy background"
ROW = [0.0] * 384
FUZZ_EXAMPLES = int(os.environ.get("SPLITDIFF_FUZZ_EXAMPLES", "2000"))


@pytest.fixture(scope="module")
def paths(tiny_models_dir):
    return {k: str(tiny_models_dir / k) for k in ("big", "small", "vae")}


class ErrorLog(logging.Handler):
    """Every record at ERROR or above, or with a traceback, from any logger."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture
def error_log():
    handler = ErrorLog()
    logging.getLogger().addHandler(handler)
    yield handler.records
    logging.getLogger().removeHandler(handler)


def serve(paths, **limits):
    limits = Limits(**{"max_batch": 8, "max_steps": 50, "max_size": 64, **limits})
    return ThreadedServer(build_app(paths["big"], vae=paths["vae"], limits=limits), limits=limits)


@pytest.fixture(scope="module")
def server(paths):
    with serve(paths, header_timeout=1.0, body_timeout=2.0) as s:
        yield s


def metric(url, name):
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def post(url, body, timeout=120):
    return httpx.post(f"{url}/v1/trajectories", json=body, timeout=timeout)


# -- no request fails because of another -------------------------------------------------------
def test_mixed_sizes_embeddings_and_schedulers_at_once_all_succeed(server, error_log):
    """Three edge clients at 64, 32 and 48 px, embeddings of other lengths, four schedulers: 0 errors."""
    bodies = [dict(prompt=PROMPT, size=64, steps=40, cloud_steps=40),
              dict(prompt=PROMPT, size=32, steps=10, cloud_steps=5),
              dict(prompt=PROMPT, size=48, steps=12, cloud_steps=6)]
    bodies += [dict(prompt_embeds=[ROW] * n, negative_embeds=[ROW] * n, size=32, steps=6, cloud_steps=3)
               for n in (3, 48, 77)]
    bodies += [dict(prompt=PROMPT, size=s, steps=8, cloud_steps=4, scheduler=name)
               for s, name in zip((16, 32, 16, 48), SCHEDULERS)]
    results = [None] * len(bodies)

    def send(i):
        time.sleep(0.05 * i)  # arrive while the others run
        results[i] = post(server.url, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * len(bodies), [r.text for r in results if r.status_code != 200]
    for body, r in zip(bodies, results):
        traj = Trajectory.from_bytes(r.content)
        assert traj.step_index == body["cloud_steps"] and traj.latents.shape[-1] == body["size"] // 4
        assert not traj.latents.isnan().any()
    assert not error_log


def test_values_beyond_float32_are_refused_and_the_server_keeps_serving(server):
    r = post(server.url, dict(prompt_embeds=[[1e39] * 384], negative_embeds=[ROW], steps=2, cloud_steps=1, size=16))
    assert r.status_code == 422 and "beyond float32" in r.json()["error"]
    assert post(server.url, dict(prompt=PROMPT, steps=2, cloud_steps=1, size=16)).status_code == 200


# -- connections that never speak -----------------------------------------------------------------
def test_idle_and_slow_header_connections_are_closed_and_counted_while_healthz_answers(server):
    before = metric(server.url, 'splitdiff_connections_refused_total{reason="header_timeout"}')
    idle = [socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) for _ in range(400)]
    slow = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    try:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        for _ in range(3):
            r = httpx.get(f"{server.url}/healthz", timeout=5)
            assert r.status_code == 200 and r.json()["status"] == "ok"
        time.sleep(1.8)
        closed = 0
        for s in [*idle, slow]:
            s.settimeout(2)
            try:
                closed += s.recv(1) == b""
            except (ConnectionResetError, TimeoutError):
                closed += 0
        assert closed == len(idle) + 1
        refused = metric(server.url, 'splitdiff_connections_refused_total{reason="header_timeout"}') - before
        assert refused >= len(idle) + 1
    finally:
        for s in [*idle, slow]:
            s.close()


def test_a_body_that_trickles_in_is_answered_408(server):
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/trajectories HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{")
        s.settimeout(10)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and '"error":"request body not received within 2 s"' in answer


def test_too_many_connections_are_closed_at_once(paths):
    with serve(paths, max_connections=20) as s:
        port = int(s.url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        try:
            time.sleep(0.3)
            for h in held:
                h.close()
            time.sleep(0.3)
            assert httpx.get(f"{s.url}/healthz").status_code == 200
            assert metric(s.url, 'splitdiff_connections_refused_total{reason="too_many_connections"}') >= 10
        finally:
            for h in held:
                h.close()


# -- the queue is bounded by bytes ----------------------------------------------------------------
def test_queued_bytes_are_bounded_and_freed_when_clients_give_up(paths):
    from splitdiff.serve.order import LATENT_COPIES

    big = dict(prompt_embeds=[ROW] * 256, negative_embeds=[ROW] * 256, steps=2, cloud_steps=1, size=16)
    need = 4 * (2 * 256 * 384 + LATENT_COPIES * 4 * 4 * 4)
    with serve(paths, max_batch=1, max_queue_bytes=3 * need + 1000) as s:
        blocker = threading.Thread(target=post, args=(s.url, dict(prompt=PROMPT, steps=50, cloud_steps=50,
                                                                  size=64)))
        blocker.start()
        while httpx.get(f"{s.url}/healthz").json()["running"] == 0:
            time.sleep(0.01)
        port, body = int(s.url.rsplit(":", 1)[1]), json.dumps(big).encode()
        waiting = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for w in waiting:  # two queue behind the blocker
            w.sendall(b"POST /v1/trajectories HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while metric(s.url, "splitdiff_queue_bytes") < 2 * need and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(s.url, "splitdiff_queue_bytes") >= 2 * need
        r = post(s.url, big, timeout=10)
        assert r.status_code == 503 and "MiB budget" in r.json()["error"] and r.headers["Retry-After"]
        for w in waiting:  # and give up
            w.close()
        deadline = time.monotonic() + 10
        while metric(s.url, "splitdiff_queue_bytes") >= need and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(s.url, "splitdiff_queue_bytes") < need  # only the blocker's own work is held
        blocker.join()
        assert metric(s.url, "splitdiff_queue_bytes") == 0


# -- lesser -----------------------------------------------------------------------------------------
def test_head_health_no_slash_redirect_and_a_clear_utf8_error(server):
    assert httpx.head(f"{server.url}/healthz").status_code == 200
    r = httpx.get(f"{server.url}/healthz/", headers={"Host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers
    r = httpx.post(f"{server.url}/v1/trajectories", content=b'{"prompt": "\xff"}',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "not valid UTF-8" in r.json()["error"]


def test_sigterm_answers_in_flight_work_with_json_503_and_no_traceback(paths):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "splitdiff", "serve", "--model", paths["big"], "--vae",
                             paths["vae"], "--port", str(port), "--max-batch", "1", "--log-level", "info"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        answers = []

        def send(body):
            answers.append(post(url, body))

        long = dict(prompt=PROMPT, steps=400, cloud_steps=400, size=64)
        threads = [threading.Thread(target=send, args=(long,)) for _ in range(2)]  # one runs, one waits
        for t in threads:
            t.start()
        while httpx.get(f"{url}/healthz").json()["running"] == 0:
            time.sleep(0.01)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        log, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode in (0, -signal.SIGTERM), log  # uvicorn re-raises the signal once it has shut down
    assert [a.status_code for a in answers] == [503, 503], [a.text for a in answers]
    assert all(a.json()["error"] == "server is shutting down" and a.headers["Retry-After"] for a in answers)
    assert "Traceback" not in log and "CancelledError" not in log and "ERROR" not in log, log


# -- schema-driven fuzzing -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_server(paths):
    with serve(paths, max_batch=8, max_steps=3, max_size=32) as s:
        yield s


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schema_driven_fuzz_never_gets_a_5xx_or_a_traceback(fuzz_server, mode, error_log):
    """Cases generated from the server's own OpenAPI: valid ones and ones that break the schema."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    seen = {"cases": 0, "statuses": {}}
    documented = {}
    for result in schema.get_all_operations():
        op = result.ok()
        documented[(op.method.upper(), op.path)] = set(op.definition.raw["responses"]) | {"405"}
    session = httpx.Client(base_url=fuzz_server.url, timeout=60)

    strategies = [result.ok().as_strategy(generation_mode=mode) for result in schema.get_all_operations()]
    from hypothesis import strategies as st

    @settings(max_examples=FUZZ_EXAMPLES // 2, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(strategies))
    def check(case):
        kwargs = case.as_transport_kwargs(base_url=fuzz_server.url)
        r = session.request(kwargs["method"], kwargs["url"], headers=kwargs.get("headers"),
                            content=_body(kwargs), params=kwargs.get("params"))
        seen["cases"] += 1
        seen["statuses"][r.status_code] = seen["statuses"].get(r.status_code, 0) + 1
        assert r.status_code < 500, (kwargs, r.status_code, r.text)
        assert str(r.status_code) in documented[(case.method.upper(), case.path)], (kwargs, r.status_code)
        if r.status_code >= 400:
            error = r.json()["error"]
            assert error and "\n" not in error and "Traceback" not in error

    try:
        check()
    finally:
        session.close()
    assert seen["cases"] >= FUZZ_EXAMPLES // 2, seen
    assert not error_log, error_log[:5]
    assert httpx.get(f"{fuzz_server.url}/healthz").json()["status"] == "ok"


def _body(kwargs) -> bytes | None:
    if "json" in kwargs:
        return json.dumps(kwargs["json"]).encode()
    data = kwargs.get("data")
    return data.encode() if isinstance(data, str) else data


def test_a_generation_that_stops_being_finite_is_an_error_not_a_black_image(server, error_log):
    """Embeddings finite in float32 but large enough to overflow the U-Net: 422 for that request alone."""
    huge = [[3e38] * 384] * 4
    bad = threading.Thread(target=lambda: results.append(post(server.url, dict(
        prompt_embeds=huge, negative_embeds=huge, steps=6, cloud_steps=6, size=32))))
    results = []
    good = dict(prompt=PROMPT, steps=6, cloud_steps=6, size=32)
    bad.start()
    ok = post(server.url, good)
    bad.join()
    assert ok.status_code == 200
    assert results[0].status_code == 422 and "non-finite" in results[0].json()["error"], results[0].text
    assert not error_log


# -- the client comes back when the server asks, not all at once --------------------------------------
def test_the_client_waits_as_retry_after_asks(paths):
    """A server whose queue budget no request fits answers 503 + Retry-After: 1; the client's second try waits."""
    from splitdiff.serve.client import CloudClient, CloudUnavailable

    with serve(paths, max_queue_bytes=1000) as s, CloudClient(s.url, tries=2, backoff=0.01) as client:
        start = time.monotonic()
        with pytest.raises(CloudUnavailable, match="2 tries; last: HTTP 503: server busy"):
            client.trajectory(dict(prompt=PROMPT, steps=2, cloud_steps=1, size=16))
        assert time.monotonic() - start >= 1.0


def test_retry_delays_are_jittered_bounded_and_never_sooner_than_asked():
    import random

    from splitdiff.serve.client import MAX_WAIT, retry_after, retry_delay

    rng = random.Random(0)
    delays = [retry_delay(3, 0.5, rng=rng) for _ in range(200)]
    assert 0.5 <= min(delays) < max(delays) <= 1.0 and len(set(delays)) == 200  # half to whole of 0.5 * 2
    assert all(retry_delay(2, 0.01, asked=1.0, rng=rng) == 1.0 for _ in range(5))
    assert retry_delay(30, 1.0, rng=rng) == MAX_WAIT and retry_delay(2, 0.1, asked=1e9) == MAX_WAIT
    assert [retry_after(v) for v in ("1", "2.5", None, "Wed, 21 Oct 2026 07:28:00 GMT", "-1", "inf")] == \
        [1.0, 2.5, None, None, None, None]


def test_the_edge_client_does_not_load_the_server():
    code = ("import sys, splitdiff.serve.client, splitdiff.serve.edge; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
