"""A planning scenario: N users who each want one image, one shared server, one PAI curve.

The JSON schema is the pydantic model below (unknown fields are errors). Times are in
seconds, payloads in bits, bandwidths in Hz. User i, if granted, has its first T - n_i
steps run by the server in a batch and the last n_i on its own device; if denied it runs
all T steps on its device. See latency.py for what each user's latency L_i contains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ...errors import UserError

MAX_USERS = 1000  # a scenario is planned in one go; past this, split the requests into windows
MAX_CAPACITY = 10_000
MAX_T = 100_000

Latency = Literal["constant-batch", "shrinking-batch"]
Transmission = Literal["sound", "paper-code"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class PAICurve(_Strict):
    """PAI(n) = 1 / (1 + exp(-a (n - b))): how personal the image is with the last n steps on the device."""

    a: float = Field(gt=0, description="Slope of the logistic curve, per step.")
    b: float = Field(description="Midpoint of the logistic curve, in steps.")

    def __call__(self, n):
        return 1.0 / (1.0 + np.exp(-self.a * (np.asarray(n, dtype=float) - self.b)))


class UserSpec(_Strict):
    id: str | None = Field(None, max_length=200, description="Optional name, echoed in reports.")
    tau: float = Field(ge=0, description="Device seconds per denoising step (batch 1).")
    alpha: float = Field(ge=0, description="Weight of PAI for this user (seconds of latency per unit of PAI).")
    request_time: float = Field(0.0, ge=0, description="When the request arrived, within the window.")
    payload_bits: float = Field(0.0, ge=0, description="Bits sent for a granted user (prompt + intermediate).")
    bandwidth_hz: float = Field(100e6, gt=0, description="The link's bandwidth W (shared by the batch when "
                                "server.shared_channel).")


class ServerSpec(_Strict):
    k_e: float = Field(ge=0, description="Server seconds per step per batched user.")
    h_e: float = Field(ge=0, description="Server seconds per step, fixed part.")
    capacity: int = Field(ge=0, le=MAX_CAPACITY, description="Most users granted at once (batch size B).")
    shared_channel: bool = Field(True, description="The B granted users share each link's bandwidth equally.")


class Scenario(_Strict):
    """One planning instance; `splitdiff plan --schema` prints it as JSON Schema."""

    T: int = Field(ge=1, le=MAX_T, description="Denoising steps per image.")
    n_min: float = Field(ge=0, description="Fewest steps a granted user runs on its device.")
    n_max: float = Field(ge=0, description="Most steps a granted user runs on its device.")
    integer_splits: bool = Field(False, description="Splits are whole steps (a real server); else continuous.")
    pai: PAICurve
    server: ServerSpec
    latency: Latency = Field("constant-batch", description="constant-batch: the paper's model, every granted user "
                             "pays T - n_i steps at batch B; shrinking-batch: a step-level batching server, whose "
                             "batch shrinks as users leave at their own splits.")
    transmission: Transmission = Field("sound", description="sound: bits / (W * eta); paper-code: bits * eta / W, "
                                       "as the paper's released code computes it.")
    spectral_efficiency: float = Field(10.0, gt=0, description="eta, bit/s per Hz.")
    window: float = Field(1.0, ge=0, description="The scheduling window's end: user i waits window - request_time.")
    users: list[UserSpec] = Field(max_length=MAX_USERS)

    @model_validator(mode="after")
    def _check(self):
        if not self.n_min <= self.n_max <= self.T:
            raise ValueError(f"n range [{self.n_min:g}, {self.n_max:g}] must lie within 0..T={self.T}")
        if self.integer_splits and (self.n_min != int(self.n_min) or self.n_max != int(self.n_max)):
            raise ValueError("integer_splits needs whole n_min and n_max")
        late = [i for i, u in enumerate(self.users) if u.request_time > self.window]
        if late:
            raise ValueError(f"user {late[0]} requested at {self.users[late[0]].request_time:g} s, "
                             f"after the window's end {self.window:g} s")
        return self


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{where + ': ' if where else ''}{msg}{more}"


def parse_scenario(data, source: str = "scenario") -> Scenario:
    """A Scenario from parsed JSON; any mistake is one UserError line naming the field."""
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{source}: {_first_error(e)}") from None


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return parse_scenario(data, str(path))


@dataclass(frozen=True)
class Instance:
    """A scenario as arrays, what the solvers compute on (built once per solve)."""

    T: float
    n_lo: float
    n_hi: float
    integer: bool
    a: float
    b: float
    k_e: float
    h_e: float
    capacity: int  # min(server capacity, N)
    shrinking: bool
    tau: np.ndarray
    alpha: np.ndarray
    wait: np.ndarray
    tx_unit: np.ndarray  # a granted user's transmission seconds at B = 1
    shared: bool
    request_time: np.ndarray

    @classmethod
    def of(cls, s: Scenario) -> "Instance":
        u = s.users
        bits = np.array([x.payload_bits for x in u], dtype=float)
        band = np.array([x.bandwidth_hz for x in u], dtype=float)
        eta = s.spectral_efficiency
        tx = bits / (band * eta) if s.transmission == "sound" else bits * eta / band
        t = np.array([x.request_time for x in u], dtype=float)
        return cls(T=float(s.T), n_lo=float(s.n_min), n_hi=float(s.n_max), integer=s.integer_splits,
                   a=s.pai.a, b=s.pai.b, k_e=s.server.k_e, h_e=s.server.h_e,
                   capacity=min(s.server.capacity, len(u)), shrinking=s.latency == "shrinking-batch",
                   tau=np.array([x.tau for x in u], dtype=float), alpha=np.array([x.alpha for x in u], dtype=float),
                   wait=s.window - t, tx_unit=tx, shared=s.server.shared_channel, request_time=t)

    @property
    def N(self) -> int:
        return len(self.tau)

    def pai(self, n):
        return 1.0 / (1.0 + np.exp(-self.a * (np.asarray(n, dtype=float) - self.b)))

    def tx(self, B: int) -> np.ndarray:
        """Each user's transmission seconds if granted in a batch of B."""
        return self.tx_unit * (B if self.shared else 1)

    def local_value(self) -> np.ndarray:
        """Each user's alpha * PAI(T) - L when denied (all T steps local)."""
        return self.alpha * self.pai(self.T) - self.T * self.tau - self.wait

    def splits_are_feasible(self, n: np.ndarray) -> bool:
        ok = bool(np.all((n >= self.n_lo - 1e-9) & (n <= self.n_hi + 1e-9)))
        return ok and (not self.integer or bool(np.all(n == np.round(n))))
