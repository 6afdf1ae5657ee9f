"""The framework-agnostic job schema, its limits, and the status events that answer a job.

A job says *what* to generate; the backends decide *how*. The schema is versioned
(``schema_version``) and published as JSON Schema by ``sdagent schema`` (copy in
``docs/job.schema.json``). Hard bounds live in the schema itself; :class:`Limits` narrows them per
deployment and is applied on top by :func:`parse_job`.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sdagent.errors import JobRejected

SCHEMA_VERSION: Literal[1] = 1

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"
# One path segment of a model name: no separators, no leading dot (so never "." or "..").
_MODEL_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._ +-]{0,199}$")
_SAMPLER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 +._-]{0,63}$"


class JobKind(str, enum.Enum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    TXT2VID = "txt2vid"
    WORKFLOW = "workflow"  # a raw ComfyUI API-format graph, passed through


class OutputFormat(str, enum.Enum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"
    MP4 = "mp4"
    WEBM = "webm"
    GIF = "gif"

    @property
    def is_video(self) -> bool:
        return self in (OutputFormat.MP4, OutputFormat.WEBM, OutputFormat.GIF)


class Limits(BaseModel):
    """Per-deployment bounds applied on top of the schema's hard bounds (``[limits]`` in the config)."""

    model_config = ConfigDict(extra="forbid")

    max_width: int = Field(2048, ge=64, le=8192)
    max_height: int = Field(2048, ge=64, le=8192)
    max_steps: int = Field(150, ge=1, le=1000)
    max_batch_size: int = Field(8, ge=1, le=64)
    max_prompt_chars: int = Field(4000, ge=1, le=100_000)
    max_video_frames: int = Field(240, ge=1, le=10_000)
    # A base64 init image rides inside the message, so the cap is generous; the broker's
    # message.max.bytes (1 MiB by default) is usually the tighter bound.
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_metadata_bytes: int = Field(16 * 1024, ge=0)


class InitImage(BaseModel):
    """The source image of an img2img job: an S3 URI or the image itself in base64, exactly one."""

    model_config = ConfigDict(extra="forbid")

    s3_uri: str | None = Field(None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+$")
    base64: str | None = Field(None, min_length=4)

    @model_validator(mode="after")
    def _exactly_one_source(self) -> InitImage:
        if (self.s3_uri is None) == (self.base64 is None):
            raise ValueError("give exactly one of s3_uri or base64")
        return self


class VideoSpec(BaseModel):
    """Length and rate of a txt2vid job."""

    model_config = ConfigDict(extra="forbid")

    frames: int = Field(16, ge=1, le=10_000)
    fps: int = Field(8, ge=1, le=120)


class OutputSpec(BaseModel):
    """Where and how outputs are stored; always inside the configured bucket and prefix."""

    model_config = ConfigDict(extra="forbid")

    format: OutputFormat | None = None  # default: png for images, mp4 for video
    prefix: str | None = Field(None, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9/._=-]*$")
    filename: str | None = Field(None, max_length=256)  # template, see sdagent.storage.outputs


class Webhook(BaseModel):
    """Where the gateway POSTs the job's final answer (docs/gateway.md); agents only echo it."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(..., max_length=2048, pattern=r"^https?://[^\s/?#]+[^\s]*$")


# Defaults a receiver must not draw again: a new job id would be a new job.
_ALWAYS_SENT = frozenset({"schema_version", "job_id"})


class Job(BaseModel):
    """One generation job, as read from the jobs topic."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False)

    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: str = Field(default_factory=lambda: str(uuid.uuid4()), pattern=JOB_ID_PATTERN)
    kind: JobKind = JobKind.TXT2IMG
    model: str = Field(..., min_length=1, max_length=512)
    prompt: str = Field("", max_length=100_000)
    negative_prompt: str = Field("", max_length=100_000)
    width: int = Field(512, ge=64, le=8192, multiple_of=8)
    height: int = Field(512, ge=64, le=8192, multiple_of=8)
    steps: int = Field(20, ge=1, le=1000)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    sampler: str | None = Field(None, pattern=_SAMPLER_PATTERN)
    seed: int = Field(-1, ge=-1, le=2**32 - 1)  # -1: the backend picks one, reported in the result
    batch_size: int = Field(1, ge=1, le=64)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    init_image: InitImage | None = None
    video: VideoSpec | None = None
    workflow: dict[str, Any] | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)
    deadline: datetime | None = None
    ttl_s: float | None = Field(None, gt=0)
    submitted_at: datetime | None = None
    priority: int = Field(0, ge=-10, le=10)
    reply_to: str | None = Field(None, pattern=TOPIC_PATTERN)
    reply_partition: int | None = Field(None, ge=0)
    correlation_id: str | None = Field(None, max_length=256)
    metadata: dict[str, Any] = Field(default_factory=dict)
    webhook: Webhook | None = None
    attempt: int = Field(0, ge=0, le=1000)  # how often the fleet took this job back and re-queued it

    @field_validator("model")
    @classmethod
    def _model_stays_inside_model_dir(cls, value: str) -> str:
        segments = value.split("/")
        if any(not _MODEL_SEGMENT.match(segment) for segment in segments):
            raise ValueError(
                "model must be a relative name of safe segments (letters, digits, ._ +-), "
                "no leading dot, no empty segment, no backslash"
            )
        return value

    @model_validator(mode="after")
    def _kind_has_its_inputs(self) -> Job:
        needs = {
            JobKind.IMG2IMG: ("init_image", self.init_image),
            JobKind.TXT2VID: ("video", self.video),
            JobKind.WORKFLOW: ("workflow", self.workflow),
        }
        if self.kind in needs:
            field, value = needs[self.kind]
            if value is None:
                raise ValueError(f"kind {self.kind.value} needs {field}")
        if self.deadline is not None and self.ttl_s is not None:
            raise ValueError("give deadline or ttl_s, not both")
        fmt = self.output.format
        if fmt is not None and fmt.is_video != (self.kind is JobKind.TXT2VID):
            raise ValueError(f"output format {fmt.value} does not fit kind {self.kind.value}")
        return self

    def to_bytes(self) -> bytes:
        """The job as it goes on the wire: the fields its caller set, plus its identity.

        Only what was set, so that a receiver's ``model_fields_set`` is the caller's: a workflow
        job's graph keeps its own settings where the caller gave no job field for them.
        """
        fields = self.model_fields_set | _ALWAYS_SENT
        return self.model_dump_json(include=fields, exclude_none=True).encode()

    @property
    def output_format(self) -> OutputFormat:
        if self.output.format is not None:
            return self.output.format
        return OutputFormat.MP4 if self.kind is JobKind.TXT2VID else OutputFormat.PNG

    def expires_at(self, received_at: datetime) -> datetime | None:
        """When the job expires; a TTL counts from ``submitted_at``, else from when Kafka got it."""
        if self.deadline is not None:
            return _aware(self.deadline)
        if self.ttl_s is not None:
            start = _aware(self.submitted_at) if self.submitted_at else received_at
            return start + timedelta(seconds=self.ttl_s)
        return None


def check_limits(job: Job, limits: Limits) -> None:
    """Raise ``ValueError`` naming the first field beyond the deployment's limits."""
    checks = [
        ("width", job.width, limits.max_width),
        ("height", job.height, limits.max_height),
        ("steps", job.steps, limits.max_steps),
        ("batch_size", job.batch_size, limits.max_batch_size),
        ("prompt", len(job.prompt), limits.max_prompt_chars),
        ("negative_prompt", len(job.negative_prompt), limits.max_prompt_chars),
    ]
    if job.video is not None:
        checks.append(("video.frames", job.video.frames, limits.max_video_frames))
    if job.metadata:
        checks.append(("metadata", len(json.dumps(job.metadata)), limits.max_metadata_bytes))
    for field, value, limit in checks:
        if value > limit:
            raise ValueError(f"{field} is {value}, over this deployment's limit of {limit}")


def parse_job(raw: bytes | None, limits: Limits, default_job_id: str | None = None) -> Job:
    """Decode and validate one job, or raise :class:`JobRejected`: the one parser of every path
    (the jobs topic and the gateway), so a job's fate never depends on how it was sent.

    The rules: at most ``limits.max_message_bytes``; UTF-8 JSON (no BOM, no other encoding) whose
    top level is an object; ``schema_version`` 1; every field exactly of its JSON type (strict: no
    ``true`` for a number, no ``"4"`` for an integer); then the deployment's limits.
    ``default_job_id`` names a job that came without one; derive it from the record's place so a
    redelivery of the same record gets the same id.
    """
    if raw is None:
        raise JobRejected("invalid", "empty message (tombstone)")
    if len(raw) > limits.max_message_bytes:
        raise JobRejected("oversize", f"{len(raw)} bytes, over the limit of {limits.max_message_bytes}")
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise JobRejected("not_json", f"not UTF-8: {exc}") from None
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise JobRejected("not_json", f"not a JSON document: {exc}") from None
    if not isinstance(document, dict):
        raise JobRejected("invalid", "a job must be a JSON object")
    given_id = "job_id" in document
    if default_job_id is not None:
        document.setdefault("job_id", default_job_id)
    reply = _reply_fields(document)
    version = document.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise JobRejected("schema_version", f"schema_version {version!r} is not {SCHEMA_VERSION}", **reply)
    try:
        job = Job.model_validate_json(raw, strict=True)  # exactly what the JSON Schema says
    except ValidationError as exc:
        errors = [{"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]}
                  for error in exc.errors(include_url=False, include_input=False)]  # fmt: skip
        raise JobRejected("invalid", describe_validation_error(exc), errors=errors, **reply) from None
    try:
        check_limits(job, limits)
    except ValueError as exc:  # "<field> is <value>, over this deployment's limit of <limit>"
        field = str(exc).split(" ", 1)[0]
        errors = [{"loc": field.split("."), "msg": str(exc), "type": "over_limit"}]
        raise JobRejected("invalid", str(exc), errors=errors, **reply) from None
    if default_job_id is not None and not given_id:
        job = job.model_copy(update={"job_id": default_job_id})
    return job


def peek_caller(raw: bytes | None) -> dict[str, Any]:
    """Whatever identifies the caller in a record (job id, reply address, correlation id), read
    without validating the job; empty when the record is not a JSON object. Never raises."""
    try:
        document = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        return {}
    return {k: v for k, v in _reply_fields(document).items() if v is not None} if isinstance(document, dict) else {}


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field path: ``width: Input should be ...``."""
    lines = []
    for error in exc.errors(include_url=False):
        path = ".".join(str(part) for part in error["loc"]) or "(job)"
        lines.append(f"{path}: {error['msg']}")
    return "; ".join(lines)


def _reply_fields(document: dict[str, Any]) -> dict[str, Any]:
    """Whatever identifies the caller in an invalid job, so it can still be told ``rejected``."""

    def pick(name: str, pattern: str | None = None) -> str | None:
        value = document.get(name)
        if not isinstance(value, str) or (pattern and not re.match(pattern, value)):
            return None
        return value

    partition = document.get("reply_partition")
    return {
        "job_id": pick("job_id", JOB_ID_PATTERN),
        "reply_to": pick("reply_to", TOPIC_PATTERN),
        "reply_partition": partition if isinstance(partition, int) and partition >= 0 else None,
        "correlation_id": pick("correlation_id"),
    }


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def job_json_schema() -> dict[str, Any]:
    """The JSON Schema of a job, as ``sdagent schema`` prints it."""
    schema = Job.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://sdagent.dev/schema/job/v{SCHEMA_VERSION}.json"
    return schema


# --- status events -------------------------------------------------------------------------------


class Status(str, enum.Enum):
    QUEUED = "queued"  # written by the HTTP gateway once the job is durably on the jobs topic
    ACCEPTED = "accepted"
    STARTED = "started"
    PROGRESS = "progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    RELEASED = "released"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({Status.SUCCEEDED, Status.FAILED, Status.REJECTED, Status.EXPIRED, Status.CANCELLED})


class OutputLink(BaseModel):
    """One stored output: where it is and how to fetch it."""

    url: str
    bucket: str
    key: str
    content_type: str
    bytes: int


class Progress(BaseModel):
    step: int
    steps: int
    fraction: float
    eta_s: float | None = None


class StatusEvent(BaseModel):
    """One event on the results topic (and on the caller's reply topic): what happened to a job."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: str
    status: Status
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    agent: str | None = None
    attempt: int = 0
    correlation_id: str | None = None
    progress: Progress | None = None
    outputs: list[OutputLink] = Field(default_factory=list)
    info: dict[str, Any] = Field(default_factory=dict)
    timings_ms: dict[str, float] = Field(default_factory=dict)
    reason: str | None = None
    message: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    webhook: Webhook | None = None  # the job's, on terminal events only

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> StatusEvent:
        """The event in a record's value; ValueError for a tombstone (no value) or anything else."""
        if raw is None:
            raise ValueError("a record without a value is not a status event")
        return cls.model_validate_json(raw)
