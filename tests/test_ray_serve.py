"""The cloud role on a real local Ray Serve application: the same API, the same images, back-pressure, faults."""

import os
import signal
import socket
import threading
import time

import httpx
import pytest
import torch

from splitdiff.core.plan import parse_plan
from splitdiff.hybrid.pipeline import load_pipeline
from splitdiff.serve.client import CloudClient
from splitdiff.serve.edge import run_with_cloud
from splitdiff.serve.server import Limits, ThreadedServer, build_app

ray = pytest.importorskip("ray")
replicas = pytest.importorskip("splitdiff.serve.replicas")

TOKEN = "ray-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "a large red circle at the top left and a small blue star at the bottom right, on a navy background"
LIMITS = Limits(max_batch=2, max_waiting=64, max_steps=200, max_size=64)
PLAN = parse_plan("cloud:3,edge:3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def paths(tiny_models_dir):
    return {k: str(tiny_models_dir / k) for k in ("big", "small", "vae")}


@pytest.fixture(scope="module")
def cluster(paths):
    """Two replicas of the tiny cloud model, each taking 2 requests at once; the router holds 2 more."""
    port = _free_port()
    build = dict(model=paths["big"], name="cloud", vae=paths["vae"], token=TOKEN, limits=LIMITS)
    options = replicas.RayOptions(replicas=2, cpus=0.5, max_ongoing=2, max_queued=2)
    replicas.start(build, options, "127.0.0.1", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        replicas.stop()


@pytest.fixture(scope="module")
def local(paths):
    return load_pipeline({"cloud": paths["big"], "edge": paths["small"]}, paths["vae"])


@pytest.fixture()
def one_thread():
    """The replicas compute with one torch thread; CPU results depend on the count, so the references do too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _generate(url, local, seed, tries=3, plan=PLAN):
    with CloudClient(url, TOKEN, timeout=120, tries=tries, backoff=0.2) as client:
        return run_with_cloud(local, plan, client, PROMPT, steps=sum(s.steps for s in plan), size=32, seed=seed,
                              warn=lambda m: None)


def test_serve_engine_ray_from_the_command_line_starts_answers_and_stops(paths):
    """`splitdiff serve --engine ray --autoscale 1:2` in its own process (its own local Ray), stopped by SIGTERM."""
    import subprocess
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "splitdiff", "serve", "--engine", "ray", "--autoscale", "1:2",
                             "--replica-cpus", "0.5", "--model", paths["big"], "--vae", paths["vae"], "--port",
                             str(port), "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, health = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert health is not None and health.status_code == 200, proc.stdout.read1().decode()[-2000:]
        body = {"prompt": PROMPT, "steps": 4, "cloud_steps": 2, "size": 32}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/trajectories", json=body, timeout=60).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, proc.stdout.read().decode()[-3000:]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


@pytest.mark.parametrize("args, message", [
    (["--replicas", "2"], "--replicas, --autoscale and --address go with --engine ray"),
    (["--engine", "nope"], "--engine must be local or ray"),
    (["--engine", "ray", "--autoscale", "3"], "--autoscale '3' is not MIN:MAX"),
    (["--engine", "ray", "--autoscale", "3:1"], "--autoscale MIN:MAX needs"),
    (["--engine", "ray", "--device", "cuda:1"], "Ray shows each replica its own GPU as cuda:0"),
])
def test_bad_engine_options_are_one_line(args, message):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "splitdiff", "serve", *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_replicas_reserve_what_they_compute_with():
    app = replicas.application({"model": "cloud"}, replicas.RayOptions(replicas=3, cpus=2, gpus=0.5))
    deployment = app._bound_deployment
    assert deployment.num_replicas == 3 and deployment.max_ongoing_requests == 16
    assert deployment.ray_actor_options["num_cpus"] == 2 and deployment.ray_actor_options["num_gpus"] == 0.5
    scaled = replicas.application({"model": "cloud"}, replicas.RayOptions(autoscale=(1, 4)))
    config = scaled._bound_deployment._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas) == (1, 4)


def test_the_same_api_and_one_line_errors(cluster, paths):
    single = build_app(paths["big"], name="cloud", vae=paths["vae"], token=TOKEN, limits=LIMITS)
    with httpx.Client(base_url=cluster, timeout=60) as http:
        assert http.get("/openapi.json").json()["paths"].keys() == single.openapi()["paths"].keys()
        assert http.get("/healthz").json()["model"] == "cloud"
        r = http.post("/v1/trajectories", json={"prompt": PROMPT})
        assert r.status_code == 401 and "\n" not in r.json()["error"]
        r = http.post("/v1/trajectories", json={"prompt": 3}, headers=AUTH)
        assert r.status_code == 422 and r.json()["error"] == "prompt: Input should be a valid string"


def test_a_generation_through_ray_equals_the_single_process_server_and_in_process(cluster, local, paths, one_thread):
    via_ray, handoff = _generate(cluster, local, seed=5)
    assert not via_ray.degraded and handoff.attempts == 1
    app = build_app(paths["big"], name="cloud", vae=paths["vae"], token=TOKEN, limits=LIMITS)
    with ThreadedServer(app, limits=LIMITS) as server:
        via_server, _ = _generate(server.url, local, seed=5)
    here = local.start(PROMPT, steps=6, size=32, seed=5)
    local.run(here, PLAN)
    assert torch.equal(via_ray.latents, via_server.latents) and torch.equal(via_ray.latents, here.latents)
    assert [(s.model, s.where) for s in via_ray.provenance] == [("cloud", "cloud"), ("edge", "local")]


def test_a_full_deployment_answers_503_instead_of_queueing_without_bound(cluster):
    """2 replicas x 2 ongoing + 2 queued: of 12 long requests at once, 6 or more are refused at once."""
    statuses = []

    def send(i):
        body = {"prompt": PROMPT, "seed": i, "steps": 200, "cloud_steps": 200, "size": 32}
        with httpx.Client(timeout=300, headers=AUTH) as http:
            statuses.append(http.post(f"{cluster}/v1/trajectories", json=body).status_code)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # at most what the replicas take and the router holds is served; the rest is refused at once, not queued
    assert 1 <= statuses.count(200) <= 2 * 2 + 2 and set(statuses) == {200, 503}, statuses


def test_a_replica_killed_mid_run_loses_no_request(cluster, local, one_thread):
    long = parse_plan("cloud:190,edge:2")  # over a second on the cloud: long enough to be cut
    reference = {seed: _generate(cluster, local, seed, plan=long)[0].latents for seed in range(4)}
    results, errors = {}, []

    def user(seed):
        try:
            results[seed] = _generate(cluster, local, seed, tries=6, plan=long)
        except Exception as e:  # noqa: BLE001 - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=user, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    victim = replicas.replica_pids()[0]
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join()
    assert not errors and sorted(results) == list(range(4))
    for seed, (traj, _) in results.items():
        assert not traj.degraded and torch.equal(traj.latents, reference[seed])
    assert any(handoff.attempts > 1 for _, handoff in results.values())  # some were cut, and ran again
    deadline = time.monotonic() + 60  # Ray Serve replaces the dead replica
    while time.monotonic() < deadline and (len(replicas.replica_pids()) < 2 or victim in replicas.replica_pids()):
        time.sleep(0.5)
    assert len(replicas.replica_pids()) == 2 and victim not in replicas.replica_pids()
