"""Model registry: names -> diffusers components.

The embedded family (`cloud`, `edge`, `vae`, `tiny-decoder`) ships in
splitdiff/weights as diffusers folders of fp16 safetensors. Any diffusers folder can
be named instead: a model folder (config.json + weights), or a whole Stable Diffusion
pipeline folder, from which the matching sub-folder is taken.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import UserError

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
UNET_NAMES = ("cloud", "edge")
VAE_NAMES = ("vae", "tiny-decoder")


def _folder(spec: str, names: tuple[str, ...], subfolder: str, kind: str) -> Path:
    if spec in names:
        path = WEIGHTS_DIR / spec
        if not (path / "config.json").exists():
            raise UserError(f"the embedded {kind} {spec!r} is not in this installation "
                            f"(no {path / 'config.json'}); train it or name a diffusers folder")
        return path
    path = Path(spec).expanduser()
    if (path / subfolder / "config.json").exists():
        return path / subfolder
    if (path / "config.json").exists():
        return path
    raise UserError(f"unknown {kind} {spec!r}: not one of {', '.join(names)} and not a diffusers folder")


def _class_name(folder: Path) -> str:
    try:
        return json.loads((folder / "config.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{folder / 'config.json'} is not a diffusers model config") from None


def weights_variant(folder: Path, variant: str | None = None) -> str | None:
    """The weights variant to load: the one asked for, else "fp16" when a folder ships only
    `*.fp16.safetensors` (as many Stable Diffusion downloads do), else None (the plain file)."""
    if variant is not None:
        if not any(folder.glob(f"*.{variant}.safetensors")):
            raise UserError(f"{folder} has no {variant!r} variant (no *.{variant}.safetensors)")
        return variant
    plain = any(p for p in folder.glob("*.safetensors") if p.name.count(".") == 1)
    return "fp16" if not plain and any(folder.glob("*.fp16.safetensors")) else None


def _from_pretrained(cls, folder: Path, dtype: torch.dtype, variant: str | None = None):
    """`variant` applies to folders from elsewhere: the embedded family ships plain fp16 files."""
    variant = None if folder.parent == WEIGHTS_DIR else weights_variant(folder, variant)
    try:
        return cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, variant=variant).eval()
    except (OSError, ValueError, EnvironmentError) as e:
        raise UserError(f"cannot load {cls.__name__} from {folder}: {str(e).splitlines()[0]}") from None


@lru_cache(maxsize=8)
def load_unet(spec: str, dtype: torch.dtype = torch.float32, variant: str | None = None):
    from diffusers import UNet2DConditionModel

    folder = _folder(spec, UNET_NAMES, "unet", "U-Net")
    if _class_name(folder) != "UNet2DConditionModel":
        raise UserError(f"{folder} holds a {_class_name(folder)}, not a UNet2DConditionModel")
    return _from_pretrained(UNet2DConditionModel, folder, dtype, variant)


@lru_cache(maxsize=8)
def load_vae(spec: str, dtype: torch.dtype = torch.float32, variant: str | None = None):
    from diffusers import AutoencoderKL, AutoencoderTiny

    folder = _folder(spec, VAE_NAMES, "vae", "VAE")
    classes = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}
    name = _class_name(folder)
    if name not in classes:
        raise UserError(f"{folder} holds a {name}, not an AutoencoderKL or AutoencoderTiny")
    return _from_pretrained(classes[name], folder, dtype, variant)


def noise_schedule(spec: str) -> dict | None:
    """A pipeline folder's noise schedule (its scheduler config's NOISE_SCHEDULE_KEYS), else None
    (the family's SD schedule); the named scheduler's own settings stay its own."""
    from .schedulers import NOISE_SCHEDULE_KEYS

    path = Path(spec).expanduser()
    cfg = path / "scheduler" / "scheduler_config.json"
    if spec not in UNET_NAMES and cfg.exists():
        data = json.loads(cfg.read_text())
        return {k: v for k, v in data.items() if k in NOISE_SCHEDULE_KEYS}
    return None


def folder_scheduler(spec: str) -> tuple[str, dict]:
    """A pipeline folder's own scheduler, as (splitdiff's name for its class, its checked config).

    What `--scheduler folder` runs: every setting of the folder's scheduler (Karras sigmas,
    solver order...) that the trajectory format can carry; a class or a setting it cannot
    carry is refused in one line rather than run under another name.
    """
    from .schedulers import SCHEDULERS, check_config

    cfg = Path(spec).expanduser() / "scheduler" / "scheduler_config.json"
    if spec in UNET_NAMES or not cfg.exists():
        raise UserError(f"--scheduler folder needs a pipeline folder with scheduler/scheduler_config.json; "
                        f"{spec!r} has none")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        raise UserError(f"{cfg} is not a JSON scheduler config") from None
    by_class = {cls.__name__: name for name, cls in SCHEDULERS.items()}
    name = by_class.get(data.get("_class_name")) if isinstance(data, dict) else None
    if name is None:
        raise UserError(f"{cfg}: scheduler class {data.get('_class_name') if isinstance(data, dict) else data!r} "
                        f"is not one splitdiff runs ({', '.join(by_class)})")
    return name, check_config(name, data)


def family_available() -> bool:
    return all((WEIGHTS_DIR / n / "config.json").exists() for n in UNET_NAMES + ("vae",))


def parse_model_specs(items: list[str] | None) -> dict[str, str]:
    """['cloud=PATH', 'edge'] -> {'cloud': 'PATH', 'edge': 'edge'}."""
    out = {}
    for item in items or []:
        name, sep, source = item.partition("=")
        if not name or (sep and not source):
            raise UserError(f"cannot read --model {item!r}; write NAME=PATH")
        out[name] = source if sep else name
    return out


def resolve(name: str, specs: dict[str, str]) -> str:
    """The source a plan's model name stands for."""
    if name in specs:
        return specs[name]
    if name in UNET_NAMES:
        return name
    known = sorted(set(specs) | set(UNET_NAMES))
    raise UserError(f"unknown model {name!r} in the plan; known: {', '.join(known)} (or pass --model {name}=PATH)")
