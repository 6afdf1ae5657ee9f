"""Model affinity in share mode on the real broker: a model's jobs go to its topic while an agent
holding the model is idle, and a job left on a model topic nobody reads is swept up."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from sdagent.client import Client
from sdagent.devstack.process import wait_until
from sdagent.devstack.stack import ensure_topics, local_aws_environment, settings_from, stack_config
from sdagent.jobs import Job, Status
from sdagent.kafka.records import job_headers
from tests.integration.conftest import Pipeline

pytestmark = pytest.mark.integration

MODEL, OTHER = "sd15.safetensors", "sdxl-base.safetensors"


def job(model: str = MODEL, **fields) -> dict:
    return {"model": model, "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, **fields}


@pytest.fixture
def affine(kafka_bootstrap, aws_endpoint, s3_bucket, topic_prefix, monkeypatch) -> Iterator[Pipeline]:
    for name, value in local_aws_environment().items():
        monkeypatch.setenv(name, value)
    config = stack_config(kafka_bootstrap, aws_endpoint, s3_bucket, topic_prefix=topic_prefix, consumption="share",
                          topics={"jobs_key": "model", "model_topics": 8},  # MODEL and OTHER: topics 3 and 7
                          backend={"switch_latency_s": 0.05})  # fmt: skip
    settings = settings_from(config)
    ensure_topics(settings)
    under_test = Pipeline(settings, config, Client(settings.kafka, settings.topics))
    try:
        yield under_test
    finally:
        for agent in under_test.agents:
            agent.stop()
        under_test.client.close()


def test_a_models_jobs_go_to_the_idle_agent_holding_it(affine):
    first = affine.start_agent()
    assert affine.client.run(job(), timeout_s=60).agent == "agent-0"  # the only agent: loads MODEL
    affine.start_agent()
    first.agent.controls.hold("test")  # so that the second agent takes OTHER
    assert wait_until(lambda: all(lane.consumer is None for lane in first.agent.intake._lanes), timeout_s=10)
    assert affine.client.run(job(OTHER), timeout_s=60).agent == "agent-1"
    first.agent.controls.unhold("test")
    view = affine.client._placement._beacons.loads  # what the client routes by
    assert wait_until(lambda: view.holders(MODEL) == ["agent-0"] and view.holders(OTHER) == ["agent-1"], timeout_s=10)

    answers = []
    for i, model in enumerate([MODEL, OTHER] * 4):
        time.sleep(0.5)  # both idle again, and their beacons say so (a busy holder's job goes to the jobs topic)
        answers.append(affine.client.run(job(model, job_id=f"affine-{i}"), timeout_s=30))

    assert [a.status for a in answers] == [Status.SUCCEEDED] * 8
    assert [a.agent for a in answers] == ["agent-0", "agent-1"] * 4
    assert not any("switch_ms" in a.timings_ms for a in answers)


def test_a_job_left_on_a_model_topic_nobody_reads_is_swept_up(affine):
    affine.start_agent()
    assert affine.client.run(job(), timeout_s=60).status is Status.SUCCEEDED
    stranded = Job.model_validate(job(OTHER, job_id="stranded"))
    topic = affine.settings.topics.model_topic(OTHER)
    assert topic != affine.settings.topics.model_topic(MODEL)
    producer = Producer({"bootstrap.servers": affine.settings.kafka.bootstrap_servers})
    producer.produce(topic, value=stranded.model_dump_json(exclude_none=True).encode(), key=OTHER.encode(),
                     headers=job_headers(stranded))  # fmt: skip
    producer.flush(10)

    events = affine.events("stranded", timeout_s=90)
    assert [e.status for e in events if e.status.is_terminal] == [Status.SUCCEEDED]
