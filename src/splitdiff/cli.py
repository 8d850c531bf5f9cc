"""The `splitdiff` command line: one entry point, a sub-command per job.

User mistakes (UserError) print one line and exit 2; nothing is written on error.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .cli_options import (MAX_STEPS, RUN_DEVICE, RUN_DTYPE, SEED_MAX, SEED_MIN, check_guidance, check_output,
                          finite)
from .errors import UserError
from .users.pai import format_pai

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Split diffusion-model inference across time, space and users.")
train_app = typer.Typer(no_args_is_help=True, help="Train the evaluator and the embedded model family (resumable).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: CSV + PNG plots.")
app.add_typer(train_app, name="train")
app.add_typer(bench_app, name="bench")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# The trainers' time budget (typer takes one OptionInfo as the default of several commands).
MAX_MINUTES = typer.Option(None, min=0.0, callback=finite, help="Stop (resumably) after this many minutes.")


def _check_out(out: Path) -> None:
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--out {out} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    check_output(out, "--out")


def _check_decoder(decoder: str) -> None:
    if decoder not in ("full", "tiny"):
        raise UserError(f"--decoder must be full or tiny, not {decoder!r}")


def _progress(plan_total: int):
    from tqdm import tqdm

    bar = tqdm(total=plan_total, unit="step", dynamic_ncols=True)

    def on_step(model: str, _k: int):
        bar.set_description(model)
        bar.update(1)

    return bar, on_step


def _pipeline_for(plan, model: list[str] | None, vae: Optional[str], decoder: str, device: str = "cpu",
                  dtype: str = "fp32", variant: Optional[str] = None, text_encoder: Optional[str] = None):
    """The models the plan names, loaded as the library's SplitPipeline."""
    from .core.registry import parse_model_specs, resolve
    from .pipeline import SplitPipeline
    from .users.plans import AdapterSet

    specs = parse_model_specs(model)
    sources = {name: resolve(name, specs) for name in dict.fromkeys(s.model for s in plan)}
    adapters = AdapterSet()
    for s in plan:  # users' adapters: refused before any model is loaded when missing
        if s.adapter:
            adapters.resolve(s.adapter)
    return SplitPipeline.from_pretrained(sources, vae=vae, decoder=decoder, torch_dtype=dtype, device=device,
                                         variant=variant, text_encoder=text_encoder)


def _image_text(traj) -> dict[str, str]:
    """PNG text chunks that say how the image was made, so a degraded one stays marked once on disk."""
    made = {"prompt": traj.prompt, "negative_prompt": traj.negative_prompt, "seed": traj.seed,
            "scheduler": traj.scheduler_name, "steps": traj.num_steps, "guidance": traj.guidance_scale,
            "degraded": traj.degraded, "segments": [s.as_json() for s in traj.provenance]}
    return {"splitdiff.degraded": "true" if traj.degraded else "false", "splitdiff.provenance": json.dumps(made)}


def _finish(pipe, traj, out: Path, extra: dict | None = None, strict: bool = False, image=None) -> None:
    """Write the image (decoded here unless given); with `strict`, a degraded one (still written, and marked)
    exits 3."""
    from .hybrid.report import print_cost_table
    from .io import atomic_save_image

    image = pipe.decode(traj) if image is None else image
    atomic_save_image(image, out, text=_image_text(traj))
    rows = {"decode": f"{pipe.hybrid.timings['decode']:.3f}"}
    rows.update(extra or {})
    print_cost_table(traj, rows)
    if traj.degraded:
        typer.echo("warning: degraded result (steps meant for the cloud or for parallel ranks ran here)", err=True)
    typer.echo(f"wrote {out}")
    if traj.degraded and strict:
        raise typer.Exit(3)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="A Shapes-world prompt (or any prompt for a real SD model)."),
    plan: str = typer.Option("cloud:10,edge:15", help="Step plan, e.g. cloud:10,edge:15."),
    steps: int = typer.Option(25, min=1, max=MAX_STEPS, help="Total denoising steps; the plan must add up to it."),
    scheduler: str = typer.Option("dpmsolver++", help="ddim, dpmsolver++, euler, euler-a, or folder (the first "
                                  "model's pipeline folder's own scheduler, with all its settings)."),
    seed: int = typer.Option(0, min=SEED_MIN, max=SEED_MAX),
    guidance: float = typer.Option(5.0, callback=check_guidance,
                                   help="Classifier-free guidance scale, 0..100 (<= 1 disables it)."),
    size: int = typer.Option(64, min=16, max=2048, help="Image side in pixels (both sides unless --height or "
                             "--width say otherwise)."),
    height: Optional[int] = typer.Option(None, min=16, max=2048, help="Image height in pixels (default: --size)."),
    width: Optional[int] = typer.Option(None, min=16, max=2048, help="Image width in pixels (default: --size)."),
    negative: str = typer.Option("", help="Negative prompt."),
    model: Optional[list[str]] = typer.Option(None, help="NAME=PATH: bind a plan name to a diffusers folder."),
    vae: Optional[str] = typer.Option(None, help="VAE name or folder (default: the family's, or the pipeline's)."),
    text_encoder: Optional[str] = typer.Option(None, help="A folder with text_encoder/ and tokenizer/ (a pipeline "
                                               "folder) for plans of bare U-Net folders."),
    variant: Optional[str] = typer.Option(None, help="Weights variant to load, e.g. fp16 (found by itself when a "
                                          "folder has only that)."),
    device: str = RUN_DEVICE,
    dtype: str = RUN_DTYPE,
    decoder: Optional[str] = typer.Option(None, help="full or tiny: which decoder when --vae is not given "
                                          "(default: full; tiny with --cloud-url when installed)."),
    out: Path = typer.Option(Path("out.png"), help="Image file to write."),
    save_state: Optional[Path] = typer.Option(None, help="Stop after the first plan segment; write the trajectory."),
    half_state: bool = typer.Option(False, help="Store the saved state's tensors in fp16."),
    cloud_url: Optional[str] = typer.Option(None, help="A `splitdiff serve` URL: it runs the plan's first segment."),
    token: Optional[str] = typer.Option(None, envvar="SPLITDIFF_TOKEN", help="The cloud's bearer token."),
    timeout: float = typer.Option(60.0, min=0.1, callback=finite, help="Seconds to wait for the cloud, per try."),
    half: bool = typer.Option(False, help="Ask the cloud for fp16 tensors (half the bytes, not bit-exact)."),
    user: Optional[str] = typer.Option(None, help="With --cloud-url: the user's name, for a cloud that admits users "
                                       "by its planner (it grants or denies, and sets the split)."),
    alpha: Optional[float] = typer.Option(None, min=0.0, callback=finite, help="With --user: seconds of latency "
                                          "worth one unit of PAI (how much a personal image matters)."),
    device_step_seconds: Optional[float] = typer.Option(None, min=0.0, callback=finite, help="With --user: this "
                                                        "device's seconds per step (default: measured here)."),
    strict: bool = typer.Option(False, help="Exit with code 3 when the result is degraded (the cloud's steps "
                                "ran here); the image is still written, and marked."),
    parallel: Optional[str] = typer.Option(None, help="Run some segments patch-parallel: sync, distrifusion or pcpp."),
    ranks: Optional[int] = typer.Option(None, help="Local ranks for --parallel (default 2)."),
    parallel_models: Optional[str] = typer.Option(None, help="Plan models run with --parallel, comma-separated "
                                                  "(default: the plan's first)."),
):
    """Generate an image with a step plan over one or more models."""
    from .core.plan import check_plan, parse_plan
    from .io import atomic_write_bytes
    from .parallel.plan import PatchPlan

    from .core.schedulers import SCHEDULERS

    parsed = parse_plan(plan)
    check_plan(parsed, steps)
    patch = PatchPlan.parse(parallel, ranks, parallel_models, parsed)
    if scheduler not in SCHEDULERS and scheduler != "folder":
        raise UserError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)} or folder")
    _check_placement(device, dtype)
    sides = dict(size=size, height=height, width=width)
    if save_state is None:
        _check_out(out)
    else:
        check_output(save_state, "--save-state")
    decoder = decoder or ("tiny" if cloud_url and _tiny_decoder_installed() else "full")
    _check_decoder(decoder)
    if (user is None) != (alpha is None) or (device_step_seconds is not None and user is None):
        raise UserError("--user and --alpha go together (and --device-step-seconds with them)")
    if user is not None and not cloud_url:
        raise UserError("--user needs --cloud-url: it is for a cloud that admits users")
    if cloud_url:
        if save_state or patch:
            raise UserError(f"{'--save-state' if save_state else '--parallel'} and --cloud-url do not go together")
        if (height or size) != (width or size):
            raise UserError("--cloud-url serves square images: give --size, not a different --height and --width")
        if scheduler == "folder":
            raise UserError("--scheduler folder and --cloud-url do not go together: name the scheduler")
        size = height or width or size
        from .serve.edge import split_plan

        pipe = _pipeline_for(split_plan(parsed)[1], model, vae, decoder, device, dtype, variant, text_encoder)
        return _generate_with_cloud(pipe, parsed, prompt, cloud_url, token, timeout, half, out, strict,
                                    negative_prompt=negative, steps=steps, scheduler=scheduler, seed=seed,
                                    guidance=guidance, size=size,
                                    user=None if user is None else (user, alpha, device_step_seconds))
    pipe = _pipeline_for(parsed, model, vae, decoder, device, dtype, variant, text_encoder)
    traj = pipe.start(prompt, negative_prompt=negative, steps=steps, scheduler=scheduler, seed=seed,
                      guidance_scale=guidance, **sides)[0]
    ranks = contextlib.nullcontext()
    if patch:
        from tqdm import tqdm

        ranks = patch.install(pipe.hybrid, traj, warn=lambda m: tqdm.write(f"warning: {m}", file=sys.stderr))
    todo = parsed[:1] if save_state else parsed
    bar, on_step = _progress(sum(s.steps for s in todo))
    with ranks, bar:
        pipe.run(traj, todo, on_step, pause=bool(save_state))
    if save_state:
        from .hybrid.report import print_cost_table

        atomic_write_bytes(save_state, traj.to_bytes(half=half_state))
        print_cost_table(traj)
        typer.echo(f"wrote {save_state} (step {traj.step_index} of {traj.num_steps})")
        return
    _finish(pipe, traj, out, strict=strict)


def _check_placement(device: str, dtype: str) -> None:
    """--device and --dtype, refused in one line before any model loads."""
    from .core.devices import parse_dtype, resolve_device

    resolve_device(device)
    parse_dtype(dtype)


def _tiny_decoder_installed() -> bool:
    from .core.registry import WEIGHTS_DIR

    return (WEIGHTS_DIR / "tiny-decoder" / "config.json").exists()


def _generate_with_cloud(pipe, plan, prompt, url, token, timeout, half, out, strict, user=None, **params) -> None:
    """The plan's first segment on the cloud, the rest here with `pipe` (the edge's models); the cloud's
    steps run here if it cannot be had.

    `user` (name, alpha, device seconds per step or None) asks a cloud with admission to decide the split.
    """
    from .serve.client import CloudClient
    from .serve.edge import CloudExecutor, handoff_rows, measure_step_seconds, split_plan

    client = CloudClient(url, token, timeout)
    block = None
    if user is not None:
        name, alpha, tau = user
        if tau is None:
            tau = measure_step_seconds(pipe.hybrid, plan[-1].model, size=params["size"], steps=params["steps"],
                                       scheduler=params["scheduler"], guidance=params["guidance"])
        block = {"id": name, "device_step_seconds": tau, "alpha": alpha}
    bar, on_step = _progress(params["steps"])
    with client, bar:
        cloud = CloudExecutor(client, pipe.hybrid, split_plan(plan)[1], half=half, user=block,
                              warn=lambda m: bar.write(f"warning: {m}", file=sys.stderr))
        pipe.executors[plan[0].model] = cloud
        result = pipe(prompt, plan, steps=params["steps"], scheduler=params["scheduler"], seed=params["seed"],
                      guidance_scale=params["guidance"], negative_prompt=params["negative_prompt"], size=params["size"],
                      on_step=on_step)
    traj = result.trajectories[0]
    _finish(pipe, traj, out, handoff_rows(None if traj.degraded else cloud.handoff), strict, image=result.images[0])


@app.command()
def serve(
    role: str = typer.Option("cloud", help="cloud: run the first steps of edge clients' trajectories."),
    model: str = typer.Option("cloud", help="The served U-Net: a registry name or a diffusers folder."),
    name: Optional[str] = typer.Option(None, help="The name plans use for it (default: its registry name, or cloud)."),
    vae: Optional[str] = typer.Option(None, help="The VAE that fixes latent shapes (default: the pipeline's or vae)."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000, min=0, max=65535),
    max_batch: int = typer.Option(8, min=1, max=256, help="Trajectories per U-Net call."),
    max_waiting: int = typer.Option(256, min=1, help="Queued requests beyond which the server answers 503."),
    max_queue_mb: int = typer.Option(512, min=1, help="MiB that waiting and running work may hold (embeddings, "
                                     "latents) beyond which the server answers 503."),
    max_connections: int = typer.Option(1024, min=1, help="Open connections beyond which new ones are closed."),
    header_timeout: float = typer.Option(5.0, min=0.1, max=3600, help="Seconds a connection has to send a "
                                         "request's headers before it is closed."),
    max_steps: int = typer.Option(MAX_STEPS, min=1, max=MAX_STEPS, help="Largest total steps a request may ask for."),
    max_size: int = typer.Option(256, min=16, max=2048, help="Largest image side a request may ask for."),
    regather: float = typer.Option(0.05, min=0, max=5, callback=finite, help="Seconds to wait, after a call ran "
                                   "more trajectories than are now at hand, for their clients' next requests."),
    token_file: Optional[Path] = typer.Option(None, help="Bearer token file (else $SPLITDIFF_TOKEN; neither: open)."),
    log_level: str = typer.Option("info", help="critical, error, warning, info or debug."),
    admission: str = typer.Option("off", help="How requests with a user block are admitted: off (served as "
                                  "asked), planner, fifo, all-offload or all-local."),
    window: float = typer.Option(0.2, min=0.001, max=60, callback=finite, help="Seconds a scheduling window "
                                 "gathers users before the admission decides."),
    capacity: Optional[int] = typer.Option(None, min=1, help="Most users served at once (default: --max-batch)."),
    solver: str = typer.Option("exact", help="The planner's solver (see `splitdiff plan`)."),
    planner_timeout: float = typer.Option(1.0, min=0.001, max=60, callback=finite, help="Seconds the planner may "
                                          "take before FIFO decides the window."),
    pai: str = typer.Option(format_pai(), help="The PAI curve A,B the planner weighs splits with: "
                            "1 / (1 + exp(-A (n - B))), n the device's steps."),
    device: str = RUN_DEVICE,
    dtype: str = RUN_DTYPE,
    engine: str = typer.Option("local", help="local: one process; ray: replicas of it on Ray Serve "
                               "(pip install 'splitdiff[ray]')."),
    replicas: int = typer.Option(1, min=1, help="With --engine ray: how many replicas."),
    autoscale: Optional[str] = typer.Option(None, help="With --engine ray: MIN:MAX replicas, scaled with load."),
    address: Optional[str] = typer.Option(None, help="With --engine ray: a Ray cluster to join (default: start "
                                          "one here)."),
    replica_cpus: float = typer.Option(1.0, min=0.01, help="With --engine ray: CPUs (and torch threads) each "
                                       "replica takes."),
    replica_gpus: Optional[float] = typer.Option(None, min=0, help="With --engine ray: GPUs each replica takes "
                                                 "(default: 1 when --device is a GPU, else 0)."),
):
    """Serve a model's first steps over HTTP with step-level batching (API docs at /docs)."""
    if role != "cloud":
        raise UserError(f"--role {role!r} is not served; the edge runs `generate --cloud-url`")
    if log_level not in ("critical", "error", "warning", "info", "debug"):
        raise UserError(f"--log-level must be critical, error, warning, info or debug, not {log_level!r}")
    from .serve.admission import AdmissionConfig
    from .users.pai import parse_pai
    from .serve.auth import load_token
    from .serve.server import Limits, build_app, run

    limits = Limits(max_batch, max_waiting, max_steps, max_size, max_queue_bytes=max_queue_mb * 1024 * 1024,
                    max_connections=max_connections, header_timeout=header_timeout, regather=regather)
    admit = AdmissionConfig(admission, window, capacity, solver, planner_timeout, parse_pai(pai)).check(max_batch)
    if engine == "ray" and ":" in device:
        raise UserError("with --engine ray, give --device cuda: Ray shows each replica its own GPU as cuda:0")
    _check_placement(device, dtype)
    build = dict(model=model, name=name, vae=vae, token=load_token(token_file), limits=limits, admission=admit,
                 device=device, dtype=dtype)
    if engine == "ray":
        from .serve.replicas import RayOptions, parse_autoscale, serve_forever

        from .core.devices import resolve_device

        if replica_gpus is None:
            replica_gpus = 1.0 if resolve_device(device).type == "cuda" else 0.0
        options = RayOptions(replicas, parse_autoscale(autoscale), address, replica_cpus, replica_gpus).check()
        serve_forever(build, options, host, port)
        return
    if engine != "local":
        raise UserError(f"--engine must be local or ray, not {engine!r}")
    if replicas != 1 or autoscale or address:
        raise UserError("--replicas, --autoscale and --address go with --engine ray")
    run(build_app(**build), host, port, log_level, limits)


@app.command()
def resume(
    state: Path = typer.Argument(..., help="A trajectory file written by --save-state."),
    plan: str = typer.Option(..., help="Plan for the remaining steps, e.g. edge:15."),
    model: Optional[list[str]] = typer.Option(None, help="NAME=PATH: bind a plan name to a diffusers folder."),
    vae: Optional[str] = typer.Option(None),
    decoder: str = typer.Option("full", help="full or tiny: which decoder when --vae is not given."),
    out: Path = typer.Option(Path("out.png")),
    text_encoder: Optional[str] = typer.Option(None, help="As for generate (its width must fit the trajectory)."),
    variant: Optional[str] = typer.Option(None, help="Weights variant to load, e.g. fp16."),
    device: str = RUN_DEVICE,
    dtype: str = RUN_DTYPE,
):
    """Continue a saved trajectory with another plan and write the image."""
    from .core.plan import check_plan, parse_plan
    from .core.trajectory import MAX_BYTES, Trajectory

    parsed = parse_plan(plan)
    _check_out(out)
    _check_decoder(decoder)
    _check_placement(device, dtype)
    try:
        if state.stat().st_size > MAX_BYTES:
            raise UserError(f"{state} is {state.stat().st_size:,} bytes, more than any trajectory ({MAX_BYTES:,})")
        data = state.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {state}: {e.strerror}") from None
    traj = Trajectory.from_bytes(data)
    check_plan(parsed, traj.num_steps, traj.step_index)
    pipe = _pipeline_for(parsed, model, vae, decoder, device, dtype, variant, text_encoder)
    parsed = pipe.check(traj, parsed)  # refused before any progress is drawn
    bar, on_step = _progress(traj.remaining)
    with bar:
        pipe.run(traj, parsed, on_step)
    _finish(pipe, traj, out)


@app.command()
def demo(out: Path = typer.Option(Path("demo"), help="Folder for the demo's outputs.")):
    """The main job on the embedded default."""
    from .demo import run_demo

    run_demo(out)


@train_app.command("evaluator")
def train_evaluator_cmd(
    run_dir: Path = typer.Option(Path("runs/evaluator")), steps: int = typer.Option(2500, min=1),
    max_minutes: Optional[float] = MAX_MINUTES, out: Optional[Path] = typer.Option(None),
):
    """The attribute recognizer behind adherence and FSD."""
    from .eval.metrics import WEIGHTS
    from .train.evaluator import train_evaluator

    train_evaluator(run_dir, steps=steps, max_minutes=max_minutes, out=out or WEIGHTS)


@train_app.command("vae")
def train_vae_cmd(
    run_dir: Path = typer.Option(Path("runs/vae")), steps: int = typer.Option(4000, min=1),
    max_minutes: Optional[float] = MAX_MINUTES, out: Optional[Path] = typer.Option(None),
):
    """The family's AutoencoderKL (4 latent channels, 4x downsampling)."""
    from .core.registry import WEIGHTS_DIR
    from .train.vae import train_vae

    train_vae(run_dir, out or WEIGHTS_DIR / "vae", steps=steps, max_minutes=max_minutes)


@train_app.command("tiny-decoder")
def train_tiny_decoder_cmd(
    run_dir: Path = typer.Option(Path("runs/tiny-decoder")), steps: int = typer.Option(8000, min=1),
    max_minutes: Optional[float] = MAX_MINUTES, out: Optional[Path] = typer.Option(None),
):
    """A TAESD-style decoder distilled from the VAE's decoder."""
    from .core.registry import WEIGHTS_DIR
    from .train.tiny_decoder import train_tiny_decoder

    train_tiny_decoder(run_dir, out or WEIGHTS_DIR / "tiny-decoder", steps=steps, max_minutes=max_minutes)


def _check_device(device: str) -> None:
    from .core.devices import resolve_device

    resolve_device(device)


def _data_options(device: str, batch_size: int, batch_size_128: Optional[int], quarters_128: int,
                  n64: int, n128: int) -> dict:
    """The U-Net trainers' shared options, checked."""
    _check_device(device)
    return dict(device=device, batch_size=batch_size, batch_size_128=batch_size_128, quarters_128=quarters_128,
                n64=n64, n128=n128)


# The U-Net trainers' shared options (typer takes one OptionInfo as the default of several commands).
DEVICE = typer.Option("auto", help="auto (the GPU when there is one), cpu or cuda[:N]; bf16 autocast on a GPU.")
BATCH_SIZE = typer.Option(32, min=1, help="Samples per 64 px step.")
BATCH_SIZE_128 = typer.Option(None, min=1, help="Samples per 128 px step (default a quarter of --batch-size).")
QUARTERS_128 = typer.Option(1, min=0, max=4, help="Steps in four that train at 128 px.")
N64 = typer.Option(30000, min=64, help="Cached 64 px samples.")
N128 = typer.Option(8000, min=0, help="Cached 128 px samples.")


@train_app.command("unet")
def train_unet_cmd(
    role: str = typer.Option("cloud", help="Which U-Net of the family (the edge one comes from `compress`)."),
    run_dir: Optional[Path] = typer.Option(None), steps: int = typer.Option(8000, min=1),
    max_minutes: Optional[float] = MAX_MINUTES, out: Optional[Path] = typer.Option(None),
    device: str = DEVICE, lr: float = typer.Option(4e-4, min=0.0, callback=finite), batch_size: int = BATCH_SIZE,
    batch_size_128: Optional[int] = BATCH_SIZE_128, quarters_128: int = QUARTERS_128, n64: int = N64, n128: int = N128,
):
    """The cloud U-Net on cached 64 px and 128 px latents."""
    from .core.registry import WEIGHTS_DIR
    from .train.unet import UNET_CONFIGS, train_unet

    if role not in UNET_CONFIGS:
        raise UserError(f"unknown U-Net role {role!r}; choose one of {', '.join(UNET_CONFIGS)}")
    train_unet(run_dir or Path(f"runs/unet-{role}"), out or WEIGHTS_DIR / role, role=role, steps=steps,
               max_minutes=max_minutes, lr=lr,
               **_data_options(device, batch_size, batch_size_128, quarters_128, n64, n128))


@train_app.command("family")
def train_family_cmd(
    scale: str = typer.Option(..., help="tiny (a test of the chain: minutes on a CPU), current (the shipped sizes "
                              "and steps) or large (sized for a GPU)."),
    out: Path = typer.Option(Path("runs/family"), help="Folder for runs/<stage>, weights/<name>, latent-cache/ "
                             "and bench/hybrid/."),
    device: str = DEVICE,
    max_minutes: Optional[float] = typer.Option(None, min=0.0, help="Stop, checkpointed, after this many minutes "
                                                "in all; the same command goes on."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the stages, their configs, parameter counts and "
                                 "steps; write nothing."),
    steps: Optional[str] = typer.Option(None, help="Training steps for some stages instead of the scale's, "
                                        "e.g. cloud=6000,edge=3000."),
    until: Optional[str] = typer.Option(None, help="Stop after this stage (e.g. edge: bench elsewhere)."),
):
    """Every stage, in order and resumably: evaluator (if missing), VAE, latent cache, cloud, edge, tiny decoder, bench.

    A stage runs only when its output is missing, unfinished or made from other inputs.
    """
    from rich.console import Console

    from .train.family import is_complete, parse_steps, print_plan, summary_table, train_family

    stage_steps = parse_steps(steps)
    if dry_run:
        print_plan(scale, out, device, echo=typer.echo, steps=stage_steps)
        return
    results = train_family(scale, out, device=device, max_minutes=max_minutes, echo=typer.echo, steps=stage_steps,
                           until=until)
    Console().print(summary_table(results, out, scale))
    if is_complete(results):
        typer.echo(f"family complete under {out}" if until is None else f"done up to {until} under {out}")
    else:
        typer.echo(f"stopped before the end: run the same command again to go on from {out}")


@app.command()
def compress(
    teacher: str = typer.Option("cloud"), run_dir: Path = typer.Option(Path("runs/edge")),
    steps: int = typer.Option(4000, min=1), max_minutes: Optional[float] = MAX_MINUTES,
    out: Optional[Path] = typer.Option(None),
    device: str = DEVICE, lr: float = typer.Option(5e-4, min=0.0, callback=finite), batch_size: int = BATCH_SIZE,
    batch_size_128: Optional[int] = BATCH_SIZE_128, quarters_128: int = QUARTERS_128, n64: int = N64, n128: int = N128,
):
    """The edge U-Net: structurally pruned from the cloud one, then distilled."""
    from .core.registry import WEIGHTS_DIR
    from .train.compress import compress as run_compress

    run_compress(run_dir, out or WEIGHTS_DIR / "edge", teacher=teacher, steps=steps, max_minutes=max_minutes, lr=lr,
                 **_data_options(device, batch_size, batch_size_128, quarters_128, n64, n128))


@bench_app.command("hybrid")
def bench_hybrid_cmd(
    out: Path = typer.Option(Path("docs/bench/hybrid")), prompts: int = typer.Option(500, min=10),
    size: int = typer.Option(64), guidance: float = typer.Option(5.0, callback=check_guidance, help="0..100."),
    device: str = typer.Option("cpu", help="Where the U-Nets and decoders run: cpu or cuda[:N]."),
):
    """The Hybrid SD table: quality and cost for each cloud/edge split of 25 steps."""
    from .bench.hybrid import bench_hybrid

    _check_device(device)
    bench_hybrid(out, n_prompts=prompts, size=size, guidance=guidance, device=device)


@bench_app.command("precision")
def bench_precision_cmd(
    out: Path = typer.Option(Path("docs/bench/precision")), prompts: int = typer.Option(24, min=1),
    plan: str = typer.Option("cloud:10,edge:15"), steps: int = typer.Option(25, min=1, max=MAX_STEPS),
    device: str = RUN_DEVICE,
):
    """fp32, bf16 and fp16 models side by side: time, latent error and PSNR against fp32."""
    from .bench.precision import bench_precision
    from .core.plan import check_plan, parse_plan

    check_plan(parse_plan(plan), steps)
    _check_placement(device, "fp32")
    bench_precision(out, plan=plan, steps=steps, prompts=prompts, device=device)


@bench_app.command("serve")
def bench_serve_cmd(
    model: str = typer.Option("cloud", help="The served U-Net: a registry name or a diffusers folder."),
    vae: Optional[str] = typer.Option(None, help="The VAE that fixes latent shapes (default: the server's)."),
    edge_model: Optional[str] = typer.Option(None, help="The edge U-Net of the end-to-end runs (default: edge for cloud, else --model)."),
    out: Path = typer.Option(Path("docs/bench/serve")),
    clients: str = typer.Option("1,4,16,32", help="Concurrent clients to measure, comma-separated."),
    seconds: float = typer.Option(20.0, min=1, callback=finite, help="Seconds of load per measured point."),
    load_seconds: float = typer.Option(60.0, min=1, callback=finite, help="Duration of the 32-client load run."),
    max_batch: int = typer.Option(32, min=2, help="Batch limit of the batching server."),
    steps: int = typer.Option(25, min=1, max=MAX_STEPS), cloud_steps: int = typer.Option(10, min=1, max=MAX_STEPS),
    size: int = typer.Option(64, min=16), device: str = RUN_DEVICE, dtype: str = RUN_DTYPE,
    engine: str = typer.Option("local", help="local: the single-process server; ray: it too, and then Ray Serve "
                               "(serve --engine ray) at each --replicas count, in the same run."),
    replicas: str = typer.Option("1,2", help="With --engine ray: replica counts, e.g. 1,2."),
    replica_cpus: float = typer.Option(1.0, min=0.01, help="CPUs (and torch threads) per Ray replica."),
):
    """Throughput and latency of `serve` under 1..32 clients, batching on vs off, and a load run."""
    from .bench.serve import bench_serve

    _check_placement(device, dtype)
    if engine not in ("local", "ray"):
        raise UserError(f"--engine must be local or ray, not {engine!r}")
    if engine == "ray":
        from .serve.replicas import check_installed

        check_installed()
    bench_serve(out, model=model, vae=vae, edge_model=edge_model, clients=clients, seconds=seconds,
                load_seconds=load_seconds, max_batch=max_batch, steps=steps, cloud_steps=cloud_steps, size=size,
                device=device, dtype=dtype, replicas=replicas if engine == "ray" else None, replica_cpus=replica_cpus)


@bench_app.command("personalize")
def bench_personalize_cmd(
    out: Path = typer.Option(Path("docs/bench/personalize")),
    users: Optional[str] = typer.Option(None, help="Users, comma-separated (default: every installed adapter)."),
    steps: str = typer.Option("25,50", help="Total steps T to measure, comma-separated."),
    prompts: int = typer.Option(32, min=1, max=1024, help="Prompts (images) per user, T and n."),
    shared: str = typer.Option("cloud", help="The shared model (the server's)."),
    device: str = typer.Option("edge", help="The device model the adapters are for."),
    vae: str = typer.Option("vae"), seed: int = typer.Option(0, min=0, max=SEED_MAX),
    every: str = typer.Option("", help="T=STRIDE pairs, comma-separated: measure every STRIDE-th n for that T "
                              "(e.g. 50=2; default every n)."),
):
    """The personalization curve: concept presence and PAI against n, the adapter's share of T steps."""
    from .bench.personalize import bench_personalize

    try:
        totals = tuple(int(t) for t in steps.split(","))
    except ValueError:
        raise UserError(f"--steps {steps!r} is not a comma-separated list of step counts") from None
    if not all(1 <= t <= MAX_STEPS for t in totals):
        raise UserError(f"--steps must be within 1..{MAX_STEPS}")
    try:
        strides = {int(t): int(e) for t, e in (p.split("=") for p in every.split(",") if p)}
    except ValueError:
        raise UserError(f"--every {every!r} is not a list of T=STRIDE pairs, e.g. 50=2") from None
    if any(e < 1 for e in strides.values()):
        raise UserError("--every strides must be at least 1")
    bench_personalize(out, users=users.split(",") if users else None, steps=totals, k=prompts, shared=shared,
                      device=device, vae=vae, seed=seed, every=strides)


@bench_app.command("queue-memory")
def bench_queue_memory_cmd(
    model: str = typer.Option("cloud", help="The served U-Net: a registry name or a diffusers folder."),
    vae: Optional[str] = typer.Option(None, help="The VAE that fixes latent shapes (default: the server's)."),
    out: Path = typer.Option(Path("docs/bench/queue_memory")),
    requests: int = typer.Option(128, min=1, max=1000, help="Largest-embeddings requests to queue."),
    budget_mb: int = typer.Option(512, min=1, help="The server's --max-queue-mb."),
):
    """The server's memory with its queue full of the largest requests, and after they are cancelled."""
    from .bench.queue_memory import bench_queue_memory

    bench_queue_memory(out, model=model, vae=vae, requests=requests, budget_mib=budget_mb)


@bench_app.command("family")
def bench_family_cmd(out: Path = typer.Option(Path("docs/bench/family")), repeats: int = typer.Option(10, min=1),
                     threads: Optional[int] = typer.Option(None)):
    """Edge vs cloud U-Net and tiny vs full decoder: parameters, speed, PSNR."""
    from .bench.family import bench_family

    bench_family(out, repeats=repeats, threads=threads)


@app.command("validate-evaluator")
def validate_evaluator_cmd(n: int = typer.Option(512, min=16), out: Optional[Path] = typer.Option(None)):
    """The evaluator's validation figures: adherence on renders and noise, FSD between sets."""
    from .eval.validate import print_validation, validate

    print_validation(validate(n), out)


@app.command()
def personalize(
    user: str = typer.Option(..., help="The user's name: a-z, 0-9, '_' and '-'."),
    concept: str = typer.Option(..., help="What the token stands for: [COLOR] [TEXTURE] SHAPE, e.g. 'red heart'."),
    token: str = typer.Option("sks", help="The rare word prompts write the concept with."),
    steps: int = typer.Option(500, min=1, help="Training steps."),
    batch_size: int = typer.Option(16, min=2, help="Renders per step, half of the concept, half of the prior."),
    rank: int = typer.Option(16, min=1, max=256, help="LoRA rank (alpha is the same)."),
    out: Optional[Path] = typer.Option(None, help="Adapter folder (default: the users folder's USER)."),
    run_dir: Optional[Path] = typer.Option(None, help="Checkpoint folder (default runs/users/USER)."),
    base: str = typer.Option("edge", help="The device U-Net: a registry name or a diffusers folder."),
    vae: str = typer.Option("vae", help="The VAE that encodes the renders."),
    lr: float = typer.Option(1e-3, min=0.0, callback=finite),
    seed: int = typer.Option(0, min=0),
    check: int = typer.Option(32, min=0, help="Prompts to measure concept presence with when done (0: skip)."),
    max_minutes: Optional[float] = MAX_MINUTES,
    device: str = typer.Option("cpu", help="Where the training step runs: cpu, auto or cuda[:N] (bf16 autocast)."),
):
    """A user's LoRA adapter on the device U-Net, from renders of their private concept (resumable)."""
    from .users.personalize import PersonalizeConfig, personalize as run_personalize

    _check_device(device)
    config = PersonalizeConfig(steps=steps, lr=lr, seed=seed, batch_size=batch_size, rank=rank)
    ref = run_personalize(user, concept, token, out=out, run_dir=run_dir, base=base, vae=vae, max_minutes=max_minutes,
                          check_prompts=check, config=config, device=device)
    presence = ref.record().get("presence")
    if presence:
        typer.echo(f"concept presence over {presence['prompts']} prompts: adapter {presence['adapter']:.3f}, "
                   f"base U-Net {presence['base']:.3f}")
    typer.echo(f"wrote {ref.path} (sha256 {ref.sha256[:12]})")


@train_app.command("concept-recognizer")
def train_concept_recognizer_cmd(
    run_dir: Path = typer.Option(Path("runs/concept-recognizer")), steps: int = typer.Option(4500, min=1),
    max_minutes: Optional[float] = MAX_MINUTES, out: Optional[Path] = typer.Option(None),
):
    """The concept recognizer behind concept presence (starts from the evaluator's weights)."""
    from .eval.concepts import WEIGHTS
    from .train.concept_recognizer import train_concept_recognizer

    train_concept_recognizer(run_dir, steps=steps, max_minutes=max_minutes, out=out or WEIGHTS)


@app.command("validate-concepts")
def validate_concepts_cmd(n: int = typer.Option(512, min=16), out: Optional[Path] = typer.Option(None)):
    """The concept recognizer's validation figures: fresh renders, presence, the base world and noise."""
    from .eval.validate_concepts import validate_concepts

    if out is not None:
        check_output(out, "--out")
    _print_figures(validate_concepts(n), out)


@app.command("validate-adapter")
def validate_adapter_cmd(
    adapter: str = typer.Argument(..., help="A user name (in the users folder) or an adapter folder."),
    prompts: int = typer.Option(32, min=1, help="Prompts with the user's token."),
    steps: int = typer.Option(25, min=1, max=MAX_STEPS), base: str = typer.Option("edge", help="The device U-Net."),
    vae: str = typer.Option("vae"), seed: int = typer.Option(0, min=0), out: Optional[Path] = typer.Option(None),
    record: bool = typer.Option(False, help="Also write the figures into the adapter's training.json and card."),
):
    """Concept presence with a user's adapter alone and with the base U-Net alone (the concept recognizer's reading)."""
    from .users.adapters import resolve_adapter
    from .users.personalize import record_presence
    from .users.presence import concept_presence

    if out is not None:
        check_output(out, "--out")
    ref = resolve_adapter(adapter)
    figures = concept_presence(ref, prompts, steps, base, vae, seed)
    _print_figures(figures, out)
    if record:
        record_presence(ref, figures)


def _print_figures(figures: dict, out: Optional[Path]) -> None:
    from .eval.validate import print_validation
    from .io import atomic_write_bytes

    print_validation(figures)
    if out is not None:
        atomic_write_bytes(out, (json.dumps(figures, indent=2) + "\n").encode())


@app.command("plan")
def plan_cmd(
    scenario: Optional[Path] = typer.Argument(None, help="A scenario JSON file (see --schema)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    solvers: Optional[str] = typer.Option(None, help="Comma-separated solvers (default: all): exact, brute, "
                                          "milp, dqn, ga, greedy, all-offload, all-local."),
    milp_time_limit: float = typer.Option(60.0, min=0.01, callback=finite, help="Seconds for the MILP."),
    seed: int = typer.Option(0, min=0, help="The genetic algorithm's seed."),
    schema: bool = typer.Option(False, "--schema", help="Print the scenario JSON Schema and exit."),
):
    """Who is offloaded and where each user's split lies: every planner on one scenario."""
    from .users.planner.report import plan, schema_json

    if schema:
        typer.echo(schema_json())
        return
    if scenario is None:
        raise UserError("a scenario file is needed (or --schema)")
    plan(scenario, solvers, json_out, milp_time_limit, seed, echo=typer.echo)


@train_app.command("planner")
def train_planner_cmd(
    run_dir: Path = typer.Option(Path("runs/planner")), steps: int = typer.Option(200_000, min=1),
    max_minutes: Optional[float] = MAX_MINUTES, out: Optional[Path] = typer.Option(None),
    seed: int = typer.Option(0, min=0),
):
    """The PER-DQN planner on scenarios drawn from the paper's family."""
    from .users.planner.dqn import WEIGHTS_DIR
    from .users.planner.train import train_planner

    best = train_planner(run_dir, out or WEIGHTS_DIR, steps=steps, max_minutes=max_minutes, seed=seed)
    typer.echo(f"best validation share of exact's improvement at N=20: {100 * best:.2f}%")


@bench_app.command("plan")
def bench_plan_cmd(
    out: Path = typer.Option(Path("docs/bench/plan")),
    scenarios: int = typer.Option(200, min=1, help="Random scenarios of the paper's family per N."),
    users: str = typer.Option("4,8,12,16,20,50,100", help="Values of N, comma-separated."),
    milp_max_users: int = typer.Option(20, min=0, help="Run the MILP up to this N (it is slow beyond)."),
    milp_time_limit: float = typer.Option(30.0, min=0.01, callback=finite),
    seed: int = typer.Option(0, min=0),
    solvers: Optional[str] = typer.Option(None, help="Only these solvers (comma-separated); their rows replace "
                                          "theirs in an existing plan.csv."),
):
    """Every planner against the exact optimum, for N = 4..100, both latency models and transmission forms."""
    from .bench.plan import bench_plan
    from .users.planner.registry import parse_solvers

    bench_plan(out, scenarios=scenarios, users=users, milp_max_users=milp_max_users,
               milp_time_limit=milp_time_limit, seed=seed, only=parse_solvers(solvers) if solvers else None,
               echo=typer.echo)


@bench_app.command("users")
def bench_users_cmd(
    out: Path = typer.Option(Path("docs/bench/users")),
    model: str = typer.Option("cloud", help="The served U-Net: a registry name or a diffusers folder."),
    edge_model: str = typer.Option("edge", help="The devices' U-Net."),
    vae: Optional[str] = typer.Option(None, help="The devices' decoder (default: tiny-decoder when installed)."),
    users: int = typer.Option(12, min=1, max=200, help="Simulated users (each device class in turn)."),
    waves: int = typer.Option(2, min=1, help="Waves the users arrive in."),
    gap: float = typer.Option(15.0, min=0.0, callback=finite, help="Seconds between waves (more than the slowest "
                              "device's all-local time)."),
    window: float = typer.Option(0.5, min=0.01, max=60, callback=finite, help="The server's scheduling window."),
    capacity: int = typer.Option(3, min=1, max=256, help="Users the server serves at once."),
    policies: str = typer.Option("planner,fifo,all-offload,all-local", help="Admission policies to compare."),
    cloud_steps: int = typer.Option(10, min=1, help="The split users ask for (what FIFO grants)."),
    steps: int = typer.Option(25, min=2, max=MAX_STEPS), size: int = typer.Option(64, min=16),
    seed: int = typer.Option(0, min=0),
    adapters: str = typer.Option("all", help="The users' adapters, handed out in turn: 'all' installed, 'none', "
                                 "or names, comma-separated."),
    pai: str = typer.Option(format_pai(), help="The PAI curve A,B (the planner's, and the objective's)."),
):
    """Admission end to end: a real server, simulated users of different device speeds, every policy."""
    from .bench.users import bench_users
    from .users.pai import parse_pai

    names = None if adapters == "all" else [] if adapters == "none" else [a for a in adapters.split(",") if a]
    bench_users(out, model=model, edge_model=edge_model, vae=vae, users=users, waves=waves, gap=gap, window=window,
                capacity=capacity, steps=steps, size=size, cloud_steps=cloud_steps, policies=policies, seed=seed,
                adapters=names, curve=parse_pai(pai), echo=typer.echo)


def _register_axes() -> None:
    """The space axis brings its own commands."""
    from .cli_parallel import register, register_bench

    register(app)
    register_bench(bench_app)


_register_axes()


def _quiet_libraries() -> None:
    """Library warnings are for developers; the CLI speaks in its own one-line errors."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _one_line(e: Exception) -> str:
    """A usage error as one line, with where to look for help; typer would print a usage block."""
    message = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


def main() -> None:
    # typer 0.29 raises its bundled copy of click's exceptions (typer._click), never click's own.
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    _quiet_libraries()
    try:
        code = app(prog_name="splitdiff", standalone_mode=False)  # an int when a command raised typer.Exit
    except UserError as e:
        typer.echo(f"splitdiff: error: {e}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("splitdiff: aborted", err=True)
        sys.exit(130)
    except NoArgsIsHelpError as e:  # `splitdiff`, `splitdiff train`: the help, as a usage error
        if e.format_message():  # empty when rich has already printed the help
            typer.echo(e.format_message())
        sys.exit(e.exit_code)
    except ClickException as e:
        typer.echo(f"splitdiff: error: {_one_line(e)}", err=True)
        sys.exit(e.exit_code)
    if isinstance(code, int) and code:
        sys.exit(code)
