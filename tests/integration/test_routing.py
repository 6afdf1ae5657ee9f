"""Load-aware routing on the real broker: agents' beacons on the agents topic, and a routed
client that sends new jobs past a busy agent's backlog to the idle one."""

from __future__ import annotations

import pytest
from confluent_kafka import Producer

from sdagent.client import Client
from sdagent.devstack.process import wait_until
from sdagent.jobs import Job, Status
from sdagent.kafka.agents import AgentRecord
from sdagent.kafka.records import job_headers

pytestmark = pytest.mark.integration


def job(**fields) -> Job:
    return Job.model_validate({"model": "sd15.safetensors", "prompt": "a lighthouse", "width": 64, "height": 64,
                               "steps": 2, **fields})  # fmt: skip


def latest_beacon(pipeline, instance_id: str) -> AgentRecord | None:
    records = pipeline.read(pipeline.settings.topics.agents, 10_000, timeout_s=1.0,
                            match=lambda m: m.key() == instance_id.encode() and m.value() is not None)  # fmt: skip
    return AgentRecord.from_bytes(records[-1].value()) if records else None


def test_routed_jobs_pass_a_busy_agents_backlog_to_the_idle_agent(pipeline):
    busy = pipeline.start_agent(backend={"step_latency_s": 0.05})
    idle = pipeline.start_agent()
    assert wait_until(lambda: all(pipeline.jobs_partitions_held(a) == 1 for a in pipeline.agents), timeout_s=30)
    (busy_partition,) = [p for t, p in busy.agent.intake.partitions if t == pipeline.settings.topics.jobs]
    producer = Producer({"bootstrap.servers": pipeline.settings.kafka.bootstrap_servers})
    backlog = [job(job_id=f"backlog-{i}", steps=40) for i in range(4)]  # ~2 s each on the busy agent
    for queued in backlog:
        producer.produce(pipeline.settings.topics.jobs, value=queued.model_dump_json(exclude_none=True).encode(),
                         key=queued.job_id.encode(), partition=busy_partition, headers=job_headers(queued))  # fmt: skip
    producer.flush(10)
    assert wait_until(lambda: (r := latest_beacon(pipeline, "agent-0")) is not None and r.queued >= 3, timeout_s=20)
    idle_beacon = latest_beacon(pipeline, "agent-1")
    assert idle_beacon is not None and idle_beacon.jobs_partitions == [1 - busy_partition]

    routed = Client(
        pipeline.settings.kafka, pipeline.settings.topics.model_copy(update={"jobs_routing": "least_loaded"})
    )
    try:
        assert wait_until(lambda: routed._placement.place(job())[1] != -1, timeout_s=10)  # the view is read
        answers = [routed.run(job(job_id=f"routed-{i}"), timeout_s=30) for i in range(4)]
    finally:
        routed.close()

    assert [a.status for a in answers] == [Status.SUCCEEDED] * 4
    assert {a.agent for a in answers} == {idle.agent.parts.instance_id}
    for queued in backlog:  # the backlog itself is served where it was
        (terminal,) = [e for e in pipeline.events(queued.job_id, timeout_s=60) if e.status.is_terminal]
        assert (terminal.status, terminal.agent) == (Status.SUCCEEDED, busy.agent.parts.instance_id)
