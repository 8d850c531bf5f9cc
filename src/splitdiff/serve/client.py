"""The edge's side of the wire: ask the cloud for a trajectory, retrying what may pass.

Transport failures, timeouts, 5xx and 429 answers and bodies that are corrupt or not
the trajectory asked for are retried with jittered exponential backoff, never sooner
than the server's Retry-After asks (and never more than MAX_WAIT); when every try fails the
caller gets `CloudUnavailable` and may fall back. A 4xx is the request's fault, so it
is a one-line `UserError`, except the admission's refusal (409 with
`{"decision": "deny"}`), which is a decision, not a fault: the caller gets `Denied`
and runs every step itself.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Callable

import httpx

from ..core.trajectory import MAX_BYTES, Trajectory, TrajectoryError
from ..errors import UserError, one_line


MAX_ERROR_BYTES = 64 * 1024
MAX_WAIT = 30.0  # seconds between two tries at most, whatever a Retry-After header asks


class CloudUnavailable(Exception):
    """The cloud gave no usable answer after every try."""


class Denied(Exception):
    """The cloud's admission denied this user: every step runs on the device (the plan, not a failure)."""

    def __init__(self, answer: dict, handoff: "Handoff"):
        super().__init__(answer.get("error", "admission denied"))
        self.answer, self.handoff = answer, handoff


@dataclass
class Handoff:
    """What one successful exchange cost."""

    sent_bytes: int
    received_bytes: int
    round_trip: float  # seconds from sending the request to holding the whole answer
    server_seconds: float  # the part the server spent: queue, steps, serialization
    serialize_seconds: float  # the server's share of that spent serializing
    parse_seconds: float  # loading the answer here
    attempts: int
    decision: dict | None = None  # the admission's: decision, cloud_steps, device_steps, policy, predicted_seconds
    step_seconds: float = 0.0  # the server's U-Net calls this trajectory took part in

    @property
    def network_seconds(self) -> float:
        return max(0.0, self.round_trip - self.server_seconds)

    @property
    def seconds(self) -> float:
        """The handoff's own cost: serialize, transfer, parse."""
        return self.serialize_seconds + self.network_seconds + self.parse_seconds


class CloudClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, tries: int = 3,
                 backoff: float = 0.5):
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise UserError(f"--cloud-url {url!r} is not an http(s)://HOST[:PORT] address")
        if timeout <= 0 or tries < 1:
            raise UserError("the cloud timeout must be positive and at least one try is needed")
        self.url = url.rstrip("/")
        self.tries, self.backoff = tries, backoff
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def __enter__(self) -> "CloudClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def trajectory(self, request: dict,
                   check: Callable[[Trajectory], None] | None = None) -> tuple[Trajectory, Handoff]:
        """POST /v1/trajectories with `request` (see schemas.TrajectoryRequest); the answer, parsed.

        An answer that does not load, or that `check` refuses with a TrajectoryError (not
        the trajectory asked for), counts as a failed try, like a 5xx.
        """
        try:
            body = json.dumps(request, allow_nan=False).encode()
        except ValueError:
            raise UserError("the request holds a number that is not finite (nan or inf)") from None
        problem, asked_wait = "no try was made", None
        for attempt in range(1, self.tries + 1):
            if attempt > 1:
                time.sleep(retry_delay(attempt, self.backoff, asked_wait))
            start = time.perf_counter()
            asked_wait = None
            try:
                r, content = self._post(body)
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {one_line(str(e)) or 'no detail'}"
                continue
            if r.status_code >= 500 or r.status_code == 429:
                problem = f"HTTP {r.status_code}: {_reason(r, content)}"
                asked_wait = retry_after(r.headers.get("Retry-After"))
                continue
            if r.status_code == 409 and (answer := _deny_answer(content)) is not None:
                raise Denied(answer, Handoff(len(body), len(content), time.perf_counter() - start, 0.0, 0.0, 0.0,
                                             attempt, decision=answer))
            if r.status_code >= 400:
                raise UserError(f"the cloud refused the request (HTTP {r.status_code}): {_reason(r, content)}")
            received = time.perf_counter()
            if content is None:
                problem = f"corrupt answer: more than the {MAX_BYTES} bytes any trajectory takes"
                continue
            try:
                traj = Trajectory.from_bytes(content)
            except TrajectoryError as e:
                problem = f"corrupt answer: {e}"
                continue
            try:
                if check is not None:
                    check(traj)
            except TrajectoryError as e:
                problem = f"unusable answer: {e}"
                continue
            return traj, Handoff(len(body), len(content), received - start,
                                 _float(r.headers.get("X-Splitdiff-Server-Seconds")),
                                 _float(r.headers.get("X-Splitdiff-Serialize-Seconds")),
                                 time.perf_counter() - received, attempt, decision=_grant(r.headers),
                                 step_seconds=_float(r.headers.get("X-Splitdiff-Step-Seconds")))
        raise CloudUnavailable(f"{self.url} failed {self.tries} tries; last: {problem}")

    def _post(self, body: bytes) -> tuple[httpx.Response, bytes | None]:
        """The answer and its body, read only up to what any trajectory (or error) takes; None beyond."""
        with self._http.stream("POST", f"{self.url}/v1/trajectories", content=body,
                               headers={"Content-Type": "application/json"}) as r:
            limit = MAX_BYTES if r.status_code < 400 else MAX_ERROR_BYTES
            declared = r.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                return r, None
            chunks, size = [], 0
            for chunk in r.iter_bytes():
                size += len(chunk)
                if size > limit:
                    return r, None
                chunks.append(chunk)
            return r, b"".join(chunks)


def _deny_answer(content: bytes | None) -> dict | None:
    """The admission's refusal, if that is what a 409 body is."""
    try:
        answer = json.loads(content)
    except (TypeError, ValueError, RecursionError):
        return None
    if not isinstance(answer, dict) or answer.get("decision") != "deny":
        return None
    return answer


def _grant(headers: httpx.Headers) -> dict | None:
    """The admission's grant, from a trajectory answer's headers (None from a server without admission)."""
    if headers.get("X-Splitdiff-Decision") != "grant":
        return None
    return {"decision": "grant", "cloud_steps": int(_float(headers.get("X-Splitdiff-Cloud-Steps"))),
            "device_steps": int(_float(headers.get("X-Splitdiff-Device-Steps"))),
            "policy": headers.get("X-Splitdiff-Policy", ""),
            "predicted_seconds": _float(headers.get("X-Splitdiff-Predicted-Seconds"))}


def retry_after(value: str | None) -> float | None:
    """A Retry-After header's seconds (the delay form; an HTTP date or garbage counts as none)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if 0 <= seconds < float("inf") else None


def retry_delay(attempt: int, backoff: float, asked: float | None = None, rng: random.Random | None = None) -> float:
    """Seconds to wait before try `attempt` (2, 3, ...): exponential backoff with jitter, at least
    what the server asked for, at most MAX_WAIT.

    The jitter (a uniform half to whole of the backoff) keeps clients that failed together
    from all coming back in the same instant, which would make the server busy again.
    """
    base = backoff * 2 ** (attempt - 2) * (rng or random).uniform(0.5, 1.0)
    return min(MAX_WAIT, max(base, asked or 0.0))


def _reason(r: httpx.Response, content: bytes | None) -> str:
    if content is None:
        return r.reason_phrase
    try:
        return one_line(json.loads(content)["error"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return one_line(content[:200].decode("utf-8", "replace")) or r.reason_phrase


def _float(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return 0.0
