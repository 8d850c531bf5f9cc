"""The cloud role past one process: replicas of the same server as a Ray Serve application.

Each replica is the single-process server's app (`build_app`: the same FastAPI routes,
OpenAPI, auth and one-line errors) around its own step-level batching engine and its
own admission planner; Ray Serve adds what one process lacks: several replicas on
several machines, a router, back-pressure and autoscaling. Nothing here forks the
engine: a replica builds the app exactly as `splitdiff serve` does.

Routing and back-pressure are Ray Serve's: a replica takes at most `max_ongoing`
requests at once (default twice its batch, so that its batches fill while finished
requests are answered), and the router holds at most `max_queued` more per
deployment; beyond that Ray answers 503, which clients retry after a jittered backoff
like the engine's own 503. A replica that dies takes its in-flight requests with it:
each is stateless between steps (the trajectory travels in the request and the
answer), so the client's retry runs it again on another replica, from the start.

Ray's own transport between its HTTP proxy and the replicas is Ray's (a trusted
cluster network); what clients send and receive is the same JSON and safetensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UserError

APP_NAME = "splitdiff"
DEPLOYMENT = "cloud"


@dataclass(frozen=True)
class RayOptions:
    """How the cloud role runs on Ray Serve."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; None: a fixed `replicas`
    address: str | None = None  # a Ray cluster to join; None: start one on this machine
    cpus: float = 1.0  # CPUs each replica reserves (its torch threads)
    gpus: float = 0.0  # GPUs each replica reserves: Ray shows a replica only the GPUs it reserved
    max_ongoing: int | None = None  # requests a replica takes at once (default: twice its max batch)
    max_queued: int = 256  # requests the router holds beyond them before answering 503

    def check(self) -> "RayOptions":
        if self.replicas < 1:
            raise UserError(f"--replicas must be at least 1, not {self.replicas}")
        if self.autoscale is not None and not 0 <= self.autoscale[0] <= self.autoscale[1] >= 1:
            raise UserError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, not {self.autoscale}")
        if not self.cpus > 0:
            raise UserError(f"--replica-cpus must be positive, not {self.cpus}")
        if not self.gpus >= 0:
            raise UserError(f"--replica-gpus must be 0 or more, not {self.gpus}")
        return self


def parse_autoscale(text: str | None) -> tuple[int, int] | None:
    """'1:4' -> (1, 4); a one-line error for anything else."""
    if text is None:
        return None
    lo, sep, hi = text.partition(":")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise UserError(f"--autoscale {text!r} is not MIN:MAX, e.g. 1:4")
    return int(lo), int(hi)


class CloudReplica:
    """One replica: the single-process server's app, built in the replica's process.

    It computes with `threads` torch threads: CPU kernels' results depend on the thread
    count, so a replica equals a single-process server bit for bit at the same count.
    """

    def __init__(self, build: dict, threads: int):
        import torch

        from .server import build_app

        torch.set_num_threads(threads)
        self.server_app = build_app(**build)  # (`app` is the ingress wrapper's own)

    def __serve_build_asgi_app__(self):
        return self.server_app


def application(build: dict, options: RayOptions):
    """The Ray Serve application: `build` (build_app's keyword arguments) for every replica."""
    from ray import serve

    from .server import Limits

    max_batch = (build.get("limits") or Limits()).max_batch
    scale = {"num_replicas": options.replicas} if options.autoscale is None else {
        "autoscaling_config": {"min_replicas": options.autoscale[0], "max_replicas": options.autoscale[1],
                               "target_ongoing_requests": max_batch}}
    threads = max(1, int(options.cpus))
    deployment = serve.deployment(
        serve.ingress()(CloudReplica), name=DEPLOYMENT, max_ongoing_requests=options.max_ongoing or 2 * max_batch,
        max_queued_requests=options.max_queued, health_check_period_s=2, graceful_shutdown_timeout_s=5,
        ray_actor_options={"num_cpus": options.cpus, "num_gpus": options.gpus,
                           "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}},
        **scale)
    return deployment.bind(build, threads)


def init_ray(options: RayOptions) -> None:
    """Join the cluster at `options.address`, or start one on this machine (once per process)."""
    import ray

    options.check()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                 **({} if options.address else {"object_store_memory": 256 * 1024 * 1024}))


def start(build: dict, options: RayOptions, host: str, port: int) -> None:
    """Start (or join) Ray, and the application on http://host:port; returns once its replicas answer."""
    from ray import serve

    init_ray(options)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(build, options), name=APP_NAME, route_prefix="/", blocking=False)


def check_installed() -> None:
    """Ray Serve is an optional extra: its absence is one line, not a traceback."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UserError("--engine ray needs Ray Serve: pip install 'splitdiff[ray]'")


def serve_forever(build: dict, options: RayOptions, host: str, port: int) -> None:
    """`splitdiff serve --engine ray`: start, then hold until SIGINT or SIGTERM, then take it all down."""
    import signal
    import threading

    check_installed()
    done = threading.Event()
    try:
        init_ray(options)
        # after ray.init, which installs handlers of its own that end the process with a crash report
        old = {sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        start(build, options, host, port)
        print(f"splitdiff serving on http://{host}:{port} with Ray Serve "
              f"({'autoscaling %d..%d' % options.autoscale if options.autoscale else f'{options.replicas} replicas'})",
              flush=True)
        done.wait()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    finally:
        stop()


def stop() -> None:
    """Take the application down, and Ray with it when this process started Ray."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def replica_pids() -> list[int]:
    """The process ids of this machine's replicas of the application (Ray titles them
    `ray::ServeReplica:APP:DEPLOYMENT`): to watch them, or to kill one in a test."""
    import psutil

    title = f"ServeReplica:{APP_NAME}:{DEPLOYMENT}"
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if cmdline and title in cmdline[0]:
            pids.append(proc.pid)
    return sorted(pids)
