"""The ``[cache]`` section: where models come from, where they are kept and how much room they get."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MiB = 1024 * 1024
GiB = 1024 * MiB


class CacheConfig(BaseModel):
    """The model cache (``[cache]``); off while ``source`` is unset. See docs/model-cache.md."""

    model_config = ConfigDict(extra="forbid")

    # "s3://bucket/prefix" or a mounted directory (EFS, File Gateway, any path). None: no cache,
    # the WebUI's own model folders are used as they are.
    source: str | None = None
    # On local NVMe (instance store): partial files and lock files must be on a local disk, never on
    # the network file system (flock can silently succeed on some of them).
    dir: Path = Path("/var/cache/sdagent/models")  # where sdagent-nvme.service mounts the instance store
    budget_bytes: int = Field(200 * GiB, gt=0)
    # Kept free on the disk whatever the budget says: the WebUI, logs and outputs share it.
    min_free_bytes: int = Field(2 * GiB, ge=0)
    # Staged before the agent takes work; plus the N most used models of the local history.
    prewarm: list[str] = Field(default_factory=list)
    prewarm_most_used: int = Field(0, ge=0, le=100)
    # Models staged at once by prewarm: one model's fsync overlaps the next one's copy.
    prewarm_concurrency: int = Field(2, ge=1, le=8)
    # How long a job waits for another process staging the same model.
    lock_timeout_s: float = Field(1800.0, gt=0)
    # Changes to the store's manifest are looked for this often (S3, and NFS/EFS where inotify
    # sees no change made by another client); inotify events on a local mount come at once.
    poll_interval_s: float = Field(60.0, gt=0)
    watch: bool = True
    # S3 transfers. AWS guidance: 8-16 MB ranged GETs at concurrency 16-64. Parts that arrive out
    # of order wait in memory for the hash: up to (max_concurrency + 4) x chunk per download
    # (320 MiB at the defaults); 32 suits 50-100 Gbit/s instances.
    region: str | None = None
    endpoint_url: str | None = None  # S3-compatible stores and tests; keeps the CRT client off
    multipart_chunksize_bytes: int = Field(16 * MiB, ge=5 * MiB, le=512 * MiB)
    max_concurrency: int = Field(16, ge=1, le=128)
    # "auto": the CRT transfer client when awscrt is installed (pip install "boto3[crt]") and no
    # endpoint_url is set (the CRT client ignores it: boto/boto3#4839), else the classic one.
    # boto3's own "auto" picks the CRT only on a few instance types.
    transfer_client: Literal["auto", "crt", "classic"] = "auto"
    # Reads in flight from a network-mounted source (NFS/EFS, FUSE): their throughput grows with
    # requests in flight. A store on a local file system is copied by the kernel instead.
    read_concurrency: int = Field(4, ge=1, le=64)

    @field_validator("source")
    @classmethod
    def _source_form(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("s3://"):
            bucket = value[5:].split("/", 1)[0]
            if not 3 <= len(bucket) <= 63:
                raise ValueError("an s3:// source needs a bucket name: s3://bucket/prefix")
            return value
        if "://" in value:
            raise ValueError("a source is s3://bucket/prefix or a directory path")
        if not Path(value).is_absolute():
            raise ValueError("a directory source must be an absolute path")
        return value

    # Field validators rather than a model validator: the error then names the key at fault. The
    # fields they compare with are declared above them, so they are in ``info.data``.
    @field_validator("prewarm", "prewarm_most_used")
    @classmethod
    def _prewarm_needs_a_source(cls, value, info: ValidationInfo):
        if value and info.data.get("source") is None:
            raise ValueError("there is nothing to prewarm from without cache.source")
        return value

    @field_validator("transfer_client")
    @classmethod
    def _crt_needs_the_default_endpoint(cls, value: str, info: ValidationInfo) -> str:
        if value == "crt" and info.data.get("endpoint_url"):
            raise ValueError("transfer_client = crt ignores endpoint_url (boto/boto3#4839): use auto or classic")
        return value
