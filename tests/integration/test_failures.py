"""The pipeline under failure: a killed agent, a revoked partition, a restarted broker."""

from __future__ import annotations

import signal
import time

import pytest
from conftest import Pipeline
from test_pipeline import job, wait_until

from sdagent.client import Client
from sdagent.devstack.kafka import KafkaBroker
from sdagent.devstack.stack import ensure_topics, local_aws_environment, settings_from, spawn_agent, stack_config
from sdagent.jobs import Status


def terminal_statuses(events):
    return [e.status for e in events if e.status.is_terminal]


@pytest.mark.both_intakes
def test_agent_killed_mid_job_leaves_the_job_to_the_other_agent_answered_once(pipeline, tmp_path):
    slow = {"step_latency_s": 0.1}
    processes = {}
    for name in ("agent-a", "agent-b"):
        config = pipeline.config | {"agent": {"instance_id": name}, "backend": {**pipeline.config["backend"], **slow}}
        processes[name] = spawn_agent(config, tmp_path, name)
    try:
        queued = pipeline.client.submit(job(job_id="survives-sigkill", steps=30))
        started = []
        assert wait_until(
            lambda: (
                started.extend(
                    e
                    for e in pipeline.events(queued.job_id, until_terminal_count=0, timeout_s=0)
                    if e.status is Status.STARTED
                )
                or started
            ),
            timeout_s=60,
        )
        victim = started[0].agent
        processes[victim].send_signal(signal.SIGKILL)
        processes[victim].wait(10)

        events = pipeline.events(queued.job_id, timeout_s=90)
        assert terminal_statuses(events) == [Status.SUCCEEDED]
        (answer,) = [e for e in events if e.status is Status.SUCCEEDED]
        assert answer.agent != victim
        time.sleep(2)  # nothing else may arrive late
        assert terminal_statuses(pipeline.events(queued.job_id)) == [Status.SUCCEEDED]
    finally:
        for process in processes.values():
            process.kill()
            process.wait(10)


def test_partition_revoked_mid_job_is_released_and_answered_once(pipeline):
    # The classic protocol with an eager assignor revokes every partition on a rebalance, so the
    # running job's partition is revoked for sure when the second agent joins.
    eager = {"group_protocol": "classic", "client_config": {"partition.assignment.strategy": "range"}}
    first = pipeline.start_agent(kafka=eager, backend={"step_latency_s": 0.2})
    queued = pipeline.client.submit(job(job_id="revoked-mid-job", steps=25))
    assert wait_until(lambda: first.agent.intake.busy, timeout_s=30)
    pipeline.start_agent(kafka=eager, backend={"step_latency_s": 0.2})

    events = pipeline.events(queued.job_id, timeout_s=60)
    assert Status.RELEASED in [e.status for e in events]
    assert terminal_statuses(events) == [Status.SUCCEEDED]


@pytest.fixture
def own_broker():
    broker = KafkaBroker().start()
    try:
        yield broker
    finally:
        broker.cleanup()


@pytest.mark.both_intakes
def test_broker_restart_while_jobs_flow_loses_and_repeats_nothing(
    own_broker, aws_endpoint, s3_bucket, consumption, monkeypatch
):
    for name, value in local_aws_environment().items():
        monkeypatch.setenv(name, value)
    config = stack_config(
        own_broker.bootstrap, aws_endpoint, s3_bucket, topic_prefix="restart.", consumption=consumption
    )
    settings = settings_from(config)
    ensure_topics(settings)
    pipeline = Pipeline(settings, config, Client(settings.kafka, settings.topics))
    try:
        agent = pipeline.start_agent(backend={"step_latency_s": 0.05})
        job_ids = [pipeline.client.submit(job(job_id=f"flowing-{i}", steps=4)).job_id for i in range(12)]
        assert wait_until(lambda: agent.backend.faults.calls >= 3, timeout_s=30)
        own_broker.restart()
        job_ids += [pipeline.client.submit(job(job_id=f"after-restart-{i}", steps=4)).job_id for i in range(3)]

        for job_id in job_ids:
            assert terminal_statuses(pipeline.events(job_id, timeout_s=60)) == [Status.SUCCEEDED], job_id
    finally:
        for running in pipeline.agents:
            running.stop()
        pipeline.client.close()
