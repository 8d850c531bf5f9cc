"""`splitdiff bench serve`: the cloud server under concurrent clients, over loopback HTTP.

For each client count, clients send trajectory requests back to back for a fixed
time, against a batching server and against one with `--max-batch 1`: images/s,
p50/p99 latency, the server's own mean batch size (from /metrics), handoff bytes and
the handoff's share of a request. One client then runs whole hybrid generations
(the cloud's segment over HTTP, the edge's segment and the decode here) for the
handoff's share of end-to-end time. Last, a load run of 32 clients records errors
and the server's memory over time. The server is a separate process, as in use.
"""

from __future__ import annotations

import itertools
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from . import write_csv
from ..errors import UserError

START_TIMEOUT = 300.0
LOAD_CLIENTS = 32


# -- the server under test ------------------------------------------------------------
class ServerProcess:
    """`splitdiff serve` in a child process on a free loopback port."""

    def __init__(self, model: str, vae: str | None, max_batch: int, log: Path, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "splitdiff", "serve", "--model", model, "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-waiting", "1024", "--log-level", "warning"]
        self.cmd = cmd + (["--vae", vae] if vae else []) + list(extra)
        self.log = log
        self.env = dict(env or {})

    def __enter__(self) -> "ServerProcess":
        env = {**{k: v for k, v in os.environ.items() if k != "SPLITDIFF_TOKEN"}, **self.env}
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"the server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise UserError(f"the server did not start in {START_TIMEOUT:.0f} s; see {self.log}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def rss_mib(self) -> float:
        import psutil

        try:
            return psutil.Process(self.proc.pid).memory_info().rss / 2 ** 20
        except psutil.Error:
            return float("nan")


def scrape(url: str) -> dict[str, float]:
    """The server's metrics as {sample name{labels}: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# -- clients --------------------------------------------------------------------------
@dataclass
class Sample:
    start: float
    end: float
    status: int  # 0: no answer (transport error)
    received: int = 0
    server_s: float = 0.0
    serialize_s: float = 0.0
    server: str = ""  # which process answered (a replica)
    mean_batch: float = float("nan")  # the mean batch of the U-Net calls that ran it

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def handoff_s(self) -> float:
        """Serialization on the server and the transfer (everything but queueing and steps)."""
        return self.serialize_s + max(0.0, self.latency - self.server_s)


class Requests:
    """Varied requests: the world's prompts, a new seed each time."""

    def __init__(self, steps: int, cloud_steps: int, size: int, n_prompts: int = 64):
        from ..world import prompt_set

        self.prompts, self.counter = prompt_set(n_prompts), itertools.count()
        self.common = dict(steps=steps, cloud_steps=cloud_steps, size=size)

    def __call__(self) -> dict:
        i = next(self.counter)
        return dict(prompt=self.prompts[i % len(self.prompts)], seed=i, **self.common)


def _client(url: str, deadline: float, make: Requests, samples: list[Sample], headers: dict | None = None) -> None:
    with httpx.Client(timeout=300, headers=headers) as http:
        while time.perf_counter() < deadline:
            body, start = make(), time.perf_counter()
            try:
                r = http.post(f"{url}/v1/trajectories", json=body)
            except httpx.TransportError:
                samples.append(Sample(start, time.perf_counter(), 0))
                continue
            h = r.headers
            samples.append(Sample(start, time.perf_counter(), r.status_code, len(r.content),
                                  float(h.get("X-Splitdiff-Server-Seconds", 0)),
                                  float(h.get("X-Splitdiff-Serialize-Seconds", 0)), h.get("X-Splitdiff-Server", ""),
                                  float(h.get("X-Splitdiff-Mean-Batch", "nan"))))


def drive(url: str, clients: int, seconds: float, make: Requests,
          headers: dict | None = None) -> tuple[list[Sample], float]:
    """`clients` threads sending back to back for `seconds`; (samples, wall seconds until all are answered)."""
    samples: list[Sample] = []  # list.append is atomic
    start = time.perf_counter()
    threads = [threading.Thread(target=_client, args=(url, start + seconds, make, samples, headers))
               for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return samples, time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def concurrency_point(server: ServerProcess, clients: int, seconds: float, make: Requests,
                      headers: dict | None = None) -> dict:
    before = scrape(server.url)
    samples, wall = drive(server.url, clients, seconds, make, headers)
    after = scrape(server.url)
    ok = [s for s in samples if s.status == 200]
    calls = after["splitdiff_batch_size_count"] - before["splitdiff_batch_size_count"]
    batched = after["splitdiff_batch_size_sum"] - before["splitdiff_batch_size_sum"]
    latency = [s.latency for s in ok]
    servers = sorted({s.server for s in ok})
    per_server = [statistics.fmean(s.mean_batch for s in ok if s.server == name) for name in servers]
    return {
        "clients": clients, "requests": len(samples), "errors": len(samples) - len(ok),
        "servers": len(servers), "batch_per_server": " ".join(f"{b:.2f}" for b in per_server),
        "images_per_s": len(ok) / wall, "p50_s": _percentile(latency, 0.5), "p99_s": _percentile(latency, 0.99),
        "mean_batch": batched / calls if calls else float("nan"),
        "handoff_bytes": statistics.fmean(s.received for s in ok) if ok else float("nan"),
        "handoff_share": (sum(s.handoff_s for s in ok) / sum(latency)) if ok else float("nan"),
    }


def load_run(server: ServerProcess, seconds: float, make: Requests, every: float = 1.0) -> list[dict]:
    """32 clients for `seconds`; one row per `every` seconds: answers, errors, queue depth, server memory."""
    samples: list[Sample] = []
    start = time.perf_counter()
    threads = [threading.Thread(target=_client, args=(server.url, start + seconds, make, samples))
               for _ in range(LOAD_CLIENTS)]
    for t in threads:
        t.start()
    rows = []
    while any(t.is_alive() for t in threads):
        time.sleep(every)
        now, done = time.perf_counter(), list(samples)
        try:
            queue = scrape(server.url).get("splitdiff_queue_depth", float("nan"))
        except httpx.HTTPError:
            queue = float("nan")
        rows.append({"t_s": now - start, "answered": sum(s.status == 200 for s in done),
                     "errors": sum(s.status != 200 for s in done), "queue_depth": queue,
                     "rss_mib": server.rss_mib()})
    for t in threads:
        t.join()
    return rows


def end_to_end(url: str, edge_model: str, vae: str | None, *, steps: int, cloud_steps: int, size: int,
               n: int = 3) -> dict:
    """Whole hybrid generations by one client: the handoff's share of the end-to-end time."""
    from ..core.plan import PlanSegment
    from ..hybrid.pipeline import load_pipeline
    from ..serve.client import CloudClient
    from ..serve.edge import run_with_cloud
    from ..world import prompt_set

    pipe = load_pipeline({"edge": edge_model}, vae or _edge_vae())
    plan = (PlanSegment("cloud", cloud_steps), PlanSegment("edge", steps - cloud_steps))
    totals, handoffs, sizes = [], [], []
    with CloudClient(url, tries=1) as client:
        for i, prompt in enumerate(prompt_set(n)):
            start = time.perf_counter()
            traj, handoff = run_with_cloud(pipe, plan, client, prompt, steps=steps, seed=i, size=size)
            pipe.decode(traj)
            totals.append(time.perf_counter() - start)
            handoffs.append(handoff.seconds)
            sizes.append(handoff.received_bytes)
    return {"images": n, "end_to_end_s": statistics.fmean(totals), "handoff_s": statistics.fmean(handoffs),
            "handoff_share": sum(handoffs) / sum(totals), "handoff_bytes": statistics.fmean(sizes)}


class UnetCeiling:
    """images/s the cloud's U-Net alone allows at a batch size: batch / (cloud steps x one batched call).

    The call is the server's (guided_noise: classifier-free guidance rows included, one call
    per step), timed in this process, best of `repeats`, just before the point it bounds, so
    that both see the same machine (a shared CPU drifts by tens of percent in minutes).
    """

    def __init__(self, model: str, vae: str | None, *, steps: int, cloud_steps: int, size: int, repeats: int = 5,
                 device: str = "cpu", dtype: str = "fp32"):
        from ..core.devices import parse_dtype, resolve_device
        from ..hybrid.pipeline import load_pipeline
        from ..serve.worker import default_vae

        pipe = load_pipeline({"cloud": model}, vae or default_vae(model), parse_dtype(dtype))
        self.pipe = pipe.to(resolve_device(device))
        self.steps, self.cloud_steps, self.size, self.repeats = steps, cloud_steps, size, repeats

    def __call__(self, batch: int) -> float:
        from ..core.runner import guided_noise
        from ..world import prompt_set

        unet = self.pipe.unets["cloud"]
        trajs = self.pipe.start_many(prompt_set(batch), list(range(batch)), steps=self.steps, size=self.size)
        guided_noise(unet, trajs)  # warm-up
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            guided_noise(unet, trajs)
            times.append(time.perf_counter() - start)
        return batch / (self.cloud_steps * min(times))


def _edge_vae() -> str:
    from ..core.registry import WEIGHTS_DIR

    return "tiny-decoder" if (WEIGHTS_DIR / "tiny-decoder" / "config.json").exists() else "vae"


# -- output ---------------------------------------------------------------------------
def _plots(out: Path, points: list[dict], load: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for batch in sorted({p["max_batch"] for p in points}, reverse=True):
        rows = [p for p in points if p["max_batch"] == batch]
        xs = [r["clients"] for r in rows]
        a.plot(xs, [r["images_per_s"] for r in rows], "o-", label=f"max batch {batch}")
        b.plot(xs, [r["p50_s"] for r in rows], "o-", label=f"p50, max batch {batch}")
        b.plot(xs, [r["p99_s"] for r in rows], "s--", label=f"p99, max batch {batch}")
    for ax, title, ylabel in ((a, "throughput", "images / s"), (b, "latency", "seconds")):
        ax.set(xscale="log", xlabel="concurrent clients", ylabel=ylabel, title=title)
        ax.set_xticks([p["clients"] for p in points], [str(p["clients"]) for p in points])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "serve_concurrency.png", dpi=120)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    t = [r["t_s"] for r in load]
    a.plot(t, [r["answered"] for r in load], label="answered")
    a.plot(t, [r["errors"] for r in load], label="errors")
    a.set(xlabel="seconds", ylabel="requests (cumulative)", title=f"load: {LOAD_CLIENTS} clients")
    a.legend()
    b.plot(t, [r["rss_mib"] for r in load], color="tab:red")
    b.set(xlabel="seconds", ylabel="server RSS (MiB)", title="server memory")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "serve_load.png", dpi=120)
    plt.close(fig)


def _parse_counts(text: str, option: str, example: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; a one-line error naming `option` for anything else."""
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise UserError(f"{option} {text!r} must be positive integers, e.g. {example}")
    return counts


def bench_serve(out: Path, *, model: str = "cloud", vae: str | None = None, edge_model: str | None = None,
                clients: str = "1,4,16,32", seconds: float = 20.0, load_seconds: float = 60.0, max_batch: int = 32,
                steps: int = 25, cloud_steps: int = 10, size: int = 64, device: str = "cpu",
                dtype: str = "fp32", replicas: str | None = None, replica_cpus: float = 1.0) -> dict:
    """Run every part; write CSVs and PNGs under `out`; return the figures.

    `device` and `dtype` place the served model and the ceiling's (the clients and the
    end-to-end runs' edge side stay on the CPU, as a device would be). `replicas`
    ("1,2") adds, in the same run, the Ray Serve engine at each replica count.
    """
    levels = _parse_counts(clients, "--clients", "1,4,16,32")
    counts = _parse_counts(replicas, "--replicas", "1,2") if replicas else []
    if not 1 <= cloud_steps <= steps:
        raise UserError(f"--cloud-steps must be 1..{steps}, not {cloud_steps}")
    out.mkdir(parents=True, exist_ok=True)
    make = Requests(steps, cloud_steps, size)
    points, load, e2e, ray_points = [], [], None, []
    ceiling = UnetCeiling(model, vae, steps=steps, cloud_steps=cloud_steps, size=size, device=device, dtype=dtype)
    placement = ("--device", device, "--dtype", dtype)
    for batch in (max_batch, 1):
        with ServerProcess(model, vae, batch, out / "server.log", extra=placement) as server:
            httpx.post(f"{server.url}/v1/trajectories", json=make(), timeout=300)  # warm-up
            for n in levels:
                bound = ceiling(min(n, max_batch)) if batch == max_batch else float("nan")
                row = {"max_batch": batch, **concurrency_point(server, n, seconds, make)}
                row["ceiling_images_per_s"], row["efficiency"] = bound, row["images_per_s"] / bound
                points.append(row)
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
            if batch == max_batch:
                if cloud_steps < steps:
                    e2e = end_to_end(server.url, edge_model or ("edge" if model == "cloud" else model), vae,
                                     steps=steps, cloud_steps=cloud_steps, size=size)
                    print("end to end:", " ".join(f"{k}={v:.4g}" for k, v in e2e.items()), flush=True)
                load = load_run(server, load_seconds, make)
                last = load[-1]
                print(f"load: {LOAD_CLIENTS} clients, {last['t_s']:.0f} s: {last['answered']} answered, "
                      f"{last['errors']} errors, server RSS {min(r['rss_mib'] for r in load):.0f}"
                      f"..{max(r['rss_mib'] for r in load):.0f} MiB", flush=True)
    for n in counts:
        ray = ("--engine", "ray", "--replicas", str(n), "--replica-cpus", f"{replica_cpus:g}")
        with ServerProcess(model, vae, max_batch, out / "server.log", extra=placement + ray) as server:
            httpx.post(f"{server.url}/v1/trajectories", json=make(), timeout=300)  # warm-up
            for level in levels:
                row = {"max_batch": max_batch, "engine": f"ray x{n}", **concurrency_point(server, level, seconds, make)}
                row["mean_batch"] = float("nan")  # /metrics is one replica's: batch_per_server has each one's
                ray_points.append(row)
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
    write_csv(out / "serve_concurrency.csv", points)
    if ray_points:
        write_csv(out / "serve_replicas.csv", [{**p, "engine": "local"} for p in points if p["max_batch"] == max_batch]
                  + ray_points)
    write_csv(out / "serve_load.csv", load)
    if e2e:
        write_csv(out / "serve_end_to_end.csv", [e2e])
    _plots(out, points, load)
    speedup = {n: _rate(points, max_batch, n) / _rate(points, 1, n) for n in levels}
    print("images/s, batching vs max batch 1: " + ", ".join(f"{n} clients {s:.2f}x" for n, s in speedup.items()))
    efficiency = {p["clients"]: p["efficiency"] for p in points if p["max_batch"] == max_batch}
    print("share of the U-Net ceiling: " + ", ".join(f"{n} clients {e:.1%}" for n, e in efficiency.items()))
    for n in counts:
        rates = [f"{p['clients']} clients {p['images_per_s']:.2f}" for p in ray_points if p["engine"] == f"ray x{n}"]
        print(f"images/s, Ray Serve with {n} replica(s): " + ", ".join(rates))
    return {"points": points, "load": load, "end_to_end": e2e, "speedup": speedup, "efficiency": efficiency,
            "replicas": ray_points}


def _rate(points: list[dict], batch: int, clients: int) -> float:
    return next(p["images_per_s"] for p in points if p["max_batch"] == batch and p["clients"] == clients)
