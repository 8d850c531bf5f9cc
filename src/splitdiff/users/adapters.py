"""Per-user LoRA adapters on a U-Net: find them, check them, load, switch and unload them.

An adapter is a folder in the peft/diffusers layout: `adapter_config.json` (peft's
LoraConfig) and `adapter_model.safetensors` (peft's state dict keys, the config also
in the header's `lora_adapter_metadata`, as diffusers writes it), plus splitdiff's
`training.json` (user, concept, token, steps, the base U-Net's architecture and weight
fingerprints) and a `README.md` card. peft's `set_peft_model_state_dict` and
diffusers' `UNet2DConditionModel.load_lora_adapter(folder, prefix=None,
weight_name="adapter_model.safetensors")` both load it.

A user's adapter is found by name in the users folder (`$SPLITDIFF_USERS`, else the
shipped `weights/users/`), or given as a folder. `AdapterRef` names one adapter
version by its content hash, which is what a trajectory's provenance records.

Loading never merges adapter weights into the base layers, so disabling or unloading
leaves the U-Net computing exactly what it computed before (bit for bit). Loading,
switching and unloading mutate the U-Net object: callers that share one U-Net between
threads hold their own lock around `adapter_applied`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..core.registry import WEIGHTS_DIR
from ..errors import UserError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TRAINING_FILE = "training.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the LoraConfig in the safetensors header
USER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class AdapterError(UserError):
    """An adapter that cannot be found, read or put on this U-Net."""


def users_dir() -> Path:
    """Where adapters are looked up by user name, and where `personalize` writes by default."""
    return Path(os.environ.get("SPLITDIFF_USERS") or WEIGHTS_DIR / "users").expanduser()


def check_user(name: str) -> str:
    if not USER_NAME.fullmatch(name or ""):
        raise AdapterError(f"user name {name!r} must be 1 to 32 characters of a-z, 0-9, '_' and '-', "
                           f"starting with a letter")
    return name


@dataclass(frozen=True)
class AdapterRef:
    """One version of one user's adapter: who it is for, where it is, and the hash of its content."""

    user: str
    path: Path
    sha256: str
    concept: str | None = None
    token: str | None = None

    @property
    def adapter_name(self) -> str:
        """The name it is loaded under on a U-Net: two versions of one user's adapter never collide."""
        return f"{self.user}_{self.sha256[:12]}"

    def record(self) -> dict:
        """Its training record (training.json), or {} for an adapter made elsewhere."""
        return _training_record(self.path, self.user)


def content_hash(folder: Path) -> str:
    """sha256 over adapter_config.json, a NUL byte, then adapter_model.safetensors: what the adapter computes."""
    h = hashlib.sha256()
    h.update((folder / CONFIG_FILE).read_bytes())
    h.update(b"\0")
    with open(folder / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path, who: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"adapter {who!r}: {path} is not readable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"adapter {who!r}: {path} is not a JSON object")
    return data


def _training_record(folder: Path, who: str) -> dict:
    path = folder / TRAINING_FILE
    return _read_json(path, who) if path.exists() else {}


def _ref(folder: Path, user: str | None = None) -> AdapterRef:
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise AdapterError(f"adapter {user or str(folder)!r} at {folder} has no {name}")
    record = _training_record(folder, user or str(folder))
    user = user or record.get("user") or folder.name
    return AdapterRef(user, folder, content_hash(folder), record.get("concept"), record.get("token"))


def list_adapters(root: Path | None = None) -> list[str]:
    """The user names that have an adapter in the users folder."""
    root = root or users_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if USER_NAME.fullmatch(p.name) and (p / CONFIG_FILE).exists())


def resolve_adapter(spec: str | os.PathLike, root: Path | None = None) -> AdapterRef:
    """A user name (looked up in the users folder) or an adapter folder -> its AdapterRef."""
    path = Path(spec).expanduser()
    if (path / CONFIG_FILE).exists() or (path / WEIGHTS_FILE).exists():
        return _ref(path)
    name = str(spec)
    root = root or users_dir()
    if USER_NAME.fullmatch(name) and (root / name).is_dir():
        return _ref(root / name, name)
    known = list_adapters(root)
    raise AdapterError(f"unknown user or adapter {name!r}: not an adapter folder and not one of "
                       f"{', '.join(known) if known else 'no users'} (in {root})")


def architecture_hash(unet) -> str:
    """sha256 of the U-Net's config (its public keys): equal for U-Nets an adapter fits."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=list).encode()).hexdigest()


def weights_fingerprint(unet) -> str:
    """sha256 of the base U-Net's weights (adapter layers left out), in a fixed key order."""
    h = hashlib.sha256()
    for key, value in sorted(unet.state_dict().items()):
        if "lora_" in key:
            continue
        h.update(key.replace(".base_layer", "").encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _load_weights(ref: AdapterRef) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = _read_json(ref.path / CONFIG_FILE, ref.user)
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"adapter {ref.user!r}: {ref.path / CONFIG_FILE} is not a LoRA config "
                           f"(peft_type {config.get('peft_type')!r})")
    try:
        tensors = load_file(str(ref.path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"adapter {ref.user!r}: {ref.path / WEIGHTS_FILE} is not a readable safetensors file "
                           f"({' '.join(str(e).split())[:120]})") from None
    if not tensors or not all(".lora_A." in k or ".lora_B." in k for k in tensors):
        raise AdapterError(f"adapter {ref.user!r}: {ref.path / WEIGHTS_FILE} holds no LoRA weights")
    return tensors, config


def _check_fits(unet, ref: AdapterRef, tensors: dict[str, torch.Tensor]) -> None:
    """An AdapterError unless every LoRA pair sits on a module of this U-Net with matching sides."""
    record = ref.record()
    arch = record.get("base_architecture")
    if arch and arch != architecture_hash(unet):
        raise AdapterError(f"adapter {ref.user!r} was trained for another U-Net architecture "
                           f"({record.get('base', 'unknown')}, config {arch[:12]}), not this one "
                           f"({architecture_hash(unet)[:12]})")
    modules = dict(unet.named_modules())
    for key, value in tensors.items():
        name, _, part = key.partition(".lora_")
        module = modules.get(name)
        module = getattr(module, "base_layer", module)
        if isinstance(module, torch.nn.Linear):
            sides = (module.in_features, module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            sides = (module.in_channels, module.out_channels)
        else:
            raise AdapterError(f"adapter {ref.user!r} was trained for another U-Net architecture: this one has no "
                               f"linear or conv layer {name!r}")
        got = value.shape[1] if part.startswith("A") else value.shape[0]
        want = sides[0] if part.startswith("A") else sides[1]
        if value.ndim < 2 or got != want:
            raise AdapterError(f"adapter {ref.user!r} was trained for another U-Net architecture: layer {name!r} "
                               f"has {want} {'inputs' if part.startswith('A') else 'outputs'} here, {got} there")


@contextmanager
def _quiet_peft():
    """peft warns when a U-Net holds several adapters, or loses its active one: both are what this module does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")
        yield


def loaded_adapters(unet) -> list[str]:
    """Names of the adapters loaded on `unet` (AdapterRef.adapter_name)."""
    return list(getattr(unet, "peft_config", None) or {})


def _lora_layers(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def active_adapter(unet) -> str | None:
    """The adapter the U-Net computes with now, or None for the base model."""
    layers = _lora_layers(unet)
    if not layers or layers[0].disable_adapters:
        return None
    active = [a for a in layers[0].active_adapters if a in loaded_adapters(unet)]
    return active[0] if active else None


def load_adapter(unet, ref: AdapterRef) -> str:
    """Put the adapter's layers on `unet` (once per content hash) without changing what it computes now.

    Returns the name it is loaded under; `use_adapter` makes it the active one.
    """
    name = ref.adapter_name
    if name in loaded_adapters(unet):
        return name
    tensors, config = _load_weights(ref)
    _check_fits(unet, ref, tensors)
    before = active_adapter(unet)
    config = {k: v for k, v in config.items() if k not in ("peft_version",)}
    try:
        with _quiet_peft():
            unet.load_lora_adapter({k: v.to(unet.dtype) for k, v in tensors.items()}, prefix=None, adapter_name=name,
                                   metadata=config)
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        raise AdapterError(f"adapter {ref.user!r} cannot be put on this U-Net: {str(e).splitlines()[0]}") from None
    _activate(unet, before)
    return name


def _activate(unet, name: str | None) -> None:
    if not loaded_adapters(unet):
        return
    if name is None:
        unet.disable_adapters()
    else:
        unet.set_adapter(name)
        unet.enable_adapters()


def use_adapter(unet, ref: AdapterRef | None) -> None:
    """Compute with this (loaded) adapter alone, or with none (the base model) for None: a switch costs no I/O."""
    if ref is not None and ref.adapter_name not in loaded_adapters(unet):
        raise AdapterError(f"adapter {ref.user!r} is not loaded on this U-Net; load_adapter first")
    _activate(unet, None if ref is None else ref.adapter_name)


def unload_adapter(unet, ref: AdapterRef) -> None:
    """Remove the adapter's layers; with the last one gone the U-Net's modules are its own again."""
    name = ref.adapter_name
    if name not in loaded_adapters(unet):
        return
    active = active_adapter(unet)
    with _quiet_peft():
        unet.delete_adapters(name)
    if not loaded_adapters(unet):
        unet.unload_lora()
    else:
        _activate(unet, None if active == name else active)


@contextmanager
def adapter_applied(unet, ref: AdapterRef | None) -> Iterator[str | None]:
    """Compute with `ref`'s adapter inside the block (None: the base model); afterwards the U-Net is as it was.

    An adapter loaded here is unloaded on the way out; one that was loaded already stays,
    and whichever adapter was active before is active again.
    """
    before = active_adapter(unet)
    loaded_here = ref is not None and ref.adapter_name not in loaded_adapters(unet)
    if ref is not None:
        load_adapter(unet, ref)
    use_adapter(unet, ref)
    try:
        yield None if ref is None else ref.adapter_name
    finally:
        if loaded_here:
            unload_adapter(unet, ref)
        _activate(unet, before)


def adapter_timings(unet, ref: AdapterRef, repeats: int = 5) -> dict[str, float]:
    """Median milliseconds to load (read, hash, check, inject), to switch it on or off, and to unload it."""
    import statistics
    import time

    load, switch, unload = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fresh = resolve_adapter(ref.path)
        load_adapter(unet, fresh)
        t1 = time.perf_counter()
        use_adapter(unet, fresh)
        use_adapter(unet, None)
        t2 = time.perf_counter()
        unload_adapter(unet, fresh)
        t3 = time.perf_counter()
        load.append(t1 - t0)
        switch.append((t2 - t1) / 2)
        unload.append(t3 - t2)
    return {f"{k}_ms": 1000 * statistics.median(v) for k, v in (("load", load), ("switch", switch),
                                                                 ("unload", unload))}


def publish_folder(tmp: Path, out: Path) -> None:
    """Replace `out` with the finished folder `tmp`: readers see the old adapter or the new one, never half."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
