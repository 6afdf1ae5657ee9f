"""The agent with its model cache: jobs stage their model from the store, prewarm comes before work,
store changes are picked up, and every cache failure answers the job with a reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from sdagent.cache.indexer import build_manifest
from sdagent.cache.sources.s3 import S3Source
from sdagent.cache.testing import make_store, model_bytes
from sdagent.devstack.process import wait_until
from sdagent.jobs import Status

pytestmark = pytest.mark.integration

DECLARED = "sd15.safetensors"  # one of the simulator's own models: no cache involved
STAGED = "store-model.safetensors"
LATER = "added-later.safetensors"
SIZE = 256 * 1024


def job(model: str, **fields) -> dict:
    return {"model": model, "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, **fields}


@pytest.fixture
def store(tmp_path) -> Path:
    root = tmp_path / "store"
    make_store(root, {STAGED: model_bytes(STAGED, SIZE)})
    return root


def cache_section(tmp_path: Path, source: str, **values) -> dict:
    return {"source": source, "dir": str(tmp_path / "cache"), "poll_interval_s": 0.2, **values}


def test_a_model_not_yet_local_is_staged_switched_to_and_then_kept(pipeline, store, tmp_path):
    pipeline.start_agent(cache=cache_section(tmp_path, str(store)))

    first = pipeline.client.run(job(STAGED), timeout_s=30)
    second = pipeline.client.run(job(STAGED), timeout_s=30)

    assert first.status is Status.SUCCEEDED, first.message
    assert first.timings_ms["stage_ms"] > 0 and "switch_ms" in first.timings_ms
    assert (tmp_path / "cache" / "checkpoints" / STAGED).read_bytes() == model_bytes(STAGED, SIZE)
    assert second.status is Status.SUCCEEDED
    assert "stage_ms" not in second.timings_ms  # a cache hit
    assert "switch_ms" not in second.timings_ms  # the model stayed loaded


def test_prewarm_stages_the_models_before_the_agent_takes_work(pipeline, store, tmp_path):
    queued = pipeline.client.submit(job(STAGED))  # waiting in Kafka before the agent starts

    pipeline.start_agent(cache=cache_section(tmp_path, str(store), prewarm=[STAGED]))
    events = pipeline.events(queued.job_id)

    (answer,) = [event for event in events if event.status.is_terminal]
    assert answer.status is Status.SUCCEEDED, answer.message
    # Staged by prewarm, before the intake joined the group: the job found it local.
    assert "stage_ms" not in answer.timings_ms
    assert (tmp_path / "cache" / "checkpoints" / STAGED).is_file()


def test_a_model_missing_from_the_store_fails_the_job_with_a_reason(pipeline, store, tmp_path):
    pipeline.start_agent(cache=cache_section(tmp_path, str(store)))

    answer = pipeline.client.run(job("absent.safetensors"), timeout_s=30)

    assert answer.status is Status.FAILED and answer.reason == "model_not_found"
    assert pipeline.client.run(job(DECLARED), timeout_s=30).status is Status.SUCCEEDED  # carries on


def test_a_corrupt_store_copy_fails_the_job_and_is_never_served(pipeline, store, tmp_path):
    (store / STAGED).write_bytes(model_bytes("something else", SIZE))  # same size, other bytes
    pipeline.start_agent(cache=cache_section(tmp_path, str(store)))

    answer = pipeline.client.run(job(STAGED), timeout_s=30)

    assert answer.status is Status.FAILED and answer.reason == "model_corrupt"
    assert not (tmp_path / "cache" / "checkpoints" / STAGED).exists()
    dead = pipeline.read(pipeline.settings.topics.dead_letters, 1, match=lambda m: m.key() == answer.job_id.encode())
    assert len(dead) == 1


def test_a_model_larger_than_the_budget_fails_the_job(pipeline, store, tmp_path):
    pipeline.start_agent(cache=cache_section(tmp_path, str(store), budget_bytes=SIZE // 2, min_free_bytes=0))

    answer = pipeline.client.run(job(STAGED), timeout_s=30)

    assert answer.status is Status.FAILED and answer.reason == "model_too_large"


def test_an_unreachable_store_is_retried_then_fails_with_a_reason(pipeline, store, tmp_path):
    pipeline.start_agent(cache=cache_section(tmp_path, str(store)), retry={"max_attempts": 2})
    shutil.rmtree(store)  # the mount went away after start-up

    answer = pipeline.client.run(job(STAGED), timeout_s=30)

    assert answer.status is Status.FAILED and answer.reason == "model_unavailable"


def test_a_model_added_to_the_store_while_running_is_picked_up_and_served(pipeline, store, tmp_path):
    agent = pipeline.start_agent(cache=cache_section(tmp_path, str(store)))
    make_store(store, {STAGED: model_bytes(STAGED, SIZE), LATER: model_bytes(LATER, SIZE)})

    assert wait_until(lambda: LATER in agent.model_cache.manifest().names(), timeout_s=10)
    answer = pipeline.client.run(job(LATER), timeout_s=30)

    assert answer.status is Status.SUCCEEDED, answer.message
    assert answer.timings_ms["stage_ms"] > 0


def test_models_are_staged_from_an_s3_store(pipeline, aws_endpoint, s3_bucket, tmp_path):
    s3 = boto3.client("s3", endpoint_url=aws_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing", config=Config(s3={"addressing_style": "path"}))  # fmt: skip
    s3.put_object(Bucket=s3_bucket, Key=f"models/{STAGED}", Body=model_bytes(STAGED, SIZE))
    source = S3Source.from_url(s3, f"s3://{s3_bucket}/models")
    source.write_manifest(build_manifest(source))
    pipeline.start_agent(cache=cache_section(tmp_path, f"s3://{s3_bucket}/models", endpoint_url=aws_endpoint,
                                             region="us-east-1"))  # fmt: skip

    answer = pipeline.client.run(job(STAGED), timeout_s=30)

    assert answer.status is Status.SUCCEEDED, answer.message
    assert answer.timings_ms["stage_ms"] > 0
    assert (tmp_path / "cache" / "checkpoints" / STAGED).read_bytes() == model_bytes(STAGED, SIZE)
