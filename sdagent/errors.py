"""The sdagent exception hierarchy and the exit codes of the command line.

Every error the agent raises on purpose derives from :class:`SdagentError`; each subsystem has one
base so callers can catch "anything the backend said" without knowing the adapter.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


class ExitCode(enum.IntEnum):
    """Exit codes of ``sdagent``; the numbers follow sysexits.h so systemd and scripts can tell them apart."""

    OK = 0
    FAILURE = 1
    USAGE = 64  # EX_USAGE: bad command line
    UNAVAILABLE = 69  # EX_UNAVAILABLE: the broker or another required service cannot be reached
    SOFTWARE = 70  # EX_SOFTWARE: an internal error
    TIMEOUT = 75  # EX_TEMPFAIL: no answer in time (the job may still run)
    CONFIG = 78  # EX_CONFIG: the configuration is invalid


class SdagentError(Exception):
    """Root of every error raised by sdagent on purpose."""


class ConfigError(SdagentError):
    """Raised when the configuration file or an ``SDAGENT_*`` override is invalid; names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key

    @classmethod
    def from_validation(cls, exc: ValidationError, prefix: str = "") -> ConfigError:
        """The first error of a pydantic validation, named by its dotted key under ``prefix``."""
        error = exc.errors(include_url=False)[0]
        key = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "") or "(config)"
        return cls(key, f"{error['msg']} (got {error.get('input')!r})")


class JobRejected(SdagentError):
    """Raised when a message on the jobs topic is not a valid job (non-JSON, bad field, oversize).

    ``reason`` is a short machine-readable code (``not_json``, ``schema_version``, ``invalid``,
    ``oversize``); ``job_id``, ``reply_to`` and ``correlation_id`` are kept when they could be read so
    the caller still gets its ``rejected`` answer.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        job_id: str | None = None,
        reply_to: str | None = None,
        reply_partition: int | None = None,
        correlation_id: str | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        # One entry per problem ({loc, msg, type}), as the gateway's 422 answer lists them.
        self.errors = errors or [{"loc": [], "msg": message, "type": reason}]
        self.job_id = job_id
        self.reply_to = reply_to
        self.reply_partition = reply_partition
        self.correlation_id = correlation_id


class JobFailed(SdagentError):
    """Raised when a job cannot succeed; ``reason`` is a short machine-readable code for the result."""

    reason = "failed"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class JobAborted(SdagentError):
    """Raised inside a running job when the agent takes it back: cancelled, revoked or drained.

    ``why`` is ``cancelled``, ``revoked`` or ``draining``.
    """

    def __init__(self, why: str) -> None:
        super().__init__(f"job aborted: {why}")
        self.why = why


class BackendError(JobFailed):
    """Raised when the generation backend fails a job for good (bad request, out of memory...)."""

    reason = "backend_error"


class BackendUnavailable(BackendError):
    """Raised when the backend cannot be reached or answers 5xx; the job is retried with backoff."""

    reason = "backend_unavailable"


class UnsupportedJob(BackendError):
    """Raised when a job asks for something the running backend cannot do."""

    reason = "unsupported"


class ModelNotFound(BackendError):
    """Raised when the job's model is not available to the backend."""

    reason = "model_not_found"


class OutputError(JobFailed):
    """Raised when outputs cannot be stored for good (bad key template, access denied)."""

    reason = "output_error"


class OutputUnavailable(OutputError):
    """Raised when the output store fails transiently (network, 5xx, throttling); retried with backoff."""

    reason = "output_unavailable"


class InputError(JobFailed):
    """Raised when a job's input (an img2img init image in S3) is missing, refused or too large."""

    reason = "input_error"


class InputUnavailable(InputError):
    """Raised when the input store fails transiently; retried with backoff."""

    reason = "input_unavailable"


class KafkaUnavailable(SdagentError):
    """Raised when the Kafka cluster cannot be reached or a record cannot be durably produced."""


class RecordRefused(SdagentError):
    """Raised when the broker refuses one record for good (too large, invalid): unlike
    KafkaUnavailable, waiting for the cluster cannot help that record."""


TRANSIENT_ERRORS: tuple[type[Exception], ...] = (BackendUnavailable, OutputUnavailable, InputUnavailable)
"""Failures worth retrying with backoff before the job is failed."""


class GatewayError(SdagentError):
    """Base of the HTTP gateway's errors (authentication, limits, webhooks, problem answers)."""


class WebhookError(GatewayError):
    """Base of the errors of webhook delivery."""


class MissingExtra(SdagentError):
    """Raised when a command needs an optional part that is not installed (``pip install 'sdagent[X]'``)."""

    def __init__(self, extra: str, module: str | None) -> None:
        super().__init__(f"needs the {extra!r} extra ({module} is not installed): pip install 'sdagent[{extra}]'")
        self.extra = extra
