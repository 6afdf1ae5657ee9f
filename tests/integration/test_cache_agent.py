"""The agent with its model cache, on the real broker, against a mounted-directory store and a moto
S3 store: jobs stage their model from the store, prewarm comes before work, store changes are
picked up, and every cache failure answers the job with a reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from sdagent.cache import ModelCache
from sdagent.cache.indexer import build_manifest
from sdagent.cache.sources.directory import DirectorySource
from sdagent.cache.sources.s3 import S3Source
from sdagent.cache.testing import make_store, model_bytes
from sdagent.devstack.kafka import free_loopback_port
from sdagent.devstack.process import wait_until
from sdagent.jobs import Status

pytestmark = pytest.mark.integration

DECLARED = "sd15.safetensors"  # one of the simulator's own models: no cache involved
STAGED = "store-model.safetensors"
OTHER = "other-model.safetensors"
LATER = "added-later.safetensors"
SIZE = 256 * 1024


def job(model: str, **fields) -> dict:
    return {"model": model, "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, **fields}


class DirectoryStore:
    """A mounted store: a directory with its manifest.json."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, bytes] = {}

    @property
    def cache_values(self) -> dict:
        return {"source": str(self.root)}

    def source(self):
        return DirectorySource(self.root)

    def put(self, name: str, data: bytes) -> None:
        """Add or replace a model and index the store (as `sdagent cache index` does)."""
        self.models[name] = data
        make_store(self.root, self.models)

    def overwrite(self, name: str, data: bytes) -> None:
        """Change a model's bytes behind the manifest's back."""
        (self.root / name).write_bytes(data)

    def remove(self, name: str) -> None:
        (self.root / name).unlink()

    def cut_off(self) -> dict:
        """Make the store unreachable (the mount went away); returns cache values to use."""
        shutil.rmtree(self.root)
        return {}


class S3Store:
    """An S3 store on the session's moto server."""

    def __init__(self, endpoint: str, bucket: str) -> None:
        self.endpoint = endpoint
        self.url = f"s3://{bucket}/models"
        self.bucket = bucket
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                               aws_secret_access_key="testing", config=Config(s3={"addressing_style": "path"}))  # fmt: skip

    @property
    def cache_values(self) -> dict:
        return {"source": self.url, "endpoint_url": self.endpoint, "region": "us-east-1"}

    def source(self):
        return S3Source.from_url(self.s3, self.url)

    def put(self, name: str, data: bytes) -> None:
        self.overwrite(name, data)
        source = self.source()
        source.write_manifest(build_manifest(source))

    def overwrite(self, name: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=f"models/{name}", Body=data)

    def remove(self, name: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=f"models/{name}")

    def cut_off(self) -> dict:
        return {"endpoint_url": f"http://127.0.0.1:{free_loopback_port()}"}  # nothing listens there


@pytest.fixture(params=["directory", "s3"])
def store(request, tmp_path):
    if request.param == "directory":
        created = DirectoryStore(tmp_path / "store")
    else:
        created = S3Store(request.getfixturevalue("aws_endpoint"), request.getfixturevalue("s3_bucket"))
    created.put(STAGED, model_bytes(STAGED, SIZE))
    return created


def cache_section(tmp_path: Path, store, **values) -> dict:
    return {**store.cache_values, "dir": str(tmp_path / "cache"), "poll_interval_s": 0.2, **values}


def model_files(tmp_path: Path) -> list[str]:
    """The files the WebUI could see and the partial downloads (not the lock files), by name."""
    cache = tmp_path / "cache"
    folders = [cache / "checkpoints", cache / ".sdagent" / "staging"]
    return sorted(path.name for folder in folders for path in folder.rglob("*") if path.is_file())


def test_a_model_not_yet_local_is_staged_switched_to_and_then_kept(pipeline, store, tmp_path):
    agent = pipeline.start_agent(cache=cache_section(tmp_path, store))

    first = pipeline.client.run(job(STAGED), timeout_s=30)
    second = pipeline.client.run(job(STAGED), timeout_s=30)

    assert first.status is Status.SUCCEEDED, first.message
    assert first.timings_ms["stage_ms"] > 0 and "switch_ms" in first.timings_ms
    assert first.info["model"] == STAGED
    assert (tmp_path / "cache" / "checkpoints" / STAGED).read_bytes() == model_bytes(STAGED, SIZE)
    assert second.status is Status.SUCCEEDED
    assert "stage_ms" not in second.timings_ms  # a cache hit
    assert "switch_ms" not in second.timings_ms  # the model stayed loaded
    # The WebUI was told to rescan after the staging: the staged file is in its list.
    assert STAGED in agent.backend.health().models
    assert agent.model_cache.stats().hits >= 1 and agent.model_cache.stats().misses == 1


def test_prewarm_stages_the_models_before_the_agent_takes_work(pipeline, store, tmp_path):
    queued = pipeline.client.submit(job(STAGED))  # waiting in Kafka before the agent starts

    pipeline.start_agent(cache=cache_section(tmp_path, store, prewarm=[STAGED]))
    events = pipeline.events(queued.job_id)

    (answer,) = [event for event in events if event.status.is_terminal]
    assert answer.status is Status.SUCCEEDED, answer.message
    # Staged by prewarm, before the intake joined the group: the job found it local.
    assert "stage_ms" not in answer.timings_ms
    assert (tmp_path / "cache" / "checkpoints" / STAGED).is_file()


def test_a_prewarm_failure_is_not_fatal(pipeline, store, tmp_path):
    pipeline.start_agent(cache=cache_section(tmp_path, store, prewarm=["absent.safetensors", STAGED]))

    answer = pipeline.client.run(job(STAGED), timeout_s=30)

    assert answer.status is Status.SUCCEEDED, answer.message
    assert "stage_ms" not in answer.timings_ms  # the other prewarmed model was staged all the same


def test_a_model_missing_from_the_store_fails_the_job_with_a_reason(pipeline, store, tmp_path):
    pipeline.start_agent(cache=cache_section(tmp_path, store))

    answer = pipeline.client.run(job("absent.safetensors"), timeout_s=30)

    assert answer.status is Status.FAILED and answer.reason == "model_not_found"
    assert pipeline.client.run(job(DECLARED), timeout_s=30).status is Status.SUCCEEDED  # carries on


def test_a_model_listed_but_gone_from_the_store_fails_the_job_with_a_reason(pipeline, store, tmp_path):
    store.remove(STAGED)  # still in the manifest
    pipeline.start_agent(cache=cache_section(tmp_path, store))

    answer = pipeline.client.run(job(STAGED), timeout_s=30)

    assert answer.status is Status.FAILED and answer.reason == "model_not_found", answer.message
    assert model_files(tmp_path) == []


def test_a_corrupt_store_copy_fails_the_job_and_is_never_served(pipeline, store, tmp_path):
    store.overwrite(STAGED, model_bytes("something else", SIZE))  # same size, other bytes
    agent = pipeline.start_agent(cache=cache_section(tmp_path, store))

    answer = pipeline.client.run(job(STAGED), timeout_s=30)

    assert answer.status is Status.FAILED and answer.reason == "model_corrupt"
    # Nothing of it is left in the cache folder, not even a partial file, and the WebUI never saw it.
    assert model_files(tmp_path) == []
    assert STAGED not in agent.backend.health().models
    dead = pipeline.read(pipeline.settings.topics.dead_letters, 1, match=lambda m: m.key() == answer.job_id.encode())
    assert len(dead) == 1


def test_a_model_larger_than_the_budget_fails_the_job(pipeline, store, tmp_path):
    pipeline.start_agent(cache=cache_section(tmp_path, store, budget_bytes=SIZE // 2, min_free_bytes=0))

    answer = pipeline.client.run(job(STAGED), timeout_s=30)

    assert answer.status is Status.FAILED and answer.reason == "model_too_large"


def test_a_full_disk_is_retried_then_fails_the_job_with_a_reason(pipeline, store, tmp_path):
    free = shutil.disk_usage(tmp_path).free
    # More kept free than the disk has: no model fits, as on a full disk.
    pipeline.start_agent(cache=cache_section(tmp_path, store, min_free_bytes=free * 2), retry={"max_attempts": 2})

    answer = pipeline.client.run(job(STAGED), timeout_s=30)

    assert answer.status is Status.FAILED and answer.reason == "model_cache_full", answer.message
    assert model_files(tmp_path) == []


def test_a_model_pinned_by_another_process_is_not_evicted_to_make_room(pipeline, store, tmp_path):
    store.put(OTHER, model_bytes(OTHER, SIZE))
    values = cache_section(tmp_path, store, budget_bytes=SIZE + SIZE // 2, min_free_bytes=0)
    agent = pipeline.start_agent(cache=values, retry={"max_attempts": 2})
    assert pipeline.client.run(job(STAGED), timeout_s=30).status is Status.SUCCEEDED
    # Another process on the instance (an operator's tool) uses the staged model: room for one only.
    other_process = ModelCache(tmp_path / "cache", store.source(), budget_bytes=values["budget_bytes"])
    try:
        with other_process.use(STAGED):
            blocked = pipeline.client.run(job(OTHER), timeout_s=30)
            assert (tmp_path / "cache" / "checkpoints" / STAGED).is_file()
        served = pipeline.client.run(job(OTHER), timeout_s=30)  # the pin is gone: STAGED is evicted
    finally:
        other_process.close()

    assert blocked.status is Status.FAILED and blocked.reason == "model_cache_full", blocked.message
    assert served.status is Status.SUCCEEDED, served.message
    assert served.timings_ms["stage_ms"] > 0
    assert [entry.name for entry in agent.model_cache.ls()] == [OTHER]


def test_an_unreachable_store_is_retried_then_fails_with_a_reason(pipeline, store, tmp_path):
    values = cache_section(tmp_path, store)
    pipeline.start_agent(cache=values | store.cut_off(), retry={"max_attempts": 2})

    answer = pipeline.client.run(job(STAGED), timeout_s=60)

    assert answer.status is Status.FAILED and answer.reason == "model_unavailable", answer.message
    assert pipeline.client.run(job(DECLARED), timeout_s=30).status is Status.SUCCEEDED  # the WebUI's own models


def test_a_model_added_to_the_store_while_running_is_picked_up_and_served(pipeline, store, tmp_path):
    agent = pipeline.start_agent(cache=cache_section(tmp_path, store))
    assert pipeline.client.run(job(STAGED), timeout_s=30).status is Status.SUCCEEDED  # manifest read

    store.put(LATER, model_bytes(LATER, SIZE))

    # The watcher sees the new manifest (inotify on the directory, polling for S3).
    assert wait_until(lambda: LATER in agent.model_cache.manifest().names(), timeout_s=10)
    answer = pipeline.client.run(job(LATER), timeout_s=30)
    assert answer.status is Status.SUCCEEDED, answer.message
    assert answer.timings_ms["stage_ms"] > 0


def test_a_changed_model_in_the_store_is_staged_again_on_its_next_use(pipeline, store, tmp_path):
    agent = pipeline.start_agent(cache=cache_section(tmp_path, store))
    assert pipeline.client.run(job(STAGED), timeout_s=30).status is Status.SUCCEEDED
    old_sha = agent.model_cache.ls()[0].sha256

    store.put(STAGED, model_bytes("version 2", SIZE))

    assert wait_until(lambda: agent.model_cache.manifest().get(STAGED).sha256 != old_sha, timeout_s=10)
    answer = pipeline.client.run(job(STAGED), timeout_s=30)
    assert answer.status is Status.SUCCEEDED, answer.message
    assert answer.timings_ms["stage_ms"] > 0
    assert (tmp_path / "cache" / "checkpoints" / STAGED).read_bytes() == model_bytes("version 2", SIZE)
