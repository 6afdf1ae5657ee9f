"""Resolves a job's inputs before the backend sees it: an init image named by S3 URI is fetched
and handed on inline, so every backend takes the same base64 form."""

from __future__ import annotations

import base64

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from sdagent.errors import InputError, InputUnavailable
from sdagent.jobs import InitImage, Job
from sdagent.storage import errors as s3errors

log = structlog.get_logger(__name__)

MAX_INIT_IMAGE_BYTES = 32 * 1024 * 1024  # far above any sane init image; stops a huge object


class InputResolver:
    """Fetches S3 inputs with the agent's own S3 client."""

    def __init__(self, s3_client, *, max_bytes: int = MAX_INIT_IMAGE_BYTES) -> None:
        self._s3 = s3_client
        self._max_bytes = max_bytes

    def resolve(self, job: Job) -> Job:
        """The job with every S3 input inlined; the job itself when it has none."""
        if job.init_image is None or job.init_image.s3_uri is None:
            return job
        data = self._fetch(job.init_image.s3_uri)
        inline = InitImage(base64=base64.b64encode(data).decode())
        return job.model_copy(update={"init_image": inline})

    def _fetch(self, uri: str) -> bytes:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        try:
            head = self._s3.head_object(Bucket=bucket, Key=key)
            if head["ContentLength"] > self._max_bytes:
                raise InputError(f"init image {uri} is {head['ContentLength']} bytes, over {self._max_bytes}")
            data = self._s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            if s3errors.is_transient(exc):
                raise InputUnavailable(f"S3 failed transiently reading {uri}: {exc}") from exc
            raise InputError(f"cannot read init image {uri}: {s3errors.error_code(exc)}") from exc
        log.info("input.fetched", uri=uri, bytes=len(data))
        return data
