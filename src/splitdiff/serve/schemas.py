"""What goes over the wire: the trajectory request, and one-line JSON errors.

The limits here are hard caps that hold for every server; a server may narrow the
step and size limits further (see `worker.Worker.check`). Every failure answers
`{"error": "<one line>"}` so that clients can show it as it is.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.responses import JSONResponse

from ..core.schedulers import MAX_STEPS, SCHEDULERS

MAX_PROMPT_CHARS = 1000
MAX_SIZE = 2048
MAX_TOKENS = 512
MAX_WIDTH = 4096

Finite = Annotated[float, Field(allow_inf_nan=False)]
EmbeddingRow = Annotated[list[Finite], Field(min_length=1, max_length=MAX_WIDTH)]
Embeddings = Annotated[list[EmbeddingRow], Field(min_length=1, max_length=MAX_TOKENS)]
Mask = Annotated[list[Literal[0, 1]], Field(min_length=1, max_length=MAX_TOKENS)]


class TrajectoryRequest(BaseModel):
    """Start a trajectory and run its first `cloud_steps` of `steps` on the cloud's model."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=200, description="The served model's name; default: the one served.")
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="Encoded by the cloud.")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    prompt_embeds: Embeddings | None = Field(None, description="L x D context, instead of a prompt.")
    negative_embeds: Embeddings | None = Field(None, description="L x D; required with prompt_embeds.")
    prompt_mask: Mask | None = Field(None, description="L attention mask (1 = token) for prompt_embeds.")
    negative_mask: Mask | None = None
    seed: int = Field(0, ge=-(2 ** 63), le=2 ** 64 - 1)
    steps: int = Field(25, ge=1, le=MAX_STEPS, description="Steps of the whole trajectory.")
    cloud_steps: int = Field(10, ge=1, le=MAX_STEPS, description="Steps the cloud runs, from step 0.")
    scheduler: str = Field("dpmsolver++", max_length=50, description=", ".join(SCHEDULERS))
    guidance: Finite = Field(5.0, ge=0.0, le=100.0, description="Classifier-free guidance (<= 1 disables it).")
    size: int = Field(64, ge=16, le=MAX_SIZE, description="Image side in pixels.")
    half: bool = Field(False, description="Answer with fp16 tensors (about half the bytes, not bit-exact).")

    @model_validator(mode="after")
    def _consistent(self) -> "TrajectoryRequest":
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.cloud_steps > self.steps:
            raise ValueError(f"cloud_steps {self.cloud_steps} exceeds steps {self.steps}")
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise ValueError("give exactly one of prompt and prompt_embeds")
        if self.prompt_embeds is not None:
            self._check_embeddings()
        elif self.negative_embeds is not None or self.prompt_mask is not None or self.negative_mask is not None:
            raise ValueError("negative_embeds and masks go with prompt_embeds, not with a prompt")
        return self

    def _check_embeddings(self) -> None:
        emb, neg = self.prompt_embeds, self.negative_embeds
        if neg is None:
            raise ValueError("prompt_embeds needs negative_embeds of the same shape")
        widths = {len(row) for row in emb} | {len(row) for row in neg}
        if len(emb) != len(neg) or len(widths) != 1:
            raise ValueError("prompt_embeds and negative_embeds must both be L x D with the same L and D")
        for name, mask in (("prompt_mask", self.prompt_mask), ("negative_mask", self.negative_mask)):
            if mask is not None and len(mask) != len(emb):
                raise ValueError(f"{name} has {len(mask)} entries but the embeddings have {len(emb)} tokens")


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong, in one line.")


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    max_batch: int
    waiting: int
    running: int


def one_line(text: str, limit: int = 300) -> str:
    """Collapse whitespace so that a message is always a single, bounded line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


ERROR_RESPONSES = {code: {"model": ErrorBody, "description": what} for code, what in {
    401: "missing or wrong bearer token", 404: "unknown model", 413: "body too large",
    422: "invalid request", 500: "internal error (logged)", 503: "busy or shutting down; retry later",
}.items()}
