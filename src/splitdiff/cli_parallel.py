"""`splitdiff parallel` and `bench parallel`: one generation with the U-Net cut into row patches.

Spawns local ranks itself (`--ranks N`), or runs as one rank of torchrun:
    torchrun --nproc-per-node 4 -m splitdiff parallel "a red circle" --mode pcpp
Rank 0 writes the output and prints the traffic per step.

(`generate --parallel` is parallel.plan.PatchPlan, in the main CLI.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .cli_options import MAX_STEPS, SEED_MAX, SEED_MIN, check_guidance, check_output, finite
from .errors import UserError
from .parallel.context import MODES


def register(app: typer.Typer) -> None:
    """Add the `parallel` command to the main CLI."""
    app.command("parallel")(parallel)


def register_bench(bench_app: typer.Typer) -> None:
    """Add `bench parallel` to the benchmarks' sub-command group."""
    bench_app.command("parallel")(bench)


def parallel(
    prompt: str = typer.Argument(..., help="The prompt."),
    mode: str = typer.Option("pcpp", help=f"One of {', '.join(MODES)}."),
    ranks: Optional[int] = typer.Option(None, min=1, help="Local ranks to spawn (default 1); under torchrun, its world."),
    unet: str = typer.Option("cloud", help="U-Net: a registry name or a diffusers folder."),
    tiny: bool = typer.Option(False, help="Use a random tiny U-Net (and VAE), for smoke runs."),
    latent_size: int = typer.Option(32, min=1, help="Latent side (image side / the VAE's factor)."),
    steps: int = typer.Option(20, min=1, max=MAX_STEPS),
    scheduler: str = typer.Option("ddim", help="ddim, dpmsolver++, euler or euler-a."),
    guidance: float = typer.Option(5.0, callback=check_guidance, help="Classifier-free guidance scale, 0..100."),
    negative: str = typer.Option("", help="Negative prompt."),
    seed: int = typer.Option(0, min=SEED_MIN, max=SEED_MAX),
    band: float = typer.Option(0.3, callback=finite, help="PCPP: fraction of each neighbour's patch seen."),
    warmup: int = typer.Option(4, min=0, help="Synchronous steps before exchanges go stale."),
    groupnorm: str = typer.Option("sync", help="sync, or async (DistriFusion's corrected stale statistics)."),
    split_cfg: bool = typer.Option(False, help="Even rank counts: guidance halves on two rank groups."),
    vae: Optional[str] = typer.Option(None, help="VAE for image output (default: the family's 'vae')."),
    out: Path = typer.Option(Path("parallel.safetensors"), help="Latents (.safetensors) or an image (.png)."),
    timeout: float = typer.Option(120.0, min=0.1, callback=finite,
                                  help="Seconds a rank waits on another before the run fails."),
) -> None:
    """Generate with the U-Net's steps cut into row patches across ranks."""
    from .parallel.ranks import RankFailure, launch
    from .parallel.run import IMAGE_SUFFIXES, RankJob, encode, run
    from .parallel.stats import per_step

    image = out.suffix.lower() in IMAGE_SUFFIXES
    job = RankJob(
        prompt, unet="tiny" if tiny else unet, size=latent_size, steps=steps, scheduler=scheduler,
        guidance=guidance, seed=seed, negative=negative, mode=mode, band=band, warmup_steps=warmup,
        groupnorm=groupnorm, split_cfg=split_cfg, out=str(out),
        vae=(vae or ("tiny" if tiny else "vae")) if image else None,
    )  # fmt: skip
    if out.suffix.lower() not in IMAGE_SUFFIXES + (".safetensors",):
        raise UserError(f"--out {out} must end in .safetensors or one of {', '.join(IMAGE_SUFFIXES)}")
    check_output(out, "--out")

    if _under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if ranks not in (None, world):
            raise UserError(f"--ranks {ranks} disagrees with torchrun's {world} processes; leave it out")
        results = [_one_rank(job, timeout)]
        if int(os.environ["RANK"]) != 0:
            return
    else:
        encode(job)  # once, here: the forked ranks inherit the loaded encoder and the encoding
        try:
            results = launch(run, ranks or 1, {"job": job}, timeout_s=timeout)
        except RankFailure as failure:
            typer.echo(f"error: {failure}", err=True)
            raise typer.Exit(1) from None
    totals = per_step(results[0]["stats"], job.warmup_steps)
    world = ranks or int(os.environ.get("WORLD_SIZE", 1))
    kib = ", ".join(f"{c} {totals[c] / 1024:.1f}" for c in ("attention", "halo", "groupnorm", "output"))
    typer.echo(f"{mode} on {world} rank(s): {results[0]['seconds']:.2f} s for {steps} steps; "
               f"KiB sent per step after warm-up (all ranks): {kib}")  # fmt: skip
    typer.echo(f"wrote {out}")


def bench(
    unet: Optional[str] = typer.Option(None, help="U-Net: a registry name or a diffusers folder (default: tiny random)."),
    latent_size: int = typer.Option(32, min=1, help="Latent side."),
    ranks: str = typer.Option("1,2,4,8", help="Rank counts, comma-separated."),
    modes: str = typer.Option("sync,distrifusion,pcpp", help="Modes, comma-separated; MODE:async for async GroupNorm."),
    steps: int = typer.Option(20, min=1, max=MAX_STEPS),
    prompts: int = typer.Option(8, min=1, help="Prompts in the batch (the evaluation set's first ones)."),
    vae: Optional[str] = typer.Option(None, help="VAE: PSNR and adherence on decoded images, and an image grid."),
    out_dir: Path = typer.Option(Path("bench/parallel"), help="Where the CSV and PNGs go."),
) -> None:
    """Patch parallelism vs one device: PSNR, adherence, bytes per step by category, wall time."""
    from .bench.parallel import bench_parallel

    counts = tuple(int(r) for r in ranks.split(",") if r.strip())
    bench_parallel(unet, latent_size, counts, tuple(m.strip() for m in modes.split(",")), out_dir, steps=steps, vae=vae,
                   prompts=prompts)
    typer.echo(f"wrote {out_dir / 'parallel.csv'} and {out_dir / 'parallel.png'}")


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= set(os.environ)


def _one_rank(job, timeout: float) -> dict:
    """This process is one rank of torchrun: join, generate, leave; a lost peer is one line."""
    from .parallel.comm import PeerFailure, setup, teardown
    from .parallel.run import run

    try:
        setup(timeout)
        result = run(job)
        teardown(timeout)
    except PeerFailure as failure:
        typer.echo(f"error: {failure}", err=True)
        raise typer.Exit(1) from None
    return result
