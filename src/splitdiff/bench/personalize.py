"""`splitdiff bench personalize`: the personalization curve PAI(n), measured.

For each shipped user and each T, K prompts written with the user's token start
from seeded noise; the shared (cloud) model runs them step by step and the
trajectories are kept after every step. For each n in 0..T the kept state after
T - n shared steps is finished with the user's adapter on the device model for the
last n steps: one shared prefix, T + 1 suffixes, the same bits as T + 1 separate
runs. Each image is scored twice: is the concept there (the concept recognizer, at
the cell its prompt names), and how much of the rest of the prompt is (background,
and each base object's shape, colour and size). PAI(n) = presence x rest: a concept
bought by forgetting the world does not count.

The paper's curve 1/(1 + exp(-a(n - b))) is fitted per user and pooled, and so is a
four-parameter logistic lo + (hi - lo)/(1 + exp(-a(n - b))), which the paper's form
cannot follow when PAI(T) < 1 or PAI(0) > 0; both with R^2.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from . import write_csv
from ..errors import UserError

GRID_COLUMNS = 6


def logistic(n, a, b):
    return 1.0 / (1.0 + np.exp(-a * (n - b)))


def logistic4(n, a, b, lo, hi):
    return lo + (hi - lo) / (1.0 + np.exp(-a * (n - b)))


def fit(n: np.ndarray, pai: np.ndarray, steps: int) -> dict:
    """Both logistic fits of PAI against n, with R^2 (nan where a fit does not converge)."""
    from scipy.optimize import OptimizeWarning, curve_fit

    out = {}
    total = float(np.sum((pai - pai.mean()) ** 2)) or float("nan")
    for name, f, p0, bounds in (
            ("paper", logistic, (10 / steps, steps / 2), ([0, -steps], [np.inf, 2 * steps])),
            ("4p", logistic4, (10 / steps, steps / 2, pai.min(), pai.max()),
             ([0, -steps, -0.5, 0], [np.inf, 2 * steps, 1, 1.5]))):
        try:
            with warnings.catch_warnings():  # a flat curve has no covariance; its R^2 says so
                warnings.simplefilter("ignore", OptimizeWarning)
                params, _ = curve_fit(f, n, pai, p0=p0, bounds=bounds, maxfev=20000)
        except (RuntimeError, ValueError):
            out.update({f"{name}_a": float("nan"), f"{name}_b": float("nan"), f"{name}_r2": float("nan")})
            continue
        resid = float(np.sum((pai - f(n, *params)) ** 2))
        out.update({f"{name}_a": float(params[0]), f"{name}_b": float(params[1]), f"{name}_r2": 1 - resid / total})
        if name == "4p":
            out.update({"4p_lo": float(params[2]), "4p_hi": float(params[3])})
    return out


def _prefixes(pipe, shared: str, prompts: list[str], seeds: list[int], steps: int, **options) -> list[list[bytes]]:
    """The trajectories after k shared steps, k = 0..steps, as bytes (bit-exact copies to branch from)."""
    from ..core.runner import advance

    trajs = pipe.start_many(prompts, seeds, steps=steps, **options)
    kept = [[t.to_bytes() for t in trajs]]
    for _ in range(steps):
        advance(pipe.unets[shared], trajs, 1, shared)
        kept.append([t.to_bytes() for t in trajs])
    return kept


def n_values(steps: int, every: int) -> list[int]:
    """0, every, 2*every, ... and T itself."""
    return sorted(set(range(0, steps + 1, every)) | {steps})


def measure_user(pipe, ref, reader, *, steps: int, k: int, shared: str, device: str, seed: int, every: int = 1,
                 **options) -> tuple[list[dict], dict[int, torch.Tensor]]:
    """One row per measured n for this user and T, and the first prompt's image per n (for the grid)."""
    from ..core.runner import advance, decode
    from ..core.trajectory import Trajectory
    from ..users.presence import concept_prompts, rest_of_prompt
    from ..world.concepts import parse_concept

    concept = parse_concept(ref.concept)
    scenes, prompts, seeds = concept_prompts(concept, ref.token, k, seed)
    kept = _prefixes(pipe, shared, prompts, seeds, steps, **options)
    rows, firsts = [], {}
    for n in n_values(steps, every):
        trajs = [Trajectory.from_bytes(b) for b in kept[steps - n]]
        if n:
            with pipe.adapters.applied(pipe.unets[device], ref.user) as applied:
                advance(pipe.unets[device], trajs, n, device, adapter=ref.user, adapter_sha256=applied.sha256)
        images = decode(pipe.vae, torch.cat([t.latents for t in trajs]))
        readings = reader.read(images)
        presence = float(np.mean(reader.presence(images, concept, scenes, readings)))
        rest = float(np.mean([rest_of_prompt(r, s) for r, s in zip(readings, scenes)]))
        rows.append(dict(user=ref.user, concept=ref.concept, steps=steps, n=n, share=n / steps, prompts=k,
                         presence=presence, rest=rest, pai=presence * rest))
        firsts[n] = images[0]
    return rows, firsts


def bench_personalize(out: Path, *, users: list[str] | None = None, steps: tuple[int, ...] = (25, 50), k: int = 32,
                      shared: str = "cloud", device: str = "edge", vae: str = "vae", seed: int = 0,
                      scheduler: str = "dpmsolver++", guidance: float = 5.0, size: int = 64,
                      every: dict[int, int] | None = None) -> list[dict]:
    """`every`: T -> the stride of measured n (default 1: every n)."""
    from ..eval.concepts import default_reader
    from ..hybrid.pipeline import load_pipeline
    from ..users.adapters import list_adapters
    from ..users.plans import AdapterSet

    names = users or list_adapters()
    if not names:
        raise UserError("no users' adapters to measure: train one with `splitdiff personalize`")
    out.mkdir(parents=True, exist_ok=True)
    adapters = AdapterSet()
    refs = [adapters.resolve(u) for u in names]
    for ref in refs:
        if not ref.concept or not ref.token:
            raise UserError(f"adapter {ref.user!r} has no training record naming its concept and token")
    pipe = load_pipeline({shared: shared, device: device}, vae)
    pipe.adapters = adapters
    reader = default_reader()
    rows, fits, grids = [], [], {}
    options = dict(scheduler=scheduler, guidance_scale=guidance, size=size)
    for t in steps:
        for ref in refs:
            user_rows, firsts = measure_user(pipe, ref, reader, steps=t, k=k, shared=shared, device=device,
                                             seed=seed, every=(every or {}).get(t, 1), **options)
            rows += user_rows
            grids[(ref.user, t)] = firsts
            n = np.array([r["n"] for r in user_rows], float)
            fits.append(dict(user=ref.user, steps=t, **fit(n, np.array([r["pai"] for r in user_rows]), t),
                             presence_n0=user_rows[0]["presence"], presence_nT=user_rows[-1]["presence"],
                             rest_n0=user_rows[0]["rest"], rest_nT=user_rows[-1]["rest"]))
            print(f"{ref.user} T={t}: presence {user_rows[0]['presence']:.2f} (n=0) -> "
                  f"{user_rows[-1]['presence']:.2f} (n=T), rest {user_rows[0]['rest']:.2f} -> "
                  f"{user_rows[-1]['rest']:.2f}, R2 paper {fits[-1]['paper_r2']:.3f} / 4p {fits[-1]['4p_r2']:.3f}")
        pooled = [r for r in rows if r["steps"] == t]
        fits.append(dict(user="pooled", steps=t, **fit(np.array([r["n"] for r in pooled], float),
                                                      np.array([r["pai"] for r in pooled]), t)))
    write_csv(out / "personalize.csv", rows)
    write_csv(out / "personalize_fit.csv", fits)
    _plot(out / "personalize.png", rows, fits, steps)
    _grid(out / "personalize_grid.png", grids, refs, steps[0])
    return rows


def _plot(path: Path, rows: list[dict], fits: list[dict], steps: tuple[int, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(steps), figsize=(5 * len(steps), 3.6), squeeze=False)
    for ax, t in zip(axes[0], steps):
        for f in (f for f in fits if f["steps"] == t and f["user"] != "pooled"):
            pts = [r for r in rows if r["steps"] == t and r["user"] == f["user"]]
            n = np.array([r["n"] for r in pts], float)
            line = ax.plot(n, [r["pai"] for r in pts], "o", ms=3, label=f"{f['user']} ({pts[0]['concept']})")[0]
            dense = np.linspace(0, t, 200)
            if np.isfinite(f["4p_a"]):
                ax.plot(dense, logistic4(dense, f["4p_a"], f["4p_b"], f["4p_lo"], f["4p_hi"]), "-",
                        color=line.get_color(), lw=1)
            if np.isfinite(f["paper_a"]):
                ax.plot(dense, logistic(dense, f["paper_a"], f["paper_b"]), ":", color=line.get_color(), lw=1)
        ax.set_title(f"T = {t} (points; 4-parameter fit solid, the paper's dotted)", fontsize=9)
        ax.set_xlabel("n: the last n of T steps with the user's adapter")
        ax.set_ylabel("PAI = presence x rest of prompt")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _grid(path: Path, grids: dict, refs, steps: int) -> None:
    from diffusers.utils import make_image_grid

    from ..core.runner import to_pil
    from ..io import atomic_save_image

    measured = sorted(next(iter(grids.values())))
    columns = sorted({min(measured, key=lambda n: abs(n - i * steps / (GRID_COLUMNS - 1))) for i in range(GRID_COLUMNS)})
    images = [to_pil(grids[(ref.user, steps)][n][None])[0].resize((128, 128)) for ref in refs for n in columns]
    atomic_save_image(make_image_grid(images, rows=len(refs), cols=len(columns)), path)
