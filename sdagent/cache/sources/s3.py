"""A store in S3: ``s3://bucket/prefix`` with ``manifest.json`` at the prefix.

A download is parallel ranged GETs through boto3's transfer manager, on the CRT transfer client
when awscrt is installed (``pip install "boto3[crt]"``). The sink is not seekable, so the parts
reach it in order and the hash is computed as they pass. boto3's transfer manager takes no Range,
so resuming from a partial file fetches the rest with ranged GETs of our own
(:func:`~sdagent.cache.ranged.copy_ranges`), each conditional on the ETag the partial started with.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import structlog
from boto3.exceptions import RetriesExceededError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from sdagent.cache.errors import CacheError, ManifestMissing, ModelCorrupt, ModelNotFound, ModelUnavailable
from sdagent.cache.manifest import MANIFEST_NAME, Manifest
from sdagent.cache.ranged import ShortRead, copy_ranges
from sdagent.cache.sources.base import ModelSource, Sink, StoreFile
from sdagent.storage import errors as s3errors

log = structlog.get_logger(__name__)

MiB = 1024 * 1024
DEFAULT_CHUNK = 16 * MiB  # AWS guidance: 8-16 MB ranges
DEFAULT_CONCURRENCY = 16
RANGE_ATTEMPTS = 3  # per ranged GET of a resume; botocore already retries a failed connect
IO_CHUNK = 1 * MiB  # the transfer manager hands the sink pieces this large (its default is 256 KiB)
# Out-of-order parts wait in memory for the one before them (the sink takes bytes in order):
# at most this many parts beyond the lowest one not yet written, i.e. about
# (concurrency + slack) x chunk bytes: 320 MiB at the defaults.
IN_MEMORY_SLACK_PARTS = 4


def crt_available() -> bool:
    """True when awscrt is installed in a version boto3 will use."""
    from boto3.s3.transfer import has_minimum_crt_version
    from botocore.compat import HAS_CRT

    return bool(HAS_CRT) and has_minimum_crt_version((0, 19, 18))


def resolve_transfer_client(preference: str, *, crt_installed: bool, default_endpoint: bool) -> str:
    """``crt`` or ``classic`` for a ``preference`` of auto, crt or classic.

    The CRT transfer manager builds its own S3 client from the region alone and ignores the boto3
    client's endpoint_url (boto/boto3#4839): with a custom endpoint (VPC endpoint, S3-compatible
    store, moto) it would silently go to the public AWS endpoint. So "auto" takes it only on the
    default endpoint, and asking for it elsewhere is an error.
    """
    if preference == "crt":
        if not crt_installed:
            raise CacheError('transfer_client = crt needs awscrt: pip install "boto3[crt]"')
        if not default_endpoint:
            raise CacheError("the CRT transfer client ignores a custom endpoint_url (boto/boto3#4839): "
                             "use transfer_client = classic or auto")  # fmt: skip
        return "crt"
    if preference == "auto" and crt_installed and default_endpoint:
        return "crt"
    return "classic"


def transfer_config(chunk: int, concurrency: int, client: str) -> TransferConfig:
    """The transfer manager's settings for large model files on ``client`` (crt or classic)."""
    if client == "crt":
        # The CRT client refuses the classic client's tuning options; it bounds its memory itself.
        return TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=concurrency,
                              preferred_transfer_client="crt")  # fmt: skip
    config = TransferConfig(
        multipart_threshold=chunk,
        multipart_chunksize=chunk,
        max_concurrency=concurrency,
        io_chunksize=IO_CHUNK,
        preferred_transfer_client="classic",
    )
    # s3transfer's default (10 parts) would cap a non-seekable download at 10 ranges in flight.
    config.max_in_memory_download_chunks = concurrency + IN_MEMORY_SLACK_PARTS
    return config


def is_default_endpoint(client) -> bool:
    """True when ``client`` talks to the regional AWS endpoint boto3 picks by itself."""
    endpoint = (client.meta.endpoint_url or "").rstrip("/")
    region = client.meta.region_name
    return endpoint in {f"https://s3.{region}.amazonaws.com", "https://s3.amazonaws.com"}


class S3Source(ModelSource):
    """Models under ``prefix`` in ``bucket``; ``client`` is a boto3 S3 client whose connection pool
    holds ``concurrency`` connections (botocore's default of 10 would queue the rest)."""

    def __init__(
        self,
        client,
        bucket: str,
        prefix: str = "",
        *,
        chunk: int = DEFAULT_CHUNK,
        concurrency: int = DEFAULT_CONCURRENCY,
        transfer_client: str = "auto",
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self._prefix}"
        self._chunk = chunk
        self._concurrency = concurrency
        self.transfer_client = resolve_transfer_client(
            transfer_client, crt_installed=crt_available(), default_endpoint=is_default_endpoint(client)
        )
        self._transfer_config = transfer_config(chunk, concurrency, self.transfer_client)
        pool = getattr(getattr(client, "meta", None), "config", None)
        if pool is not None and (pool.max_pool_connections or 10) < concurrency:
            log.warning("cache.s3_pool_small", max_pool_connections=pool.max_pool_connections, concurrency=concurrency)

    @classmethod
    def from_url(cls, client, url: str, **options) -> S3Source:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return cls(client, bucket, prefix, **options)

    def read_manifest(self) -> tuple[Manifest, str]:
        key = self._key(MANIFEST_NAME)
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=key)
            body = response["Body"].read()
        except Exception as exc:
            if _not_found(exc):
                raise ManifestMissing(
                    f"no {MANIFEST_NAME} in {self.url} (build one with: sdagent cache index {self.url})"
                ) from None
            raise self._error(exc, key) from exc
        return Manifest.loads(body), response.get("ETag", "")

    def manifest_version(self) -> str | None:
        key = self._key(MANIFEST_NAME)
        try:
            return self._client.head_object(Bucket=self._bucket, Key=key).get("ETag", "")
        except Exception as exc:
            if _not_found(exc):
                return None
            raise self._error(exc, key) from exc

    def object_version(self, path: str, size: int) -> str:
        key = self._key(path)
        try:
            head = self._client.head_object(Bucket=self._bucket, Key=key)
        except Exception as exc:
            raise self._error(exc, key) from exc
        if head["ContentLength"] != size:
            raise ModelCorrupt(f"s3://{self._bucket}/{key} is {head['ContentLength']} bytes, the manifest says {size}")
        return head.get("ETag", "")

    def fetch(self, path: str, size: int, sink: Sink, *, offset: int = 0, version: str | None = None) -> None:
        key = self._key(path)
        if offset == 0:
            self._download(key, sink)
        else:
            self._download_rest(key, size, sink, offset, version)

    def list_files(self) -> Iterator[StoreFile]:
        start = f"{self._prefix}/" if self._prefix else ""
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=start)
            for page in pages:
                for item in page.get("Contents", []):
                    relative = item["Key"][len(start) :]
                    if relative and relative != MANIFEST_NAME and not relative.endswith("/"):
                        yield StoreFile(relative, item["Size"], item.get("ETag", ""))
        except Exception as exc:
            raise self._error(exc, start) from exc

    def write_manifest(self, manifest: Manifest) -> None:
        key = self._key(MANIFEST_NAME)
        try:  # one PUT: readers get the old object or the new one
            self._client.put_object(Bucket=self._bucket, Key=key, Body=manifest.dumps().encode(),
                                    ContentType="application/json")  # fmt: skip
        except Exception as exc:
            raise self._error(exc, key) from exc

    # --- downloads ---------------------------------------------------------------------------------

    def _download(self, key: str, sink: Sink) -> None:
        guarded = _GuardedSink(sink)
        try:
            self._client.download_fileobj(self._bucket, key, guarded, Config=self._transfer_config)
        except Exception as exc:
            if guarded.error is not None:
                raise guarded.error from None  # the local disk's failure (ENOSPC), not the store's
            raise self._error(exc, key) from exc

    def _download_rest(self, key: str, size: int, sink: Sink, offset: int, version: str | None) -> None:
        conditions = {"IfMatch": version} if version else {}

        def read(at: int, length: int) -> bytes:
            for attempt in range(1, RANGE_ATTEMPTS + 1):
                try:
                    response = self._client.get_object(
                        Bucket=self._bucket, Key=key, Range=f"bytes={at}-{at + length - 1}", **conditions
                    )
                    return response["Body"].read()
                except Exception as exc:
                    error = self._error(exc, key)
                    if not isinstance(error, ModelUnavailable) or attempt == RANGE_ATTEMPTS:
                        raise error from exc
                    log.info("cache.range_retry", key=key, offset=at, attempt=attempt, error=s3errors.error_code(exc))
            raise AssertionError("unreachable")

        try:
            copy_ranges(read, offset, size, sink, chunk=self._chunk, concurrency=self._concurrency,
                        thread_name="cache-s3-range")  # fmt: skip
        except ShortRead as exc:
            raise ModelUnavailable(f"s3://{self._bucket}/{key}: a range came back short ({exc})") from None

    # --- helpers -----------------------------------------------------------------------------------

    def _key(self, path: str) -> str:
        return f"{self._prefix}/{path}" if self._prefix else path

    def _error(self, exc: Exception, key: str) -> Exception:
        where = f"s3://{self._bucket}/{key}"
        if isinstance(exc, CacheError | ModelUnavailable):
            return exc
        if _not_found(exc):
            return ModelNotFound(f"{where} is not in the store")
        if isinstance(exc, ClientError) and s3errors.error_code(exc) in ("PreconditionFailed", "412"):
            return ModelUnavailable(f"{where} changed during the download; try again")
        if isinstance(exc, RetriesExceededError):
            return ModelUnavailable(f"{where}: {exc.last_exception or exc}")
        if isinstance(exc, ClientError):
            if s3errors.is_transient(exc):
                return ModelUnavailable(f"{where}: {s3errors.error_code(exc)}: {exc}")
            return CacheError(f"{where}: {s3errors.error_code(exc)}: {exc}")  # 403 and the like: for good
        if isinstance(exc, NoCredentialsError | PartialCredentialsError | ParamValidationError):
            return CacheError(f"{where}: {exc}")
        if isinstance(exc, BotoCoreError | OSError):  # network, timeouts, a cut stream
            return ModelUnavailable(f"{where}: {type(exc).__name__}: {exc}")
        return CacheError(f"{where}: {type(exc).__name__}: {exc}")


class _GuardedSink:
    """Remembers the sink's own failure, so a full local disk is not reported as a store failure."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def write(self, data) -> object:
        try:
            return self._sink.write(data)
        except BaseException as exc:
            with self._lock:
                self.error = self.error or exc
            raise

    def seekable(self) -> bool:
        return False  # parts in order: the hash is computed as they pass


def _not_found(exc: Exception) -> bool:
    if isinstance(exc, ClientError):
        code = s3errors.error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code != "NoSuchBucket" and (code in ("NoSuchKey", "404", "NotFound") or status == 404)
    return False
