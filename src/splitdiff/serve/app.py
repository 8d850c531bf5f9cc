"""The cloud's HTTP face: one route that runs a trajectory's first steps, health, metrics.

Every failure is a one-line JSON error with a 4xx status when the request is at
fault; nothing a client sends reaches a traceback. Internal errors answer 500 with a
fixed line and are logged in full on the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer
from pydantic import ValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from ..core.schedulers import SCHEDULERS
from ..errors import UserError
from .auth import BearerAuth
from .body import BodyLimit
from .engine import Engine, EngineFailure, ShuttingDown
from .metrics import CountStatuses
from .batching import Busy
from .schemas import (DENY_RESPONSE, ERROR_RESPONSES, ErrorBody, Health, Profile, TrajectoryRequest, error_response,
                      one_line)
from .worker import UnknownModel

log = logging.getLogger("splitdiff.serve")

MAX_BODY_BYTES = 4 * 1024 * 1024
SERVER_ID = f"{socket.gethostname()}:{os.getpid()}"  # which process answered: replicas tell apart by it
TRAJECTORY_RESPONSE = {200: {"description": "The trajectory after `cloud_steps` (splitdiff safetensors).",
                             "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                 "format": "binary"}}}}}


def create_app(engine: Engine, token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout: float = 30.0, admission=None) -> FastAPI:
    """The app around a (not yet started) engine; the app's lifespan starts and stops it.

    With `admission` (serve/admission.py), requests that carry a user block are granted
    or denied by it and run the split it sets; all others go straight to the engine.
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        if admission is not None:
            admission.start()
        try:
            yield
        finally:
            if admission is not None:
                await run_in_threadpool(admission.stop)
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="splitdiff cloud", lifespan=lifespan, summary="Runs the first steps of trajectories, "
                  "batched step by step across requests; the edge finishes them.")
    metrics = engine.metrics
    auth = [Security(HTTPBearer(auto_error=False))] if token else []  # documents the scheme; BearerAuth enforces

    @app.post("/v1/trajectories", response_class=Response,
              responses={**TRAJECTORY_RESPONSE, **DENY_RESPONSE, **ERROR_RESPONSES}, dependencies=auth,
              openapi_extra=REQUEST_BODY)
    async def create_trajectory(request: Request) -> Response:
        """Encode the prompt, run `cloud_steps` steps on the served model, answer the serialized trajectory.

        The body is TrajectoryRequest as JSON (see the schema). On a server with admission,
        a request with a user block waits for its scheduling window: granted, it runs the
        split the server set (the `X-Splitdiff-Cloud-Steps` header, and the trajectory's
        step); denied, it is answered 409 with `{"decision": "deny", ...}` and the device
        runs every step.
        """
        start = time.perf_counter()
        req = await _parse(request)
        user = req.user
        order = engine.worker.check(req)  # the request's lists are gone after this line
        del req
        verdict = None
        if admission is not None and user is not None:
            decided = await _result(request, admission.submit(order, user).future)
            if decided is None:
                return error_response(499, "client closed the request")
            verdict, job = decided
            if not verdict.granted:
                return JSONResponse(verdict.deny_body(), status_code=409, headers=verdict.headers())
        else:
            job = engine.submit(order)
        traj = await _result(request, job.future)
        if traj is None:
            return error_response(499, "client closed the request")  # nobody reads it; counted in metrics
        ready = time.perf_counter()
        data = await run_in_threadpool(traj.to_bytes, order.half)
        seconds = time.perf_counter() - start
        if verdict is not None:
            engine.profile.observe_overhead(time.perf_counter() - verdict.decided - job.step_seconds)
        metrics.request_seconds.observe(seconds)
        return Response(data, media_type="application/octet-stream", headers={
            "X-Splitdiff-Request": str(job.id),
            "X-Splitdiff-Server": SERVER_ID,
            "X-Splitdiff-Server-Seconds": f"{seconds:.6f}",
            "X-Splitdiff-Serialize-Seconds": f"{seconds - (ready - start):.6f}",
            "X-Splitdiff-Queue-Seconds": f"{(job.admitted or job.arrived) - job.arrived:.6f}",
            "X-Splitdiff-Mean-Batch": f"{job.mean_batch:.3f}",
            "X-Splitdiff-Step-Seconds": f"{job.step_seconds:.6f}",
            **(verdict.headers() if verdict is not None else {}),
        })

    @app.get("/healthz", response_model=Health, responses={503: {"model": ErrorBody}})
    def healthz():
        """Liveness of the engine, and its load."""
        if not engine.alive or engine.stopping:
            return error_response(503, "the engine is not running", {"Retry-After": "1"})
        waiting, running = engine.load()
        return Health(status="ok", model=engine.worker.name, max_batch=engine.queue.max_batch,
                      waiting=waiting, running=running)

    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @app.get("/v1/profile", response_model=Profile)
    def profile():
        """The server's per-step profile, seconds per batched step = k_e * B + h_e, fitted from its recent calls."""
        return Profile(**engine.profile.snapshot())

    @app.get("/metrics", response_class=Response)
    def prometheus():
        """Prometheus text format: queue depth, batch sizes, step latency, requests by status."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    _add_error_handlers(app)
    _document_request_body(app, engine.worker)
    app.router.redirect_slashes = False  # a redirect would echo the Host header into Location
    app.state.engine = engine
    app.state.admission = admission
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout=body_timeout, metrics=metrics)
    if token:
        app.add_middleware(BearerAuth, token=token)
    app.add_middleware(CountStatuses, metrics=metrics)  # outermost: sees every answer
    return app


REQUEST_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/TrajectoryRequest"}}}}}


def request_schema(worker) -> dict:
    """TrajectoryRequest's JSON schema with this server's own limits, and its one-of rule."""
    schema = TrajectoryRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # the nested models (UserBlock) are components of their own
    props = schema["properties"]
    props["steps"]["maximum"] = props["cloud_steps"]["maximum"] = worker.max_steps
    props["size"]["maximum"] = worker.max_size
    props["size"]["multipleOf"] = worker.factor
    props["scheduler"]["enum"] = list(SCHEDULERS)
    schema["oneOf"] = [{"required": ["prompt"], "not": {"required": ["prompt_embeds"]}},
                       {"required": ["prompt_embeds", "negative_embeds"], "not": {"required": ["prompt"]}}]
    return schema


def _document_request_body(app: FastAPI, worker) -> None:
    """The route parses its own body (see `_parse`); the schema still documents it."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = build()
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            components["TrajectoryRequest"] = request_schema(worker)
            nested = TrajectoryRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in nested.get("$defs", {}).items():
                components.setdefault(name, sub)
        return app.openapi_schema

    app.openapi = openapi


async def _parse(request: Request) -> TrajectoryRequest:
    """The body as a TrajectoryRequest, parsed straight from its bytes.

    pydantic's JSON parser builds the model without an intermediate dict, and nothing
    here caches the bytes on the request (as `request.json()` would): once the route
    has turned the request into an order, its JSON is garbage.
    """
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    raw = b"".join([chunk async for chunk in request.stream()])
    if kind != "application/json" and not kind.endswith("+json"):
        raise UserError("the body must be a JSON object (send a JSON object with Content-Type: application/json)")
    if not raw.strip():
        raise UserError("the request needs a JSON object body")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"the body is not valid UTF-8 (byte {e.start})") from None
    try:
        return TrajectoryRequest.model_validate_json(raw)
    except ValidationError as e:
        raise UserError(validation_message(e)) from None


async def _result(request: Request, future: Future, poll: float = 0.25):
    """The job's trajectory; None if the client went away first (its job is cancelled, freeing its place)."""
    waiting = asyncio.wrap_future(future)
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=poll)
            if done:
                return waiting.result()
            if await request.is_disconnected():
                waiting.cancel()
                return None
    except asyncio.CancelledError:  # the server is going away: free the job's place before leaving
        waiting.cancel()
        raise


def _add_error_handlers(app: FastAPI) -> None:
    def handle(*types, status: int, message=lambda e: str(e), headers=None):
        async def handler(_request: Request, exc: Exception):
            return error_response(status, message(exc), headers)

        for t in types:
            app.add_exception_handler(t, handler)

    handle(RequestValidationError, status=422, message=validation_message)
    handle(UnknownModel, status=404)
    handle(UserError, status=422)
    handle(Busy, ShuttingDown, status=503, headers={"Retry-After": "1"})
    handle(EngineFailure, status=500, message=lambda e: f"internal error: {e}")

    async def http_error(_request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    async def internal_error(request: Request, exc: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


def validation_message(exc: RequestValidationError | ValidationError) -> str:
    """Pydantic's first complaint as `field: reason`, without echoing the input."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
        reason = f"invalid JSON: {first.get('ctx', {}).get('error', 'cannot parse')}"
        where = ""
    else:
        reason = first.get("msg", "invalid").removeprefix("Value error, ")
        if not where and first.get("type") == "missing":
            reason = "the request needs a JSON object body"
        elif not where and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            reason += " (send a JSON object with Content-Type: application/json)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return one_line(f"{where}: {reason}{more}" if where else f"{reason}{more}")
