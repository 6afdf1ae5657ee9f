"""Stores a job's artifacts in S3 and answers with links to them (CloudFront or presigned S3).

Key scheme::

    {prefix}/{job.output.prefix}/{filename}

``prefix`` is the deployment's (from the config), ``job.output.prefix`` is optional, and
``filename`` is the job's ``output.filename`` template or :data:`DEFAULT_FILENAME`,
``{date}/{job_id}/{index}.{ext}``. A template may use only these placeholders:

- ``{job_id}``; ``{index}``: the artifact's position in the job's output, from 0;
- ``{seed}``: the artifact's seed, else the job's; ``{ext}``: the file extension, no dot;
- ``{date}``: the UTC date of the upload as ``YYYY/MM/DD``; ``{model}``: the job's model name.

Everything after the deployment's prefix is checked before anything is uploaded: no ``.`` or
``..`` segment, no empty segment (so no leading ``/`` and no ``//``), no backslash, no control
character, and the whole key at most 1024 bytes of UTF-8 (the S3 limit). Several artifacts need
``{index}`` in the template, or they would overwrite each other.
"""

from __future__ import annotations

import io
import string
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from urllib.parse import quote

import structlog
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from botocore.signers import CloudFrontSigner
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sdagent.backends.base import Artifact
from sdagent.errors import ConfigError, OutputError, OutputUnavailable
from sdagent.jobs import Job, OutputLink
from sdagent.storage import errors as s3errors

log = structlog.get_logger(__name__)

DEFAULT_FILENAME = "{date}/{job_id}/{index}.{ext}"
PLACEHOLDERS = frozenset({"job_id", "index", "seed", "ext", "date", "model"})
MAX_KEY_BYTES = 1024  # S3 object key limit
MIN_PART_BYTES = 5 * 1024 * 1024  # S3 rejects multipart parts below 5 MiB, except the last
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 presigned URLs are valid at most 7 days

# Printable ASCII except '%', so percent-encoding of metadata values stays reversible.
_METADATA_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class OutputStore:
    """Uploads artifacts under one bucket and prefix and makes the links returned to callers."""

    def __init__(
        self,
        s3_client,
        bucket: str,
        prefix: str,
        *,
        cloudfront_domain: str | None = None,
        cloudfront_key_id: str | None = None,
        cloudfront_private_key_pem: bytes | None = None,
        url_ttl_s: int = 86400,
        cache_control: str = "public, max-age=31536000, immutable",
        multipart_threshold: int = 8 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._s3 = s3_client
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        if self._prefix and (problem := _key_problem(self._prefix)):
            raise ConfigError("prefix", problem)
        self._domain = cloudfront_domain
        self._signer = _cloudfront_signer(cloudfront_key_id, cloudfront_private_key_pem)
        if self._signer and not cloudfront_domain:
            raise ConfigError("cloudfront_domain", "a CloudFront key pair needs a domain")
        if url_ttl_s <= 0 or (not cloudfront_domain and url_ttl_s > MAX_PRESIGN_S):
            raise ConfigError("url_ttl_s", f"must be positive, and at most {MAX_PRESIGN_S} s for S3 URLs")
        self._ttl_s = url_ttl_s
        self._cache_control = cache_control
        self._threshold = multipart_threshold
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=max(multipart_threshold, MIN_PART_BYTES),
        )
        self._clock = clock

    def keys_for(self, job: Job, artifacts: Sequence[Artifact]) -> list[str]:
        """The object keys ``artifacts`` would be stored under; raises OutputError for a bad template."""
        template = job.output.filename or DEFAULT_FILENAME
        fields = _placeholders(template)
        if len(artifacts) > 1 and "index" not in fields:
            raise OutputError(
                f"output.filename {template!r} lacks {{index}} but the job has "
                f"{len(artifacts)} outputs, which would overwrite each other"
            )
        date = time.strftime("%Y/%m/%d", time.gmtime(self._clock()))
        keys = []
        for index, artifact in enumerate(artifacts):
            name = template.format(
                job_id=job.job_id,
                index=index,
                seed=_seed(job, artifact),
                ext=artifact.extension,
                date=date,
                model=job.model,
            )
            relative = "/".join(p for p in ((job.output.prefix or "").rstrip("/"), name) if p)
            problem = _key_problem(relative)
            if problem:
                raise OutputError(f"output key {relative!r} is invalid: {problem}")
            key = f"{self._prefix}/{relative}" if self._prefix else relative
            if len(key.encode()) > MAX_KEY_BYTES:
                raise OutputError(f"output key is {len(key.encode())} bytes, over S3's {MAX_KEY_BYTES}")
            keys.append(key)
        return keys

    def store(self, job: Job, artifacts: Sequence[Artifact]) -> list[OutputLink]:
        """Upload ``artifacts`` and return one link each; every key is checked before any upload."""
        links = []
        for key, artifact in zip(self.keys_for(job, artifacts), artifacts, strict=True):
            self._upload(job, key, artifact)
            links.append(
                OutputLink(
                    url=self.url_for(key),
                    bucket=self._bucket,
                    key=key,
                    content_type=artifact.content_type,
                    bytes=len(artifact.data),
                )
            )
        return links

    def url_for(self, key: str) -> str:
        """A link to ``key``: CloudFront (signed when a key pair is set), else a presigned S3 GET."""
        if self._domain:
            url = f"https://{self._domain}/{quote(key, safe='/')}"
            if self._signer is None:
                return url
            expires = datetime.fromtimestamp(self._clock() + self._ttl_s, tz=UTC)
            return self._signer.generate_presigned_url(url, date_less_than=expires)
        # Signed with the client's credentials: with an instance role they expire after a few
        # hours, and the URL with them, whatever url_ttl_s says. Use CloudFront for long links.
        # Build the client with signature_version="s3v4": left unset, botocore presigns with SigV2.
        try:
            return self._s3.generate_presigned_url(
                "get_object", Params={"Bucket": self._bucket, "Key": key}, ExpiresIn=self._ttl_s
            )
        except BotoCoreError as exc:
            raise _output_error(exc, key) from exc

    def _upload(self, job: Job, key: str, artifact: Artifact) -> None:
        extra = {
            "ContentType": artifact.content_type,
            "CacheControl": self._cache_control,
            "Metadata": _metadata(job, artifact),
        }
        multipart = len(artifact.data) > self._threshold
        started = time.monotonic()
        try:
            if multipart:
                self._s3.upload_fileobj(
                    io.BytesIO(artifact.data), self._bucket, key, ExtraArgs=extra, Config=self._transfer
                )
            else:
                # One request, no transfer manager and its thread pool: most outputs are a few
                # hundred KB and this runs once per image on the job's critical path.
                self._s3.put_object(Bucket=self._bucket, Key=key, Body=artifact.data, **extra)
        except (BotoCoreError, ClientError) as exc:
            log.warning("output.upload_failed", job_id=job.job_id, key=key, error=str(exc))
            raise _output_error(exc, key) from exc
        log.info(
            "output.uploaded",
            job_id=job.job_id,
            key=key,
            bytes=len(artifact.data),
            multipart=multipart,
            ms=round((time.monotonic() - started) * 1000, 1),
        )


def _placeholders(template: str) -> set[str]:
    """The placeholders of ``template``; raises OutputError for anything but plain known names."""
    fields = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise OutputError(f"output.filename {template!r} is not a valid template: {exc}") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        # Plain names only: "{job_id.__class__}" or "{seed!r}" would let a job reach into objects.
        if field not in PLACEHOLDERS or spec or conversion:
            raise OutputError(
                f"output.filename {template!r}: unknown placeholder {{{field}}}; "
                f"use only {', '.join(sorted(PLACEHOLDERS))}"
            )
        fields.add(field)
    return fields


def _key_problem(relative: str) -> str | None:
    """Why ``relative`` could leave its prefix or be read differently by S3 and browsers, or None."""
    if "\\" in relative:
        return "backslash"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in relative):
        return "control character"
    for segment in relative.split("/"):
        if segment in ("", ".", ".."):
            return f"segment {segment!r} (absolute path, '//', '.' or '..')"
    return None


def _seed(job: Job, artifact: Artifact) -> int:
    """The seed the backend reports for this artifact, else the job's (-1 when it let the backend pick)."""
    return artifact.seed if artifact.seed is not None else job.seed


def _metadata(job: Job, artifact: Artifact) -> dict[str, str]:
    """S3 user metadata travels as HTTP headers, so values must be ASCII: percent-encode the rest."""
    values = {"job-id": job.job_id, "model": job.model, "seed": str(_seed(job, artifact)), "kind": job.kind.value}
    return {name: quote(value, safe=_METADATA_SAFE) for name, value in values.items()}


def _output_error(exc: Exception, key: str) -> OutputError:
    """Transient (throttling, 5xx, network) -> OutputUnavailable; the rest (4xx...) -> OutputError."""
    if s3errors.is_transient(exc):
        return OutputUnavailable(f"S3 failed transiently storing {key}: {exc}")
    return OutputError(f"S3 refused {key}: {exc}")


def _cloudfront_signer(key_id: str | None, private_key_pem: bytes | None) -> CloudFrontSigner | None:
    if key_id is None and private_key_pem is None:
        return None
    if not key_id or not private_key_pem:
        raise ConfigError("cloudfront_key_id", "give both a key pair id and a private key, or neither")
    try:
        private_key = serialization.load_pem_private_key(private_key_pem, password=None)
    except ValueError as exc:
        raise ConfigError("cloudfront_private_key_pem", f"not a PEM private key: {exc}") from None
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise ConfigError("cloudfront_private_key_pem", "CloudFront signs with RSA keys only")

    def sign(message: bytes) -> bytes:
        # Canned-policy signed URLs are RSA-SHA1 PKCS#1 v1.5: what CloudFront verifies.
        return private_key.sign(message, padding.PKCS1v15(), hashes.SHA1())

    return CloudFrontSigner(key_id, sign)
