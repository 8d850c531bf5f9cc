"""`splitdiff personalize`: a user's LoRA adapter on the device (edge) U-Net, DreamBooth-style.

Data: at most 20 renders of the user's concept, written with their token ("a large
sks at the top left, on a navy background"; 0 to 2 base objects beside it), and
base-world renders for prior preservation, so the rest of the world is not forgotten.
The world draws the prior set itself, better than DreamBooth's samples of the base
model. Each step takes half its batch from each; both are encoded once, to latents
with the family's VAE and to token states with the text encoder, like the U-Nets'
own training data. The base U-Net's objective is kept: epsilon prediction on SD's
schedule, offset noise, Min-SNR weighting, and prompt dropout on the prior half only
(so the unconditional prediction stays the base model's).

The run is the project's training loop (resumable, progress bar, `--max-minutes`);
every checkpoint publishes the adapter folder (see users/adapters.py) atomically.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..io import atomic_write_bytes, unwritable_reason
from ..world import render_images
from ..world.concepts import (DEFAULT_TOKEN, Concept, check_token, concept_prompt, parse_concept,
                              sample_concept_scene)
from ..world.dataset import sample_batch
from .adapters import (CONFIG_FILE, METADATA_KEY, TRAINING_FILE, WEIGHTS_FILE, AdapterRef, architecture_hash,
                       check_user, content_hash, publish_folder, resolve_adapter, users_dir, weights_fingerprint)

# Rank 16 on attention, projections and resnet convs: 207,360 parameters on the edge U-Net.
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2")
MAX_CONCEPT_RENDERS = 20
WARMUP = 25  # steps; fixed, so that a run stopped early and resumed with more steps sees the same rates
IMAGE_SIZE = 64
# What a run is made from: a checkpoint made from anything else is not this run's to resume.
RUN_KEYS = ("user", "concept", "token", "base_architecture", "base_weights", "rank", "n_concept", "n_prior",
            "batch_size", "seed")


@dataclass(frozen=True)
class PersonalizeConfig:
    steps: int = 500
    rank: int = 16
    batch_size: int = 16  # half concept renders, half prior renders
    lr: float = 1e-3
    n_concept: int = MAX_CONCEPT_RENDERS
    n_prior: int = 256
    prior_weight: float = 1.0
    prior_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 100


def default_run_dir(user: str) -> Path:
    return Path("runs") / "users" / user


def _check_inputs(user: str, spec: str, token: str, out: Path, cfg: PersonalizeConfig) -> Concept:
    check_user(user)
    concept = parse_concept(spec)
    check_token(token)
    if not 1 <= cfg.n_concept <= MAX_CONCEPT_RENDERS:
        raise UserError(f"concept renders must be 1 to {MAX_CONCEPT_RENDERS}, not {cfg.n_concept}")
    if cfg.batch_size < 2:
        raise UserError(f"batch size {cfg.batch_size} leaves no room for both concept and prior renders")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    reason = unwritable_reason(out / CONFIG_FILE)
    if reason:
        raise UserError(f"--out {out}: {reason}")
    return concept


@torch.no_grad()
def _encode(vae, encoder, images: torch.Tensor, prompts: list[str], chunk: int = 64) -> dict[str, torch.Tensor]:
    """Latents (VAE mean x scaling factor, as the latent cache keeps them) and token states of renders."""
    latents = [vae.encode(images[i:i + chunk].to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
               for i in range(0, len(images), chunk)]
    embeds, masks = encoder.encode_batch(prompts)
    return {"latents": torch.cat(latents) * vae.config.scaling_factor, "embeds": embeds, "masks": masks}


def training_data(concept: Concept, token: str, vae, encoder, cfg: PersonalizeConfig):
    """(concept set, prior set, concept prompts): the same for the same seed, so a resumed run sees the same data."""
    rng = random.Random(cfg.seed)
    scenes = [sample_concept_scene(rng, concept) for _ in range(cfg.n_concept)]
    images = render_images(scenes, IMAGE_SIZE, rng)
    prompts = [concept_prompt(s, concept, token) for s in scenes]
    prior = sample_batch(random.Random(cfg.seed + 1), cfg.n_prior, IMAGE_SIZE)
    return _encode(vae, encoder, images, prompts), _encode(vae, encoder, prior.images, prior.prompts), prompts


def _run_record(run_dir: Path) -> dict | None:
    ckpt = run_dir / "checkpoint.safetensors"
    if not ckpt.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(ckpt), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("json", "{}")).get("extra", {})
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same mistake to the user
        raise UserError(f"cannot resume from {ckpt}: {' '.join(str(e).split())[:120]}; remove it to start over") \
            from None


def _check_resumable(run_dir: Path, record: dict) -> None:
    previous = _run_record(run_dir)
    if previous is None:
        return
    differ = [k for k in RUN_KEYS if previous.get(k) != record.get(k)]
    if differ:
        k = differ[0]
        raise UserError(f"{run_dir} holds a run with {k} {previous.get(k)!r}, not {record.get(k)!r}; "
                        f"remove it or pass another --run-dir")


def write_card(folder: Path, record: dict) -> None:
    """README.md beside the adapter, written from its training record."""
    example = concept_prompt_example(parse_concept(record["concept"]), record["token"])
    lines = [
        f"# {record['user']}: a LoRA adapter for \"{record['concept']}\"", "",
        f"- concept: `{record['concept']}`, written `{record['token']}` in prompts: \"{example}\"",
        f"- base U-Net: `{record['base']}` (architecture sha256 `{record['base_architecture'][:16]}`, "
        f"weights sha256 `{record['base_weights'][:16]}`)",
        f"- adapter: LoRA rank {record['rank']} (alpha {record['rank']}) on {', '.join(record['target_modules'])}: "
        f"{record['parameters']:,} parameters, fp16 safetensors in the peft layout",
        f"- data: {record['n_concept']} renders of the concept at {IMAGE_SIZE} px (0 to 2 base objects beside it) "
        f"and {record['n_prior']} base-world renders for prior preservation; batch {record['batch_size']} "
        f"(half each), learning rate {record['lr']:g}",
        f"- steps: {record['steps']} of {record['total_steps']}",
        f"- wall minutes: {record.get('wall_seconds', 0) / 60:.1f}",
        f"- trained with: `splitdiff personalize --user {record['user']} --concept \"{record['concept']}\" "
        f"--token {record['token']} --steps {record['total_steps']} --batch-size {record['batch_size']} "
        f"--rank {record['rank']}`" + (f" on {record['device']}" if record.get("device") else ""),
    ]
    if record.get("content_sha256"):
        lines.append(f"- content sha256 (adapter_config.json, NUL, adapter_model.safetensors): "
                     f"`{record['content_sha256']}`")
    if record.get("presence"):
        p = record["presence"]
        lines += ["", "## Concept presence", "",
                  f"{p['prompts']} prompts with the token, {p['steps']} {p['scheduler']} steps, guidance "
                  f"{p['guidance']:g}, read by the concept recognizer anywhere in the image (at the cell the "
                  f"prompt names):", "",
                  f"- the adapter alone (all steps): {p['adapter']:.3f} ({p['adapter_at_cell']:.3f})",
                  f"- the base U-Net alone: {p['base']:.3f} ({p['base_at_cell']:.3f})",
                  f"- the rest of the prompt (background and base objects), adapter / base: "
                  f"{p['rest_adapter']:.3f} / {p['rest_base']:.3f}"]
    lines += ["", "## Loading", "", "```python",
              "from splitdiff.core.registry import load_unet",
              "from splitdiff.users.adapters import adapter_applied, resolve_adapter", "",
              f"unet = load_unet(\"{record['base']}\")",
              f"with adapter_applied(unet, resolve_adapter(\"{record['user']}\")):",
              "    ...  # the U-Net computes with the adapter here; after the block, exactly as before", "```", ""]
    atomic_write_bytes(folder / "README.md", "\n".join(lines).encode())


def concept_prompt_example(concept: Concept, token: str) -> str:
    from ..world.scene import Scene

    return concept_prompt(Scene("navy", (concept.object("large", 0, "yellow"),)), concept, token)


def export_adapter(unet, adapter_name: str, out: Path, record: dict) -> None:
    """The adapter folder (config, fp16 weights, training.json, README.md), published atomically."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        unet.peft_config[adapter_name].save_pretrained(str(tmp))
        config = json.loads((tmp / CONFIG_FILE).read_text())
        tensors = {k: v.detach().to("cpu", torch.float16).contiguous()
                   for k, v in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", METADATA_KEY: json.dumps(config)})
        (tmp / WEIGHTS_FILE).chmod(0o644)  # safetensors makes it private; the folder's other files are 0644
        record = {**record, "content_sha256": content_hash(tmp)}
        (tmp / TRAINING_FILE).write_text(json.dumps(record, indent=1) + "\n")
        write_card(tmp, record)
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def personalize(user: str, concept: str, token: str = DEFAULT_TOKEN, out: Path | None = None,
                run_dir: Path | None = None, base: str = "edge", vae: str = "vae", max_minutes: float | None = None,
                check_prompts: int = 32, config: PersonalizeConfig = PersonalizeConfig(),
                device: str = "cpu") -> AdapterRef:
    """Train (or go on training) `user`'s adapter; returns it once published. Nothing is written on bad input.

    On a GPU the step runs under bf16 autocast, like the U-Nets' own trainers; the data
    and the random draws stay those of the CPU run (they are made on the CPU, then moved).
    """
    from peft import LoraConfig

    from ..core.devices import resolve_device
    from ..core.registry import load_unet, load_vae
    from ..text import default_encoder
    from ..train.loop import LoopConfig, optimize, run_training, set_cosine_lr
    from ..train.unet import MIN_SNR_GAMMA, NOISE_OFFSET, autocast, noise_schedule

    cfg = config
    dev = resolve_device(device)
    out = Path(out) if out is not None else users_dir() / user
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(user)
    parsed = _check_inputs(user, concept, token, out, cfg)
    torch.manual_seed(cfg.seed)
    unet = copy.deepcopy(load_unet(base)).float().train()  # the registry's copy is shared: never train it
    record = {"user": user, "concept": parsed.spec, "token": token, "base": base,
              "base_architecture": architecture_hash(unet), "base_weights": weights_fingerprint(unet),
              "rank": cfg.rank, "target_modules": list(TARGET_MODULES), "n_concept": cfg.n_concept,
              "n_prior": cfg.n_prior, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
              "total_steps": cfg.steps, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    _check_resumable(run_dir, record)
    vae_model = load_vae(vae)
    encoder = default_encoder()
    concept_set, prior_set, _ = training_data(parsed, token, vae_model, encoder, cfg)
    empty, empty_mask = encoder([""])
    concept_set, prior_set = ({k: v.to(dev) for k, v in data.items()} for data in (concept_set, prior_set))
    empty, empty_mask = empty.to(dev), empty_mask.to(dev)

    unet.to(dev).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=list(TARGET_MODULES),
                                init_lora_weights="gaussian"), adapter_name=user)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    record["parameters"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = noise_schedule()
    alphas = sched.alphas_cumprod.to(dev)
    half = cfg.batch_size // 2

    def step(i: int) -> float:
        rng = random.Random(cfg.seed * 1_000_003 + i)  # data depends only on the step: resumable
        g = torch.Generator().manual_seed(cfg.seed * 7919 + i)
        ci = torch.tensor([rng.randrange(cfg.n_concept) for _ in range(half)], device=dev)
        pi = torch.tensor([rng.randrange(cfg.n_prior) for _ in range(cfg.batch_size - half)], device=dev)
        x0 = torch.cat([concept_set["latents"][ci], prior_set["latents"][pi]])
        ctx = torch.cat([concept_set["embeds"][ci], prior_set["embeds"][pi]])
        mask = torch.cat([concept_set["masks"][ci], prior_set["masks"][pi]])
        drop = torch.cat([torch.zeros(half, dtype=torch.bool),
                          torch.rand(len(pi), generator=g) < cfg.prior_dropout]).to(dev)
        ctx[drop], mask[drop] = empty[0], empty_mask[0]
        b = len(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g)
        noise = torch.randn(x0.shape, generator=g) + NOISE_OFFSET * torch.randn(b, x0.shape[1], 1, 1, generator=g)
        t, noise = t.to(dev), noise.to(dev)
        with autocast(dev):
            pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        snr = alphas[t] / (1 - alphas[t])
        per = F.mse_loss(pred.float(), noise, reduction="none").mean((1, 2, 3)) * snr.clamp(max=MIN_SNR_GAMMA) / snr
        set_cosine_lr(opt, i, cfg.steps, cfg.lr, warmup=WARMUP)
        return optimize(opt, per[:half].mean() + cfg.prior_weight * per[half:].mean(), clip=1.0)

    def export(state, model):
        export_adapter(model, user, out, {**record, **state.extra, "steps": state.step})

    loop = LoopConfig(run_dir, cfg.steps, max_minutes, checkpoint_every=cfg.checkpoint_every, record=record)
    state = run_training(loop, unet, opt, step, export, desc=f"personalize {user}")
    ref = resolve_adapter(out)
    if state.step >= cfg.steps and check_prompts > 0:
        from .presence import concept_presence

        record_presence(ref, concept_presence(ref, n=check_prompts, base=base, vae=vae))
    return ref


def record_presence(ref: AdapterRef, presence: dict) -> None:
    """Write measured concept presence into the adapter's training.json and card (not part of its content hash)."""
    saved = json.loads((ref.path / TRAINING_FILE).read_text())
    saved["presence"] = presence
    atomic_write_bytes(ref.path / TRAINING_FILE, (json.dumps(saved, indent=1) + "\n").encode())
    write_card(ref.path, saved)

