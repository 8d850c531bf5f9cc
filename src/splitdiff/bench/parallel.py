"""Patch-parallel benchmark: quality, traffic and time of each mode against one device.

For every rank count and mode, one batch of prompts (the evaluation set's first ones,
one, two and three objects) runs on that many local ranks (one CPU thread or one GPU
each); its output is compared with the stock U-Net's on one rank (PSNR and max abs
error, on decoded images when a VAE is given, else on latents), and with a VAE the
images' prompt adherence is measured by the evaluator. Traffic is the bytes sent per
step, summed over ranks, after warm-up.
Writes parallel.csv, parallel.png (and grid.png with a VAE) into `out_dir`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from . import write_csv
from ..io import load_tensors
from ..parallel import launch
from ..parallel.ranks import RankFailure
from ..parallel.run import RankJob, encode, run
from ..parallel.stats import CATEGORIES, per_step


def bench_parallel(
    unet: str | None,
    size: int,
    ranks: tuple[int, ...] = (1, 2, 4, 8),
    modes: tuple[str, ...] = ("sync", "distrifusion", "pcpp"),
    out_dir: str | Path = "bench/parallel",
    *,
    steps: int = 20,
    vae: str | None = None,
    prompts: int = 8,
    band: float = 0.3,
    warmup_steps: int = 4,
    timeout_s: float = 300.0,
) -> list[dict]:
    """Rows of the CSV: one per (ranks, mode); `unet` None means a random tiny U-Net.

    A mode may carry ":async" for DistriFusion's corrected async GroupNorm ("pcpp:async").
    Rank count 1 is the single-device reference itself.
    """
    out = Path(out_dir)
    (out / "latents").mkdir(parents=True, exist_ok=True)
    from ..world import prompt_set

    texts = tuple(prompt_set(prompts))
    base = RankJob(texts, unet=unet or "tiny", size=size, steps=steps, mode=None, band=band, warmup_steps=warmup_steps)
    encode(base)  # once, here: the forked ranks inherit the loaded encoder and the encoding
    reference = _generate(replace(base, out=str(out / "latents" / "single.safetensors")), 1, timeout_s)
    ref = _latents(reference)
    ref_image = _decode(vae, ref) if vae else None
    evaluator = None
    if vae:
        from ..eval import default_evaluator

        evaluator = default_evaluator()

    rows, grid = [], {("single", 1): ref_image}
    for n in ranks:
        for spec in ["single"] if n == 1 else modes:
            mode, _, groupnorm = spec.partition(":")
            row = {"ranks": n, "mode": spec}
            if n > 1:
                job = replace(base, mode=mode, groupnorm=groupnorm or "sync",
                              out=str(out / "latents" / f"{spec.replace(':', '-')}-{n}.safetensors"))  # fmt: skip
                try:
                    result = _generate(job, n, timeout_s)
                except RankFailure as failure:
                    rows.append({**row, "error": str(failure)})
                    continue
            else:
                result = reference
            latents = _latents(result)
            row["max_abs_latent"] = (latents - ref).abs().max().item()
            if vae:
                image = grid[(spec, n)] = _decode(vae, latents) if n > 1 else ref_image
                row["psnr_db"] = _psnr(image, ref_image, peak=2.0)
                row["adherence"] = evaluator.adherence(image, list(texts))[1]
            else:
                row["psnr_db"] = _psnr(latents, ref, peak=(ref.max() - ref.min()).item())
            traffic = per_step(result["stats"], warmup_steps) if result["stats"] else dict.fromkeys(CATEGORIES, 0.0)
            row.update({f"{c}_bytes_per_step": traffic.get(c, 0.0) for c in CATEGORIES})
            row["bytes_per_step"] = sum(row[f"{c}_bytes_per_step"] for c in CATEGORIES)
            row["wall_s"] = result["seconds"]
            row["step_ms"] = 1000 * result["seconds"] / steps
            row["wait_ms_per_step"] = 1000 * traffic.get("wait_s", 0.0)
            rows.append(row)

    write_csv(out / "parallel.csv", rows)
    _plot(rows, out / "parallel.png")
    if vae:
        _grid(grid, out / "grid.png")
    return rows


def _generate(job: RankJob, ranks: int, timeout_s: float) -> dict:
    results = launch(run, ranks, {"job": job}, timeout_s=timeout_s)
    return {**results[0], "out": job.out}


def _latents(result: dict) -> torch.Tensor:
    return load_tensors(result["out"])[0]["latents"].float()


def _decode(vae: str, latents: torch.Tensor) -> torch.Tensor:
    from ..core.runner import decode
    from ..parallel.run import load_vae

    return decode(load_vae(vae), latents)


def _psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("psnr_db", "PSNR vs one device (dB)"), ("attention_bytes_per_step", "attention KiB / step"),
              ("step_ms", "wall ms / step")]  # fmt: skip
    modes = list(dict.fromkeys(r["mode"] for r in rows if r["mode"] != "single" and "error" not in r))
    for ax, (key, title) in zip(axes, panels):
        for mode in modes:
            pts = [(r["ranks"], r[key]) for r in rows if r["mode"] == mode and "error" not in r]
            if key == "psnr_db":
                pts = [(x, y if math.isfinite(y) else 150.0) for x, y in pts]  # identical outputs: drawn at 150
            if key == "attention_bytes_per_step":
                pts = [(x, y / 1024) for x, y in pts]
            ax.plot(*zip(*pts), marker="o", label=mode)
        single = [r for r in rows if r["mode"] == "single"]
        if key == "step_ms" and single:
            ax.axhline(single[0]["step_ms"], color="gray", linestyle="--", label="one device")
        ax.set_title(title)
        ax.set_xlabel("ranks")
        ax.set_xticks(sorted({r["ranks"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grid(images: dict, path: Path) -> None:
    """One row per mode, one column per rank count; the single-device image leads every row."""
    from ..core.runner import to_pil
    from ..grid import image_grid

    modes = list(dict.fromkeys(m for m, n in images if m != "single"))
    counts = sorted({n for m, n in images if m != "single"})
    first = to_pil(images[("single", 1)][:1])[0]
    cells, captions = [], []
    for mode in modes:
        cells.append(first)
        captions.append("single")
        for n in counts:
            cells.append(to_pil(images[(mode, n)][:1])[0] if (mode, n) in images else None)
            captions.append(f"{mode} x{n}" if (mode, n) in images else "")
    image_grid(cells, len(modes), len(counts) + 1, captions).save(path)
