"""The gateway's HTTP API (FastAPI): submit a job, wait for it, read or stream its status.

Errors are RFC 9457 problem documents (``application/problem+json``): 401 no or unknown key,
413 body too large, 404 unknown job, 422 invalid job (``errors`` lists the field paths), 429 rate
limited and 503 Kafka unavailable (both with ``Retry-After``). See docs/gateway.md.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

import structlog
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse
from starlette.requests import ClientDisconnect

from sdagent.errors import GatewayError, JobRejected, KafkaUnavailable
from sdagent.gateway.auth import Caller, Gatekeeper, NotAuthenticated, RateLimited
from sdagent.gateway.config import GatewayConfig
from sdagent.gateway.status import StatusView
from sdagent.jobs import JOB_ID_PATTERN, Job, Limits, Status, StatusEvent, parse_job

log = structlog.get_logger(__name__)

PROBLEM = "application/problem+json"
PREFER_WAIT = re.compile(r"(?:^|[;,\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
SSE_PING_S = 15


class JobQueue(Protocol):
    async def submit(self, job: Job) -> None: ...


@dataclass
class GatewayParts:
    config: GatewayConfig
    limits: Limits
    queue: JobQueue
    view: StatusView
    gatekeeper: Gatekeeper
    producer_ready: Any = lambda: True  # callable: the broker answered recently


class JobQueued(BaseModel):
    """A job durably queued: where to follow it."""

    job_id: str
    status: Status = Status.QUEUED
    status_url: str
    events_url: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


class _ProblemError(GatewayError):
    def __init__(self, status: int, title: str, detail: str, *, errors: list | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(detail)
        self.problem = Problem(title=title, status=status, detail=detail, errors=errors)
        self.headers = headers or {}


PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {PROBLEM: {}}} for code in (401, 404, 413, 422, 429, 503)
}


def create_app(parts: GatewayParts | None = None) -> FastAPI:
    """The app; ``parts`` may come later (the server's lifespan sets ``app.state.parts`` once Kafka is up)."""
    app = FastAPI(
        title="sdagent gateway",
        version="1",
        summary="Stable Diffusion jobs over HTTP: submit, wait, follow; no framework in sight.",
        # No interactive pages: they would be endpoints without a key (and load scripts from a CDN).
        docs_url=None,
        redoc_url=None,
    )
    if parts is not None:
        app.state.parts = parts

    @app.exception_handler(_ProblemError)
    async def problem_response(_request: Request, error: _ProblemError) -> JSONResponse:
        return JSONResponse(error.problem.model_dump(exclude_none=True), status_code=error.problem.status,
                            headers=error.headers, media_type=PROBLEM)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
        return await problem_response(request, _ProblemError(422, "Invalid request", "see errors", errors=errors))

    @app.post("/v1/jobs", status_code=202, response_model=JobQueued, tags=["jobs"],
              responses={200: {"model": StatusEvent, "description": "finished within the wait"}, **PROBLEMS},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/Job"}}}}})  # fmt: skip
    async def submit_job(
        request: Request,
        parts: PartsDep,
        who: CallerDep,
        wait: Annotated[float | None, Query(ge=0, description="seconds to wait for the result (sync mode)")] = None,
        prefer: Annotated[str | None, Header(description="RFC 7240, e.g. wait=10")] = None,
    ) -> Response:
        body = await _read_body(request, parts.config.max_body_bytes, parts.config.body_timeout_s)
        job = _parse_job(body, parts.limits)
        try:
            await parts.queue.submit(job)
        except KafkaUnavailable as exc:
            log.warning("gateway.queue_unavailable", job_id=job.job_id, error=str(exc))
            raise _unavailable(
                parts.config,
                f"job {job.job_id} could not be confirmed as queued; resubmit it with the same job_id (it runs once)",
            ) from exc
        log.info("gateway.job_queued", job_id=job.job_id, caller=who.name, model=job.model)
        return await _answer_submission(parts, job, _wanted_wait(wait, prefer, parts.config.max_wait_s))

    @app.get("/v1/jobs/{job_id}", response_model=StatusEvent, response_model_exclude_none=True, tags=["jobs"],
             responses=PROBLEMS)  # fmt: skip
    async def job_status(
        job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)], parts: PartsDep, who: CallerDep
    ) -> StatusEvent:
        return _known(parts, job_id)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"],
             responses={200: {"content": {"text/event-stream": {}}, "description": "status events (SSE)"}, **PROBLEMS})  # fmt: skip
    async def job_events(job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)], parts: PartsDep,
                         who: CallerDep) -> EventSourceResponse:  # fmt: skip
        _known(parts, job_id)
        return EventSourceResponse(_event_stream(parts.view, job_id), ping=SSE_PING_S)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": Problem, "content": {PROBLEM: {}}}})
    async def readyz(parts: PartsDep) -> dict[str, str]:
        if not parts.view.caught_up.is_set():
            raise _unavailable(parts.config, "still reading recent job status from the results topic")
        if not await asyncio.to_thread(parts.producer_ready):
            raise _unavailable(parts.config, "the Kafka brokers do not answer")
        return {"status": "ready"}

    _publish_job_schema(app)
    return app


# --- request handling ------------------------------------------------------------------------------


# Dependencies are coroutines: FastAPI runs a plain ``def`` one on a worker thread, per request.
async def _parts(request: Request) -> GatewayParts:
    return request.app.state.parts  # replaced by the server's lifespan once Kafka is connected


PartsDep = Annotated[GatewayParts, Depends(_parts)]


async def _caller(
    request: Request,
    authorization: Annotated[str | None, Header(description="Bearer API key")] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Caller:
    parts: GatewayParts = request.app.state.parts
    try:
        who = parts.gatekeeper.authenticate(authorization, x_api_key)
        parts.gatekeeper.admit(who)
    except NotAuthenticated as exc:
        raise _ProblemError(401, "Unauthorized", str(exc), headers={"WWW-Authenticate": "Bearer"}) from exc
    except RateLimited as exc:
        raise _ProblemError(
            429, "Too Many Requests", str(exc), headers={"Retry-After": str(exc.retry_after_s)}
        ) from exc
    return who


CallerDep = Annotated[Caller, Depends(_caller)]


async def _read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body, refused with 413 past ``max_bytes`` (declared or streamed) before it is parsed,
    and with 408 when it has not all come within ``timeout_s``. A client that goes away mid-body
    is an event of its own (nobody is left to answer), not an error of the gateway's."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        log.info("gateway.body_too_slow", received_bytes=size, timeout_s=timeout_s)
        raise _ProblemError(408, "Request Timeout", f"the body did not arrive within {timeout_s:g} s",
                            headers={"Connection": "close"}) from None  # fmt: skip
    except ClientDisconnect:
        log.info("gateway.client_disconnected", received_bytes=size)
        raise _ProblemError(400, "Client disconnected", "the client went away before its body arrived") from None
    return b"".join(chunks)


def _parse_job(body: bytes, limits: Limits) -> Job:
    try:
        job = parse_job(body, limits)  # the agents' own parser: the same job gets the same fate
    except JobRejected as rejected:
        status = 413 if rejected.reason == "oversize" else 422
        schema_errors = rejected.reason == "invalid" and rejected.errors[0]["type"] != "over_limit"
        detail = "the job does not match the schema" if schema_errors else rejected.message
        raise _ProblemError(status, "Invalid job", detail, errors=rejected.errors) from None
    if job.reply_to is not None:
        raise _ProblemError(422, "Invalid job", "reply_to is for Kafka callers; use ?wait= or the events URL",
                            errors=[{"loc": ["reply_to"], "msg": "not allowed over HTTP", "type": "forbidden"}])  # fmt: skip
    return job


def _wanted_wait(query_wait: float | None, prefer: str | None, max_wait_s: float) -> float:
    wanted = query_wait
    if wanted is None and prefer:
        match = PREFER_WAIT.search(prefer)
        wanted = float(match.group(1)) if match else None
    return min(wanted or 0.0, max_wait_s)


async def _answer_submission(parts: GatewayParts, job: Job, wait_s: float) -> Response:
    headers = {"Location": f"/v1/jobs/{job.job_id}"}
    if wait_s > 0:
        headers["Preference-Applied"] = f"wait={wait_s:g}"
        final = await parts.view.wait_terminal(job.job_id, wait_s)
        if final is not None:
            return Response(final.model_dump_json(exclude_none=True), status_code=200, headers=headers,
                            media_type="application/json")  # fmt: skip
    queued = JobQueued(job_id=job.job_id, status_url=f"/v1/jobs/{job.job_id}",
                       events_url=f"/v1/jobs/{job.job_id}/events")  # fmt: skip
    return Response(queued.model_dump_json(), status_code=202, headers=headers, media_type="application/json")


def _known(parts: GatewayParts, job_id: str) -> StatusEvent:
    event = parts.view.get(job_id)
    if event is not None:
        return event
    if not parts.view.caught_up.is_set():
        raise _unavailable(parts.config, "still reading recent job status; try again")
    raise _ProblemError(404, "Not Found", f"no job {job_id} within the status window")


async def _event_stream(view: StatusView, job_id: str):
    latest, queue = view.subscribe(job_id)
    try:
        if latest is not None:
            yield _sse(latest)
            if latest.status.is_terminal:
                return
        while True:
            event = await queue.get()
            yield _sse(event)
            if event.status.is_terminal:
                return
    finally:  # the end, or the client went away
        view.unsubscribe(job_id, queue)


def _sse(event: StatusEvent) -> dict[str, str]:
    return {"event": event.status.value, "data": event.model_dump_json(exclude_none=True)}


def _unavailable(config: GatewayConfig, detail: str) -> _ProblemError:
    return _ProblemError(503, "Service Unavailable", detail, headers={"Retry-After": str(config.retry_after_s)})


def _too_large(max_bytes: int) -> _ProblemError:
    # Connection: close: the rest of a body too large to read is never waited for on this connection.
    return _ProblemError(413, "Content Too Large", f"the body is larger than {max_bytes} bytes",
                         headers={"Connection": "close"})  # fmt: skip


def _publish_job_schema(app: FastAPI) -> None:
    """Put the job schema (and its parts) under components/schemas, where the request body points."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        job_schema = Job.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(job_schema.pop("$defs", {}))
        components["Job"] = job_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def dump_openapi(app: FastAPI) -> str:
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"
