"""`splitdiff bench hybrid`: the Hybrid SD table on the Shapes world.

25 DPM-Solver++ steps split between the cloud and the edge U-Net, from cloud-only to
edge-only, on a fixed prompt set (single- and multi-object); adherence, FSD against
the world's own renders, and the U-Net seconds of each side; every row decoded with
the full VAE and again with the tiny decoder. The U-Nets and decoders run on the CPU or
a GPU (`device`); seconds are those of the device they ran on.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import write_csv
from ..core.plan import PlanSegment
from ..core.registry import load_vae
from ..core.runner import to_pil
from ..eval import Evaluator, default_evaluator, reference_renders
from ..hybrid.batch import decode_many, run_many
from ..hybrid.pipeline import load_pipeline
from ..io import atomic_save_image
from ..world import parse_prompt, prompt_set

STEPS = 25
CLOUD_STEPS = (25, 20, 15, 10, 5, 0)


def hybrid_plans(total: int, cloud_steps: tuple[int, ...]):
    plans = []
    for c in cloud_steps:
        segs = ([PlanSegment("cloud", c)] if c else []) + ([PlanSegment("edge", total - c)] if total - c else [])
        plans.append(tuple(segs))
    return plans


def adherence_by_objects(scores: list[float], n_objects: list[int]) -> dict[str, float]:
    """Mean adherence per object count: where the small model's semantic weakness shows."""
    groups: dict[int, list[float]] = {}
    for score, n in zip(scores, n_objects):
        groups.setdefault(n, []).append(score)
    return {f"adherence_{n}obj": sum(g) / len(g) for n, g in sorted(groups.items())}


def bench_hybrid(out_dir: Path, n_prompts: int = 500, size: int = 64, guidance: float = 5.0, batch_size: int = 50,
                 cloud: str = "cloud", edge: str = "edge", vae: str = "vae", tiny: str = "tiny-decoder",
                 seed: int = 0, grid_prompts: int = 6, steps: int = STEPS,
                 cloud_steps: tuple[int, ...] = CLOUD_STEPS, device: str = "cpu",
                 evaluator_weights: Path | None = None) -> list[dict]:
    """`evaluator_weights`: the recognizer to measure with (default: the shipped one)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline({"cloud": cloud, "edge": edge}, vae)
    decoders = {"full": pipe.vae, "tiny": load_vae(tiny)}
    for model in [*pipe.unets.values(), *decoders.values()]:
        model.to(device)  # the runner and the decoder follow their models; schedulers stay on the CPU
    evaluator = Evaluator(evaluator_weights) if evaluator_weights is not None else default_evaluator()
    prompts = prompt_set(n_prompts)
    reference = reference_renders(prompts, size, seed=10_000)
    n_objects = [len(parse_prompt(p).objects) for p in prompts]
    rows, grid = [], []
    for plan in hybrid_plans(steps, cloud_steps):
        start = time.perf_counter()
        res = run_many(pipe, prompts, plan, steps=steps, guidance_scale=guidance, size=size,
                       batch_size=batch_size, seed=seed)
        denoise_wall = time.perf_counter() - start
        on_cloud = sum(s.steps for s in plan if s.model == "cloud")
        for dec_name, dec in decoders.items():
            images, dec_s = decode_many(dec, res.latents)
            scores, adh = evaluator.adherence(images, prompts)
            row = {
                "plan": ",".join(f"{s.model}:{s.steps}" for s in plan), "decoder": dec_name,
                "cloud_steps": on_cloud, "cloud_share": on_cloud / steps, "adherence": adh,
                **adherence_by_objects(scores, n_objects), "fsd": evaluator.fsd(images, reference),
                "cloud_unet_s": res.unet_seconds.get("cloud", 0.0) / n_prompts,
                "edge_unet_s": res.unet_seconds.get("edge", 0.0) / n_prompts,
                "decode_s": dec_s / n_prompts,
            }
            row["end_to_end_s"] = row["cloud_unet_s"] + row["edge_unet_s"] + row["decode_s"]
            row["denoise_wall_s"] = denoise_wall / n_prompts
            rows.append(row)
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
            if dec_name == "full":
                grid.append(images[:grid_prompts])
    write_csv(out_dir / "hybrid.csv", rows)
    _plot(out_dir / "hybrid.png", rows)
    _grid(out_dir / "hybrid_grid.png", grid, [r["plan"] for r in rows if r["decoder"] == "full"])
    return rows


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for dec, style in (("full", "o-"), ("tiny", "s--")):
        sel = [r for r in rows if r["decoder"] == dec]
        x = [r["cloud_share"] for r in sel]
        axes[0].plot(x, [r["adherence"] for r in sel], style, label=f"{dec} decoder")
        axes[1].plot(x, [r["fsd"] for r in sel], style, label=f"{dec} decoder")
    axes[0].set(xlabel="share of steps on the cloud", ylabel="adherence", title="prompt adherence")
    axes[1].set(xlabel="share of steps on the cloud", ylabel="FSD", title="FSD vs world renders (lower is better)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _grid(path: Path, columns: list[torch.Tensor], titles: list[str]) -> None:
    """One column per plan (titled with it), one row per prompt."""
    from ..grid import image_grid

    n, size = columns[0].shape[0], columns[0].shape[-1]
    cells = [to_pil(col) for col in columns]
    short = [t.replace("cloud", "c").replace("edge", "e") for t in titles]
    images = [cells[c][r] for r in range(n) for c in range(len(columns))]
    captions = [short[c] if r == 0 else "" for r in range(n) for c in range(len(columns))]
    atomic_save_image(image_grid(images, n, len(columns), captions, cell=max(size, 96)), path)
