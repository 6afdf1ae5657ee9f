"""Model affinity on the real broker: a model's jobs stay with one agent, requeues keep their key,
and each agent publishes the models it holds on the compacted agents topic."""

from __future__ import annotations

import json

import pytest
from confluent_kafka import Producer

from sdagent.client import Client
from sdagent.devstack.process import wait_until
from sdagent.jobs import Job, Status
from sdagent.kafka.publisher import StatusPublisher
from sdagent.kafka.records import MODEL_HEADER, job_key

pytestmark = pytest.mark.integration


def job(model: str = "sd15.safetensors", **fields) -> dict:
    return {"model": model, "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, **fields}


def test_a_models_jobs_stay_with_one_agent(pipeline):
    for _ in range(2):
        pipeline.start_agent()
    assert wait_until(lambda: all(pipeline.jobs_partitions_held(a) == 1 for a in pipeline.agents), timeout_s=30)
    client = Client(
        pipeline.settings.kafka, pipeline.settings.topics.model_copy(update={"jobs_key": "model", "model_lanes": 1})
    )
    try:
        answers = [client.run(job(job_id=f"affine-{i}"), timeout_s=30) for i in range(8)]
    finally:
        client.close()

    assert all(answer.status is Status.SUCCEEDED for answer in answers)
    assert len({answer.agent for answer in answers}) == 1
    assert sum("switch_ms" in answer.timings_ms for answer in answers) <= 1  # loaded once at most


def test_a_requeued_job_keeps_its_key_and_model_header(pipeline):
    topics = pipeline.settings.topics
    producer = Producer({"bootstrap.servers": pipeline.settings.kafka.bootstrap_servers})
    requeued = Job(model="sdxl-base.safetensors", job_id="requeued-1", attempt=1)

    StatusPublisher(producer, topics, "agent-x").requeue(requeued)

    (record,) = pipeline.read(topics.jobs, 1, match=lambda m: m.key() == job_key(requeued, topics))
    assert dict(record.headers())[MODEL_HEADER] == b"sdxl-base.safetensors"
    assert Job.model_validate_json(record.value()).attempt == 1


def test_each_agent_publishes_the_model_it_holds_and_a_tombstone_when_it_leaves(pipeline):
    agent = pipeline.start_agent()
    assert pipeline.client.run(job("sdxl-base.safetensors"), timeout_s=30).status is Status.SUCCEEDED
    topic = pipeline.settings.topics.agents

    def latest_record():
        records = pipeline.read(topic, 1000, timeout_s=1.0, match=lambda m: m.key() == b"agent-0")
        return records[-1] if records else None

    assert wait_until(lambda: (r := latest_record()) is not None and r.value() is not None
                      and json.loads(r.value())["loaded_model"] == "sdxl-base.safetensors")  # fmt: skip
    assert json.loads(latest_record().value())["cached_models"] == []  # no cache configured

    agent.stop()
    assert wait_until(lambda: latest_record().value() is None)
