"""Builds the model cache named by ``[cache]``: its store, its S3 client, the cache itself."""

from __future__ import annotations

from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig

from sdagent.cache.cache import ModelCache
from sdagent.cache.config import CacheConfig
from sdagent.cache.sources.base import ModelSource
from sdagent.cache.sources.directory import DirectorySource
from sdagent.cache.sources.offline import OfflineSource
from sdagent.cache.sources.s3 import S3Source

# The transfer manager runs max_concurrency ranged GETs per download, and prewarm runs
# prewarm_concurrency downloads at once: the connection pool must hold them all, or botocore (10 by
# default) queues the rest. Retries: botocore retries a failed
# connect; s3transfer retries a cut stream; the job loop retries the rest with backoff.
_READ_TIMEOUT_S = 60
_CONNECT_TIMEOUT_S = 5


def build_s3_client(config: CacheConfig):
    """An S3 client for model downloads (not the outputs client: a larger pool, its own endpoint)."""
    boto_config = BotoConfig(
        signature_version="s3v4",
        max_pool_connections=config.max_concurrency * config.prewarm_concurrency + 4,
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=_CONNECT_TIMEOUT_S,
        read_timeout=_READ_TIMEOUT_S,
        s3={"addressing_style": "path"} if config.endpoint_url else None,
    )
    return boto3.client("s3", region_name=config.region, endpoint_url=config.endpoint_url, config=boto_config)


def build_source(config: CacheConfig, source: str | None = None, *, s3_client=None) -> ModelSource:
    """The store at ``source`` (default ``config.source``): S3 for ``s3://``, else a directory."""
    url = source or config.source
    if url is None:
        raise ValueError("the cache has no source")
    if url.startswith("s3://"):
        return S3Source.from_url(
            s3_client or build_s3_client(config),
            url,
            chunk=config.multipart_chunksize_bytes,
            concurrency=config.max_concurrency,
            transfer_client=config.transfer_client,
        )
    return DirectorySource(Path(url), concurrency=config.read_concurrency)


def build_model_cache(config: CacheConfig, *, s3_client=None, offline: bool = False) -> ModelCache | None:
    """The cache, or None when ``[cache]`` names no source; ``offline`` builds it without its
    store (the operator tools list, evict and verify local copies without one)."""
    if config.source is None and not offline:
        return None
    source = OfflineSource() if config.source is None else build_source(config, s3_client=s3_client)
    return ModelCache(
        config.dir,
        source,
        budget_bytes=config.budget_bytes,
        min_free_bytes=config.min_free_bytes,
        lock_timeout_s=config.lock_timeout_s,
    )
