"""Safe, atomic files: safetensors + JSON only, never pickle, never half-written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _publish(tmp: str, path: Path) -> None:
    """Give the temporary file ordinary permissions (mkstemp makes it 0600), then rename it into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_image(img, path: str | os.PathLike, text: dict[str, str] | None = None) -> None:
    """`text` goes into a PNG's text chunks (how the image was made); other formats leave it out."""
    import io

    buf = io.BytesIO()
    fmt = (Path(path).suffix.lstrip(".") or "png").upper()
    extra = {}
    if fmt == "PNG" and text:
        from PIL.PngImagePlugin import PngInfo

        extra["pnginfo"] = info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)  # iTXt when the value is not Latin-1
    img.save(buf, format="JPEG" if fmt == "JPG" else fmt, **extra)
    atomic_write_bytes(path, buf.getvalue())


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why `path` could not be written later (None if it could), found now without leaving anything behind.

    Lets a command refuse a bad output path before hours of work rather than after.
    """
    path = Path(path)
    if path.is_dir():
        return "is a directory"
    folder = path.parent
    try:
        while not folder.exists():  # atomic_write_bytes creates missing folders: the nearest existing one decides
            folder = folder.parent
    except OSError as e:
        return f"cannot look at {folder}: {e.strerror}"
    if not folder.is_dir():
        return f"{folder} is not a directory"
    try:
        tempfile.TemporaryFile(dir=folder).close()  # unnamed where the OS allows it, else removed at once
    except OSError as e:
        return f"cannot create files in {folder}: {e.strerror}"
    return None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """safetensors with a JSON document in its metadata header, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"json": json.dumps(meta or {})})
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("json", "{}"))
    return load_file(str(path)), meta
