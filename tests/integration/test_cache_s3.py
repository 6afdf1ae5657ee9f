"""The model cache against a real S3 API: the moto server of the session fixtures."""

from __future__ import annotations

import hashlib
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import EndpointConnectionError

from sdagent.cache import (
    CacheConfig,
    CacheError,
    CacheFull,
    ManifestMissing,
    ManifestWatcher,
    ModelCache,
    ModelUnavailable,
    S3Source,
    build_s3_client,
)
from sdagent.cache.indexer import build_manifest
from sdagent.cache.testing import enospc_after, model_bytes
from sdagent.errors import TRANSIENT_ERRORS

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
CHUNK = 5 * MiB  # the smallest part the config allows: several ranges per test object


def client(endpoint: str, **config):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=16, **config),
    )


@pytest.fixture
def s3(aws_endpoint):
    return client(aws_endpoint)


class RangeLog:
    """Records every GetObject's Range as the client sends it, and can cut the connection."""

    def __init__(self, s3_client, cut_when: Callable[[], bool] | None = None) -> None:
        self.ranges: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._cut_when = cut_when
        self._lock = threading.Lock()
        s3_client.meta.events.register("before-call.s3.GetObject", self._before)
        s3_client.meta.events.register("after-call.s3.GetObject", self._after)

    def starts(self) -> list[int]:
        return sorted(int(r.split("=")[1].split("-")[0]) for r in self.ranges if r)

    def _before(self, params, **_):
        requested = params["headers"].get("Range")  # the request as it goes out
        with self._lock:
            self.ranges.append(requested)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self._cut_when is not None and self._cut_when():
            with self._lock:
                self.in_flight -= 1
            raise EndpointConnectionError(endpoint_url="http://store/ (cut by the test)")

    def _after(self, **_):
        time.sleep(0.05)  # hold the slot a little, so overlapping requests are seen overlapping
        with self._lock:
            self.in_flight -= 1


def upload_store(s3_client, bucket: str, models: dict[str, bytes], prefix="models") -> None:
    for name, data in models.items():
        s3_client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
    source = S3Source(s3_client, bucket, prefix)
    source.write_manifest(build_manifest(source))


def partial_size_at_least(cache_dir: Path, size: int) -> Callable[[], bool]:
    """True once the download's partial file holds ``size`` bytes: the network "goes" mid-download."""

    def cut() -> bool:
        return any(p.stat().st_size >= size for p in (cache_dir / ".sdagent" / "staging").glob("*.partial"))

    return cut


def open_cache(tmp_path, s3_client, bucket, **options) -> ModelCache:
    source = S3Source(s3_client, bucket, "models", chunk=CHUNK, concurrency=8, transfer_client="classic")
    return ModelCache(tmp_path / "cache", source, budget_bytes=1 << 30, **options)


def test_a_large_object_is_fetched_as_parallel_ranges_and_verified(tmp_path, s3, s3_bucket):
    data = model_bytes("sdxl", 42 * MiB)
    upload_store(s3, s3_bucket, {"sdxl.safetensors": data})
    ranges = RangeLog(s3)

    local = open_cache(tmp_path, s3, s3_bucket).ensure("sdxl")

    assert local.staged and local.path.read_bytes() == data
    assert local.sha256 == hashlib.sha256(data).hexdigest()
    assert ranges.starts() == list(range(0, 42 * MiB, CHUNK))  # every part once, by range
    assert ranges.max_in_flight > 1


def test_manifest_is_read_from_the_store_and_index_hashes_by_streaming(tmp_path, s3, s3_bucket):
    models = {"sd15.safetensors": model_bytes("sd15", 3 * MiB), "Lora/detail.safetensors": b"d" * 1000}
    upload_store(s3, s3_bucket, models)
    cache = open_cache(tmp_path, s3, s3_bucket)

    manifest = cache.manifest()

    assert manifest.names() == ["detail.safetensors", "sd15.safetensors"]
    assert manifest.get("detail.safetensors").kind == "lora"
    assert manifest.get("sd15.safetensors").sha256 == hashlib.sha256(models["sd15.safetensors"]).hexdigest()
    assert cache.ensure("detail.safetensors").path == cache.root / "loras" / "detail.safetensors"
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_a_cut_download_resumes_with_ranged_gets_from_the_partial_size(tmp_path, s3, s3_bucket, aws_endpoint):
    # More parts than the transfer manager keeps in flight, so some are asked for after the cut.
    data = model_bytes("sdxl", 100 * MiB)
    upload_store(s3, s3_bucket, {"sdxl.safetensors": data})
    cutting = client(aws_endpoint)
    RangeLog(cutting, cut_when=partial_size_at_least(tmp_path / "cache", 2 * CHUNK))

    with pytest.raises(ModelUnavailable):
        open_cache(tmp_path, cutting, s3_bucket).ensure("sdxl")
    [partial] = (tmp_path / "cache" / ".sdagent" / "staging").glob("*.partial")
    kept = partial.stat().st_size
    assert 2 * CHUNK <= kept < len(data)
    assert not (tmp_path / "cache" / "checkpoints" / "sdxl.safetensors").exists()

    ranges = RangeLog(s3)
    cache = open_cache(tmp_path, s3, s3_bucket)
    local = cache.ensure("sdxl")

    assert local.path.read_bytes() == data
    assert ranges.starts()[0] == kept  # nothing before the partial's size is fetched again
    assert len(ranges.starts()) > 1  # the rest in parallel ranges too
    assert cache.stats().resumes == 1 and cache.stats().bytes_downloaded == len(data) - kept


def test_a_partial_is_not_resumed_once_the_object_changed(tmp_path, s3, s3_bucket, aws_endpoint):
    upload_store(s3, s3_bucket, {"a.safetensors": model_bytes("old", 100 * MiB)})
    cutting = client(aws_endpoint)
    RangeLog(cutting, cut_when=partial_size_at_least(tmp_path / "cache", CHUNK))
    with pytest.raises(ModelUnavailable):
        open_cache(tmp_path, cutting, s3_bucket).ensure("a")
    assert list((tmp_path / "cache" / ".sdagent" / "staging").glob("*.partial"))
    new = model_bytes("new", 20 * MiB)
    upload_store(s3, s3_bucket, {"a.safetensors": new})  # new ETag, new sha256
    ranges = RangeLog(s3)

    local = open_cache(tmp_path, s3, s3_bucket).ensure("a")

    assert local.path.read_bytes() == new and ranges.starts()[0] == 0


def test_a_full_local_disk_is_not_mistaken_for_a_store_failure(tmp_path, s3, s3_bucket):
    upload_store(s3, s3_bucket, {"a.safetensors": model_bytes("a", 12 * MiB)})
    cache = open_cache(tmp_path, s3, s3_bucket, write=enospc_after(4 * MiB))

    with pytest.raises(CacheFull, match="disk full"):
        cache.ensure("a")
    assert not list((tmp_path / "cache" / ".sdagent" / "staging").iterdir())


def test_an_unreachable_store_is_a_transient_error(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    unreachable = client(dead, retries={"max_attempts": 1}, connect_timeout=1)
    cache = open_cache(tmp_path, unreachable, "models-bucket")

    started = time.monotonic()
    with pytest.raises(ModelUnavailable) as raised:
        cache.ensure("sd15")

    assert isinstance(raised.value, TRANSIENT_ERRORS)
    assert time.monotonic() - started < 10


def test_a_store_without_a_manifest_says_how_to_make_one(tmp_path, s3, s3_bucket):
    with pytest.raises(ManifestMissing, match="sdagent cache index s3://"):
        open_cache(tmp_path, s3, s3_bucket).ensure("sd15")


def test_the_watcher_polls_s3_for_a_new_manifest(tmp_path, s3, s3_bucket):
    upload_store(s3, s3_bucket, {"a.safetensors": b"a" * 100})
    cache = open_cache(tmp_path, s3, s3_bucket)
    changes = queue.Queue()
    watcher = ManifestWatcher(cache, changes.put, interval_s=0.2)
    watcher.start()
    try:
        upload_store(s3, s3_bucket, {"b.safetensors": b"b" * 100})

        change = changes.get(timeout=10)

        assert change.added == ("b.safetensors",)
        assert cache.ensure("b").staged
    finally:
        watcher.stop()


def test_the_configured_client_has_a_pool_as_large_as_the_concurrency(aws_endpoint):
    config = CacheConfig(
        source="s3://models-bucket/sd", endpoint_url=aws_endpoint, region="us-east-1", max_concurrency=24
    )
    assert build_s3_client(config).meta.config.max_pool_connections >= 24


def test_auto_stays_on_the_classic_client_with_a_custom_endpoint_even_with_the_crt_installed(s3):
    # The CRT client would ignore moto's endpoint and go to AWS itself (boto/boto3#4839).
    assert S3Source(s3, "bucket", "models", transfer_client="auto").transfer_client == "classic"
    with pytest.raises(CacheError, match="endpoint_url|awscrt"):  # whichever the machine lacks
        S3Source(s3, "bucket", "models", transfer_client="crt")
