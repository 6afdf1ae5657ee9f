"""Spot interruptions end to end: the notice comes from IMDS, the job moves, nothing is lost."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime, timedelta

import pytest
from test_failures import terminal_statuses
from test_pipeline import job, wait_until

from sdagent.devstack.fake_imds import FakeImds
from sdagent.devstack.stack import spawn_agent
from sdagent.jobs import Status

SPOT_INSTANCE = "i-0spotvictim"


@pytest.fixture
def imds():
    fake = FakeImds().start()
    fake.identity(SPOT_INSTANCE, "g5.xlarge", "us-east-1")
    yield fake
    fake.stop()


def spot_agent(pipeline, tmp_path, imds):
    config = pipeline.config | {
        "agent": {key: value for key, value in pipeline.config["agent"].items() if key != "instance_id"},
        "backend": {**pipeline.config["backend"], "step_latency_s": 0.1},
        "imds": {"enabled": True, "interval_s": 0.5},
    }
    return spawn_agent(config, tmp_path, "spot-a", env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.endpoint})


def started_on(pipeline, job_ids, agent):
    def seen():
        return any(
            e.status is Status.STARTED and e.agent == agent
            for job_id in job_ids
            for e in pipeline.events(job_id, until_terminal_count=0, timeout_s=0)
        )

    return wait_until(seen, timeout_s=60)


@pytest.mark.both_intakes
def test_spot_notice_moves_the_running_job_and_every_job_succeeds_once(pipeline, tmp_path, imds):
    victim = spot_agent(pipeline, tmp_path, imds)
    try:
        job_ids = [pipeline.client.submit(job(job_id=f"spot-{i}", steps=120)).job_id for i in range(3)]
        assert started_on(pipeline, job_ids, SPOT_INSTANCE)
        noticed = time.monotonic()
        imds.spot("terminate", datetime.now(UTC) + timedelta(seconds=6))
        assert victim.wait(30) == 0
        assert time.monotonic() - noticed < 12
        pipeline.start_agent(backend={"step_latency_s": 0.01})  # the rest of the fleet

        answers = {job_id: pipeline.events(job_id, timeout_s=60) for job_id in job_ids}
        for job_id, events in answers.items():
            assert terminal_statuses(events) == [Status.SUCCEEDED], job_id
            (answer,) = [e for e in events if e.status is Status.SUCCEEDED]
            assert answer.agent != SPOT_INSTANCE
        released = [e for events in answers.values() for e in events if e.status is Status.RELEASED]
        assert [e.agent for e in released] == [SPOT_INSTANCE] and released[0].reason == "draining"
    finally:
        victim.kill()
        victim.wait(10)


@pytest.mark.both_intakes
def test_sigkill_during_a_spot_drain_still_loses_nothing(pipeline, tmp_path, imds):
    victim = spot_agent(pipeline, tmp_path, imds)
    try:
        job_ids = [pipeline.client.submit(job(job_id=f"killed-{i}", steps=60)).job_id for i in range(3)]
        assert started_on(pipeline, job_ids, SPOT_INSTANCE)
        imds.spot("terminate", datetime.now(UTC) + timedelta(seconds=60))
        time.sleep(1.5)  # the notice is seen and the drain under way
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        pipeline.start_agent(backend={"step_latency_s": 0.01})
        for job_id in job_ids:
            assert terminal_statuses(pipeline.events(job_id, timeout_s=60)) == [Status.SUCCEEDED], job_id
    finally:
        victim.kill()
        victim.wait(10)


@pytest.mark.both_intakes
def test_an_agent_restarting_under_a_spot_notice_takes_no_work(pipeline, tmp_path, imds):
    imds.spot("terminate", datetime.now(UTC) + timedelta(seconds=90))
    config = pipeline.config | {
        "agent": {key: value for key, value in pipeline.config["agent"].items() if key != "instance_id"},
        "imds": {"enabled": True, "interval_s": 0.5},
    }
    process = spawn_agent(config, tmp_path, "restarted", env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.endpoint})
    try:
        pipeline.client.submit(job(job_id="must-wait-for-another-agent"))
        assert process.wait(30) == 0
        events = pipeline.events("must-wait-for-another-agent", until_terminal_count=0, timeout_s=0)
        assert events == []
    finally:
        process.kill()
        process.wait(10)
