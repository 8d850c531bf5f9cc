"""`splitdiff bench users`: admission end to end on loopback, the planner against FIFO, all-offload and all-local.

A real server (`splitdiff serve --admission POLICY`, a child process, one per policy)
and simulated users, each with a device speed, an alpha and an arrival time. A
device's speed is simulated by pacing: its steps are the edge model's real steps, each
padded with sleep to the device's per-step time. Users arrive in waves (a wave's
arrivals spread over part of one scheduling window) and every policy sees the same
users and arrivals. Each user runs its generation end to end with `run_with_cloud`:
the cloud's part over HTTP, the rest here on the edge model, then the decode.

Per user: the decision, the split, PAI, the latency the server predicted when it
decided (its latency model with its live profile) and the latency measured from
sending the request to the last denoising step (the decode is left out of both: the
model does not contain it, and every policy pays it alike). The devices stand for other
machines, so their threads run at a lower priority than the server. Per policy: the realised
objective sum(alpha PAI(n)) - sum(L) with the measured latencies, beside the
predicted one.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np

from . import write_csv
from ..errors import UserError
from ..users.pai import MEASURED as MEASURED_PAI, pai
from .serve import ServerProcess, _edge_vae, scrape

POLICIES = ("planner", "fifo", "all-offload", "all-local")
DEVICE_TAUS = (0.12, 0.15, 0.19, 0.24, 0.30, 0.37, 0.46, 0.56)  # seconds per step, eight device classes
ALPHA_RANGE = (0.5, 3.0)  # splitdiff's scenario family (users.planner.families)
TOLERANCE = 0.15
DEVICE_NICE = 5


@dataclass
class SimUser:
    id: str
    tau: float
    alpha: float
    arrival: float  # seconds after the run's start
    wave: int
    prompt: str
    seed: int
    adapter: str | None = None  # the user's own adapter for the device's steps (None: the base edge U-Net)


def draw_users(n: int, waves: int, gap: float, spread: float, seed: int,
               adapters: dict[str, tuple[str, str]] | None = None) -> list[SimUser]:
    """n users over `waves` waves `gap` seconds apart; every device class in turn, shuffled, alphas uniform.

    `adapters` (name -> (concept, token)) are handed out in turn, and each user's prompt
    then shows its concept, written with its token; without, prompts of the base world.
    """
    import random

    from ..world import prompt_set
    from ..world.concepts import concept_prompt, parse_concept, sample_concept_scene

    rng = np.random.default_rng(seed)
    taus = np.resize(np.array(DEVICE_TAUS), n)[rng.permutation(n)]
    alphas = rng.uniform(*ALPHA_RANGE, size=n)
    per_wave = math.ceil(n / waves)
    offsets = rng.uniform(0, spread, size=n)
    names = sorted(adapters or {})
    owned = [names[i % len(names)] if names else None for i in range(n)]
    prompts = prompt_set(n)
    for i, name in enumerate(owned):
        if name is not None and all(adapters[name]):
            concept, token = adapters[name]
            parsed = parse_concept(concept)
            prompts[i] = concept_prompt(sample_concept_scene(random.Random(seed * 1009 + i), parsed), parsed, token)
    return [SimUser(f"u{i:02d}", float(taus[i]), float(alphas[i]), (i // per_wave) * gap + float(offsets[i]),
                    i // per_wave, prompts[i], i, owned[i]) for i in range(n)]


class Pacer:
    """on_step for one simulated device: its k-th step ends no sooner than k * tau after the device began.

    The clock starts when the device gets its trajectory (the cloud's steps reported, or
    a local start after a refusal), so the device's part takes n * tau, as the model says.
    The schedule is absolute: a step that the shared host ran late is made up by the
    next steps' shorter sleeps, as a device's own steps would not have been late.
    """

    def __init__(self, tau: float, cloud: str):
        self.tau, self.cloud = tau, cloud
        self.begin, self.count = time.perf_counter(), 0
        self.late = 0  # steps that ended after their time (the host was busy)

    def start(self) -> None:
        self.begin, self.count = time.perf_counter(), 0

    def __call__(self, model: str, _k: int) -> None:
        if model == self.cloud:
            self.start()
            return
        self.count += 1
        left = self.begin + self.count * self.tau - time.perf_counter()
        if left > 0:
            time.sleep(left)
        else:
            self.late += 1


class Devices:
    """The simulated devices' edge pipeline (the text encoder behind a lock), one U-Net per adapter.

    A real device holds its own U-Net with its own adapter. Here the devices are threads
    of one process, and putting an adapter on or off a U-Net changes that module; so each
    adapter gets its own copy of the edge U-Net with the adapter loaded and active for
    good, which the users of that adapter share (inference only reads it).
    """

    def __init__(self, edge_model: str, vae: str | None, adapters: list[str] = (), resolved=None):
        """`resolved`: the users.plans.AdapterSet the names resolve in (default: a new one)."""
        import copy

        from ..hybrid.pipeline import load_pipeline
        from ..users.adapters import load_adapter, use_adapter
        from ..users.plans import AdapterSet

        self.pipe = load_pipeline({"edge": edge_model}, vae or _edge_vae())
        self._lock = threading.Lock()
        self._local = threading.local()
        start = self.pipe.start

        def locked_start(*args, **kw):
            with self._lock:  # HF fast tokenizers must not be used from two threads at once
                traj = start(*args, **kw)
            pacer = getattr(self._local, "pacer", None)
            if pacer is not None:
                pacer.start()
            return traj

        self.pipe.start = locked_start
        decode = self.pipe.decode

        def locked_decode(traj):
            with self._lock:
                return decode(traj)

        self.pipe.decode = locked_decode
        self.pipes = {None: self.pipe}
        resolved = resolved or AdapterSet()
        for name in adapters:
            unet = copy.deepcopy(self.pipe.unets["edge"])
            ref = resolved.resolve(name)
            load_adapter(unet, ref)
            use_adapter(unet, ref)
            pipe = copy.copy(self.pipe)  # the same encoder, VAE and locks; its own U-Net
            pipe.unets, pipe.adapters = {"edge": unet}, resolved
            self.pipes[name] = pipe

    def run(self, user: SimUser, url: str, steps: int, size: int, cloud_steps: int) -> dict:
        from ..core.plan import PlanSegment
        from ..serve.client import CloudClient
        from ..serve.edge import run_with_cloud

        plan = (PlanSegment("cloud", cloud_steps), PlanSegment("edge", steps - cloud_steps, adapter=user.adapter))
        pipe = self.pipes[user.adapter]
        pacer = Pacer(user.tau, "cloud")
        self._local.pacer = pacer
        warnings = []
        block = {"id": user.id, "device_step_seconds": user.tau, "alpha": user.alpha}
        start = time.perf_counter()
        with CloudClient(url, timeout=600, tries=1) as client:
            traj, handoff = run_with_cloud(pipe, plan, client, user.prompt, steps=steps, size=size,
                                           seed=user.seed, user=block, on_step=pacer, warn=warnings.append)
        measured = time.perf_counter() - start
        t = time.perf_counter()
        self.pipe.decode(traj)
        decode = time.perf_counter() - t
        cloud = sum(s.end - s.start for s in traj.provenance if s.where == "cloud")
        d = (handoff.decision if handoff is not None else None) or {}
        exchange = handoff.round_trip if handoff is not None else float("nan")
        served = handoff.server_seconds if handoff is not None else float("nan")
        return {"decision": d.get("decision", "none"), "policy_used": d.get("policy", ""), "cloud_steps": cloud,
                "exchange_s": exchange, "server_s": served,
                "server_steps_s": handoff.step_seconds if handoff is not None else float("nan"),
                "device_steps": steps - cloud, "predicted_s": float(d.get("predicted_seconds", float("nan"))),
                "measured_s": measured, "decode_s": decode, "late_steps": pacer.late, "degraded": traj.degraded,
                "warning": "; ".join(warnings)}


def _yield_to_server() -> None:
    """Lower this thread's priority (Linux applies nice to the calling thread alone).

    The devices stand for other machines, so their steps should take as little of the
    server's CPU as can be; the pacing's absolute schedule makes up for steps that the
    lower priority delays.
    """
    try:
        os.nice(DEVICE_NICE)
    except OSError:
        pass


def run_policy(policy: str, users: list[SimUser], devices: Devices, out: Path, *, model: str, vae: str | None,
               steps: int, size: int, window: float, capacity: int, cloud_steps: int, gap: float,
               curve: tuple[float, float] = MEASURED_PAI, echo=print) -> tuple[list, dict]:
    """The same users and arrivals against a server with this admission policy; (per-user rows, totals).

    The first wave is played once unscored, `gap` seconds before the scored run: a fresh
    server's profile is its idle start-up warm-up, and a running server's is the live
    one its own traffic made.
    """
    warm = [replace(u, id=f"warm-{u.id}", wave=-1) for u in users if u.wave == 0]
    users = [replace(u, arrival=u.arrival + gap) for u in users]
    extra = ("--admission", policy, "--window", str(window), "--capacity", str(capacity),
             "--pai", f"{curve[0]},{curve[1]}", "--planner-timeout", "2")
    rows: list[dict] = []
    with ServerProcess(model, vae, max(capacity, 8), out / "server.log", extra=extra,
                       env={"OMP_NUM_THREADS": "1"}) as server:
        before = httpx.get(f"{server.url}/v1/profile", timeout=10).json()
        t0 = time.perf_counter() + 0.5

        def one(u: SimUser) -> None:
            _yield_to_server()
            time.sleep(max(0.0, t0 + u.arrival - time.perf_counter()))
            try:
                got = devices.run(u, server.url, steps, size, cloud_steps)
            except Exception as e:  # a user's failure is a row, not the end of the run
                got = {"decision": "error", "warning": f"{type(e).__name__}: {e}"}
            n = got.get("device_steps", steps)
            measured = got.get("measured_s", float("nan"))
            rows.append({"policy": policy, "user": u.id, "wave": u.wave, "tau_s": u.tau, "alpha": u.alpha,
                         "adapter": u.adapter or "", "arrival_s": u.arrival, **got, "pai": pai(n, curve),
                         "error": (got.get("predicted_s", float("nan")) - measured) / measured,
                         "value": u.alpha * pai(n, curve) - measured})

        threads = [threading.Thread(target=one, args=(u,)) for u in warm + users]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = httpx.get(f"{server.url}/v1/profile", timeout=10).json()
        metrics = scrape(server.url)
    rows = sorted((r for r in rows if r["wave"] >= 0), key=lambda r: r["user"])
    for r in rows:
        r["arrival_s"] -= gap
    ok = [r for r in rows if r["decision"] in ("grant", "deny")]
    totals = {
        "policy": policy, "users": len(rows), "granted": sum(r["decision"] == "grant" for r in rows),
        "objective": sum(r["value"] for r in rows),
        "objective_predicted": sum(r["alpha"] * r["pai"] - r["predicted_s"] for r in ok),
        "mean_latency_s": float(np.mean([r["measured_s"] for r in ok])) if ok else float("nan"),
        "mean_pai": float(np.mean([r["pai"] for r in ok])) if ok else float("nan"),
        "max_abs_error": max((abs(r["error"]) for r in ok), default=float("nan")),
        "within_15pct": sum(abs(r["error"]) <= TOLERANCE for r in ok),
        "fallbacks": sum(v for k, v in metrics.items() if k.startswith("splitdiff_admission_fallbacks_total")),
        "k_e_start": before["k_e"], "h_e_start": before["h_e"], "overhead_start_s": before["overhead_s"],
        "k_e_end": after["k_e"], "h_e_end": after["h_e"], "overhead_end_s": after["overhead_s"],
        "profile_samples": after["samples"],
    }
    echo(f"{policy}: objective {totals['objective']:.3f} (predicted {totals['objective_predicted']:.3f}), "
         f"{totals['granted']}/{len(rows)} granted, |error| <= {100 * totals['max_abs_error']:.1f}%, "
         f"profile k_e {after['k_e']:.4f} h_e {after['h_e']:.4f}")
    return rows, totals


def _plots(out: Path, rows: list[dict], totals: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    top = max([r["measured_s"] for r in rows if r["decision"] in ("grant", "deny")] + [1.0]) * 1.1
    xs = np.linspace(0, top, 50)
    a.plot(xs, xs, "k-", lw=0.8)
    a.fill_between(xs, xs * (1 - TOLERANCE), xs * (1 + TOLERANCE), color="0.85", label="±15%")
    for policy, marker in zip(POLICIES, "osD^"):
        pts = [r for r in rows if r["policy"] == policy and r["decision"] in ("grant", "deny")]
        if pts:
            a.scatter([r["measured_s"] for r in pts], [r["predicted_s"] for r in pts], marker=marker, s=22,
                      label=policy)
    a.set(xlabel="measured latency (s)", ylabel="predicted latency (s)", title="each user: predicted vs measured",
          xlim=(0, top), ylim=(0, top))
    a.legend(fontsize=8)
    names = [t["policy"] for t in totals]
    x = np.arange(len(names))
    b.bar(x - 0.2, [t["objective"] for t in totals], 0.4, label="realised (measured latency)")
    b.bar(x + 0.2, [t["objective_predicted"] for t in totals], 0.4, label="predicted (the model's latency)",
          alpha=0.6)
    b.axhline(0, color="k", lw=0.8)
    b.set_xticks(x, names)
    b.set(ylabel="sum alpha PAI(n) - sum L", title="objective by policy (same users, same arrivals)")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "users.png", dpi=120)
    plt.close(fig)

    planner = sorted((r for r in rows if r["policy"] == "planner"), key=lambda r: (r["tau_s"], r["alpha"]))
    if planner:
        fig, ax = plt.subplots(figsize=(8, 4))
        x = np.arange(len(planner))
        cloud = [r["cloud_steps"] for r in planner]
        ax.bar(x, cloud, color="tab:green", label="on the server (T - n)")
        ax.bar(x, [r["device_steps"] for r in planner], bottom=cloud, color="tab:blue", alpha=0.6,
               label="on the device (n)")
        ax.set_xticks(x, [f"{r['user']}\n{1000 * r['tau_s']:.0f} ms\nα {r['alpha']:.1f}\n{r['decision']}"
                          for r in planner], fontsize=7)
        ax.set(ylabel="steps", title="the planner's decisions, users by device speed")
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(out / "users_splits.png", dpi=120)
        plt.close(fig)


def bench_users(out: Path, *, model: str = "cloud", edge_model: str = "edge", vae: str | None = None,
                users: int = 12, waves: int = 2, gap: float = 15.0, window: float = 0.5, capacity: int = 3,
                steps: int = 25, size: int = 64, cloud_steps: int = 10, policies: str = ",".join(POLICIES),
                seed: int = 0, adapters: list[str] | None = None, curve: tuple[float, float] = MEASURED_PAI,
                echo=print) -> dict:
    """Every policy on the same users and arrivals; CSVs and PNGs under `out`.

    `adapters`: the users' adapters, handed out in turn (None: every installed one; []: none).
    """
    from ..users.adapters import list_adapters
    from ..users.plans import AdapterSet

    import torch

    chosen = [p.strip() for p in policies.split(",") if p.strip()]
    bad = [p for p in chosen if p not in POLICIES]
    if bad or not chosen:
        raise UserError(f"--policies must be some of {', '.join(POLICIES)}")
    if users < 1 or waves < 1 or not 1 <= cloud_steps < steps:
        raise UserError("--users and --waves must be >= 1 and --cloud-steps within 1..steps-1")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # many devices in one process: spinning threads would slow every step
    names = list_adapters() if adapters is None else list(adapters)
    refs = AdapterSet()
    owned = {name: (refs.resolve(name).concept, refs.resolve(name).token) for name in names}
    sim = draw_users(users, waves, gap, 0.6 * window, seed, owned)
    devices = Devices(edge_model, vae, names, refs)
    from ..core.runner import advance

    warm = devices.pipe.start(sim[0].prompt, steps=steps, size=size)  # first calls pay for allocations
    advance(devices.pipe.unets["edge"], [warm], 2, "edge")
    all_rows, totals = [], []
    for policy in chosen:
        rows, total = run_policy(policy, sim, devices, out, model=model, vae=vae, steps=steps, size=size,
                                 window=window, capacity=capacity, cloud_steps=cloud_steps, gap=gap, curve=curve,
                                 echo=echo)
        all_rows += rows
        totals.append(total)
    write_csv(out / "users.csv", all_rows)
    write_csv(out / "users_totals.csv", totals)
    _plots(out, all_rows, totals)
    return {"rows": all_rows, "totals": totals}
