"""Draining on SIGTERM: stop taking work, finish what can finish, release the rest, lose nothing."""

from __future__ import annotations

import json
import signal
import time

import pytest
from test_failures import terminal_statuses
from test_pipeline import job, wait_until

from sdagent.devstack.stack import spawn_agent
from sdagent.jobs import Status


def start_process_agents(pipeline, tmp_path, names, **agent_settings):
    processes = {}
    for name in names:
        config = pipeline.config | {
            "agent": {**pipeline.config["agent"], "instance_id": name, **agent_settings},
            "backend": {**pipeline.config["backend"], "step_latency_s": 0.1},
        }
        processes[name] = spawn_agent(config, tmp_path, name)
    if pipeline.settings.kafka.consumption == "share":
        # Nothing is ever revoked in a share group: a job may go out once every agent consumes.
        assert wait_until(lambda: all(logged(tmp_path, name, "agent.started") for name in names), timeout_s=60)
        return processes
    # Jobs are submitted only once the group has settled: a job taken by the first member to join
    # and then moved to the second would be released "revoked", not by the drain under test.
    partitions = pipeline.settings.topics.jobs_partitions * 2  # the jobs topic's and the priority lane's
    assert wait_until(lambda: held_partitions(tmp_path, names) == partitions, timeout_s=60)
    return processes


def logged(tmp_path, name, event) -> bool:
    path = tmp_path / f"{name}.log"
    return path.exists() and f'"{event}"' in path.read_text()


def held_partitions(tmp_path, names) -> int | None:
    """Partitions held by the agents together, from each one's latest assignment log line; None
    while one of them holds none."""
    totals = []
    for name in names:
        path = tmp_path / f"{name}.log"
        lines = [json.loads(line) for line in (path.read_text().splitlines() if path.exists() else ())
                 if '"intake.assigned"' in line or '"intake.revoked"' in line]  # fmt: skip
        if not lines or not lines[-1]["total"]:
            return None
        totals.append(lines[-1]["total"])
    return sum(totals)


def started_by(pipeline, job_id):
    found = []
    wait_until(
        lambda: (
            found.extend(
                e for e in pipeline.events(job_id, until_terminal_count=0, timeout_s=0) if e.status is Status.STARTED
            )
            or found
        ),
        timeout_s=60,
    )
    return found[0].agent if found else None


def stop_all(processes):
    for process in processes.values():
        process.kill()
        process.wait(10)


@pytest.mark.both_intakes
def test_sigterm_releases_a_long_job_to_another_agent_answered_once(pipeline, tmp_path):
    processes = start_process_agents(pipeline, tmp_path, ["drain-a", "drain-b"], drain_timeout_s=4, drain_margin_s=1)
    try:
        queued = pipeline.client.submit(job(job_id="released-on-drain", steps=100))
        victim = started_by(pipeline, queued.job_id)
        assert victim is not None
        drained_at = time.monotonic()
        processes[victim].send_signal(signal.SIGTERM)
        assert processes[victim].wait(30) == 0
        assert time.monotonic() - drained_at < 10

        events = pipeline.events(queued.job_id, timeout_s=60)
        assert terminal_statuses(events) == [Status.SUCCEEDED]
        released = [e for e in events if e.status is Status.RELEASED]
        assert [e.agent for e in released] == [victim] and released[0].reason == "draining"
        (answer,) = [e for e in events if e.status is Status.SUCCEEDED]
        assert answer.agent != victim and answer.attempt == 1
    finally:
        stop_all(processes)


@pytest.mark.both_intakes
def test_sigterm_lets_a_nearly_done_job_finish_first(pipeline, tmp_path):
    processes = start_process_agents(pipeline, tmp_path, ["finish-a"], drain_timeout_s=30, drain_margin_s=2)
    try:
        queued = pipeline.client.submit(job(job_id="finishes-on-drain", steps=30))
        assert started_by(pipeline, queued.job_id) == "finish-a"
        time.sleep(1.0)
        processes["finish-a"].send_signal(signal.SIGTERM)
        assert processes["finish-a"].wait(30) == 0
        events = pipeline.events(queued.job_id, timeout_s=10)
        assert terminal_statuses(events) == [Status.SUCCEEDED]
        assert Status.RELEASED not in [e.status for e in events]
    finally:
        stop_all(processes)


@pytest.mark.both_intakes
def test_second_sigterm_releases_at_once(pipeline, tmp_path):
    processes = start_process_agents(pipeline, tmp_path, ["forced-a"], drain_timeout_s=60, drain_margin_s=1)
    try:
        queued = pipeline.client.submit(job(job_id="forced-release", steps=150))
        assert started_by(pipeline, queued.job_id) == "forced-a"
        time.sleep(0.5)
        processes["forced-a"].send_signal(signal.SIGTERM)
        time.sleep(1.0)
        processes["forced-a"].send_signal(signal.SIGTERM)
        assert processes["forced-a"].wait(15) == 0
        events = pipeline.events(queued.job_id, until_terminal_count=0, timeout_s=0)
        assert [e.reason for e in events if e.status is Status.RELEASED] == ["draining"]
        assert terminal_statuses(events) == []  # nobody else runs it here: it waits, queued again
    finally:
        stop_all(processes)


def test_lifecycle_hooks_are_completed_at_launch_and_after_a_group_drain(pipeline, monkeypatch):
    from sdagent.devstack.fake_autoscaling import FakeAutoScaling

    fake = FakeAutoScaling().start()
    try:
        instance = "i-0lifecycle"
        fake.activate("launch", instance)
        fake.activate("terminate", instance)
        lifecycle = {
            "autoscaling_group": "gpu-fleet",
            "launch_hook": "launch",
            "terminate_hook": "terminate",
            "heartbeat_interval_s": 1,
            "region": "us-east-1",
            "endpoint_url": fake.endpoint,
        }
        agent = pipeline.start_agent(
            agent={"instance_id": instance, "drain_timeout_s": 30, "drain_margin_s": 0},
            lifecycle=lifecycle,
            backend={"step_latency_s": 0.1},
        )
        assert wait_until(lambda: fake.actions("CompleteLifecycleAction"), timeout_s=20)
        pipeline.client.submit(job(job_id="finishes-while-heartbeating", steps=25))
        assert wait_until(lambda: agent.agent.intake.busy, timeout_s=20)
        agent.agent.controls.terminating_by_group()
        agent.stop()
        completions = fake.actions("CompleteLifecycleAction")
        assert [c["LifecycleHookName"] for c in completions] == ["launch", "terminate"]
        assert len(fake.actions("RecordLifecycleActionHeartbeat")) >= 1
        events = pipeline.events("finishes-while-heartbeating")
        assert terminal_statuses(events) == [Status.SUCCEEDED]
    finally:
        fake.stop()
