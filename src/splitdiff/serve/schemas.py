"""What goes over the wire: the trajectory request, and one-line JSON errors.

The limits here are hard caps that hold for every server; a server may narrow the
step and size limits further (see `worker.Worker.check`). Every failure answers
`{"error": "<one line>"}` so that clients can show it as it is.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.responses import JSONResponse

from ..errors import one_line
from ..core.schedulers import MAX_STEPS, SCHEDULERS

MAX_PROMPT_CHARS = 1000
MAX_SIZE = 2048
MAX_TOKENS = 512
MAX_WIDTH = 4096

Finite = Annotated[float, Field(allow_inf_nan=False)]
EmbeddingRow = Annotated[list[Finite], Field(min_length=1, max_length=MAX_WIDTH)]
Embeddings = Annotated[list[EmbeddingRow], Field(min_length=1, max_length=MAX_TOKENS)]
Mask = Annotated[list[Literal[0, 1]], Field(min_length=1, max_length=MAX_TOKENS)]


class UserBlock(BaseModel):
    """Who is asking, for a server that admits users by its planner (`serve --admission`).

    Such a server decides whether this user is served at all and, if so, how many of the
    trajectory's steps it runs (`cloud_steps` in the request is then only the fallback's
    split); a server without admission ignores the block.
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200, description="The user's name, echoed in the decision.")
    device_step_seconds: Finite = Field(ge=0.0, le=3600.0, description="Seconds one denoising step takes on the "
                                        "user's device (its own model, batch 1), as the device measured it.")
    alpha: Finite = Field(ge=0.0, le=1e6, description="How much the user values a personal image: seconds of "
                          "latency worth one unit of PAI.")
    payload_bits: Finite | None = Field(None, ge=0.0, le=1e12, description="Bits the handoff carries (default: "
                                        "the server's estimate for this request).")


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
    user: UserBlock | None = Field(None, description="For a server with admission: it grants or denies this "
                                   "user and sets the split (cloud_steps).")

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


class DenyBody(BaseModel):
    """The admission's refusal (HTTP 409): the user runs every step on its own device."""

    decision: Literal["deny"]
    user: str
    steps: int = Field(description="The trajectory's steps, all of which the device runs.")
    cloud_steps: Literal[0] = 0
    device_steps: int
    policy: str = Field(description="Who decided: planner, fifo, all-offload, all-local, or fallback.")
    predicted_seconds: float = Field(description="The planner's latency for this user: its wait and all steps "
                                     "on the device.")
    error: str = Field(description="The same, in one line, for clients that only read errors.")


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    max_batch: int
    waiting: int
    running: int


class Profile(BaseModel):
    """The server's per-step time, k_e * B + h_e seconds for a call of B trajectories."""

    k_e: float
    h_e: float
    samples: int = Field(description="Batched steps the fit is made from (start-up warm-up included).")
    fitted: bool = Field(description="False while the conservative default holds.")
    overhead_s: float = Field(description="Median seconds a served request spends on the server outside U-Net "
                              "calls (its batch's prompt encodings, serialization), over recent requests.")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


ERROR_RESPONSES = {code: {"model": ErrorBody, "description": what} for code, what in {
    401: "missing or wrong bearer token", 404: "unknown model", 413: "body too large",
    422: "invalid request", 500: "internal error (logged)", 503: "busy or shutting down; retry later",
}.items()}
DENY_RESPONSE = {409: {"model": DenyBody, "description": "admission denied this user (a request with a user block "
                       "to a server with admission): run every step on the device"}}
