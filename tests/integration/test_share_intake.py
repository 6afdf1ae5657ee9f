"""The share-group intake on the real broker: any idle agent takes the next job, a job is settled
once, and no record is dropped by the broker without a dead letter that says why."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
from confluent_kafka import Producer
from test_pipeline import headers_of, job, wait_until
from test_poison import POISON, poison_in_parse

from sdagent.devstack.stack import spawn_agent
from sdagent.jobs import Status

pytestmark = pytest.mark.parametrize("consumption", ["share"], indirect=True)


def terminal(pipeline, job_id: str) -> list[Status]:
    return [e.status for e in pipeline.events(job_id) if e.status.is_terminal]


def test_a_record_whose_path_keeps_raising_is_dead_lettered_after_its_attempts_and_the_queue_goes_on(
    pipeline, monkeypatch
):
    agent = pipeline.start_agent(agent={"record_attempts": 3})
    poison_in_parse(agent, monkeypatch)
    pipeline.produce_raw(json.dumps(job(job_id=POISON)).encode())
    pipeline.produce_raw(json.dumps(job(job_id="behind-the-poison")).encode())

    (letter,) = pipeline.read(pipeline.settings.topics.dead_letters, 1, timeout_s=60)
    headers = headers_of(letter)
    # Each attempt was a delivery: released after it raised, counted by the broker.
    assert headers["sdagent-reason"] == "poison_record" and headers["sdagent-attempts"] == "3"
    assert headers["sdagent-exception"] == "RecursionError" and headers["sdagent-job-id"] == POISON
    assert terminal(pipeline, "behind-the-poison") == [Status.SUCCEEDED]
    (answer,) = [e for e in pipeline.events(POISON) if e.status.is_terminal]
    assert answer.status is Status.FAILED and answer.reason == "poison_record"


def test_a_job_the_fleet_took_to_the_delivery_limit_is_dead_lettered_not_dropped(pipeline, tmp_path):
    # delivery_limit 2: the broker would archive the job silently after a second delivery ends
    # unanswered. The first agent is killed mid-job; the second gives the job up with a reason.
    limits = {"delivery_limit": 2}
    config = pipeline.config | {
        "agent": {**pipeline.config["agent"], "instance_id": "killed", "record_attempts": 1},
        "kafka": {**pipeline.config["kafka"], "share": {**pipeline.config["kafka"]["share"], **limits}},
        "backend": {**pipeline.config["backend"], "step_latency_s": 0.1},
    }
    victim = spawn_agent(config, tmp_path, "killed")
    try:
        queued = pipeline.client.submit(job(job_id="killed-under-it", steps=100))
        started = []
        assert wait_until(
            lambda: (
                started.extend(e for e in pipeline.events(queued.job_id, 0, 0) if e.status is Status.STARTED) or started
            ),
            timeout_s=60,
        )
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        survivor = spawn_agent(config | {"agent": {**config["agent"], "instance_id": "survivor"}}, tmp_path, "survivor")
        try:
            (letter,) = pipeline.read(pipeline.settings.topics.dead_letters, 1, timeout_s=60)
            assert headers_of(letter)["sdagent-reason"] == "poison_record"
            assert headers_of(letter)["sdagent-attempts"] == "2"
            assert "without an answer" in json.dumps(headers_of(letter))
            assert terminal(pipeline, queued.job_id) == [Status.FAILED]
        finally:
            survivor.kill()
            survivor.wait(10)
    finally:
        victim.kill()
        victim.wait(10)


def test_jobs_produced_in_one_batch_are_spread_and_each_answered_once(pipeline):
    # A batching producer hands the broker one batch, which a share group acquires whole: the
    # agent that polls it runs one job and hands the rest back for the others, each hand-back a
    # delivery. With a limit of 3 most of them would reach it: they must be copied back, not
    # dropped by the broker or dead-lettered.
    share = {**pipeline.config["kafka"]["share"], "delivery_limit": 3}
    for _ in range(3):
        pipeline.start_agent(backend={"step_latency_s": 0.02}, kafka={"share": share}, agent={"record_attempts": 2})
    batching = Producer({"bootstrap.servers": pipeline.settings.kafka.bootstrap_servers, "linger.ms": 200})
    job_ids = [f"batched-{i}" for i in range(30)]
    for job_id in job_ids:
        batching.produce(pipeline.settings.topics.jobs, json.dumps(job(job_id=job_id, steps=10)).encode())
    batching.flush(10)

    answers = {job_id: pipeline.events(job_id, timeout_s=60) for job_id in job_ids}
    for job_id, events in answers.items():
        assert [e.status for e in events if e.status.is_terminal] == [Status.SUCCEEDED], job_id
    agents = {e.agent for events in answers.values() for e in events if e.status is Status.SUCCEEDED}
    assert len(agents) >= 2
    assert pipeline.read(pipeline.settings.topics.dead_letters, 1, timeout_s=2) == []


def test_more_agents_than_partitions_all_get_work(pipeline):
    assert pipeline.settings.topics.jobs_partitions == 1
    for _ in range(3):
        pipeline.start_agent(backend={"step_latency_s": 0.05})
    answers, lock = [], threading.Lock()

    def submit(index: int) -> None:
        answer = pipeline.client.run(job(job_id=f"many-{index}", steps=20), timeout_s=60)
        with lock:
            answers.append(answer)

    # Waves of three concurrent jobs of ~1 s: an agent that has joined is idle at each wave.
    for wave in range(6):
        threads = [threading.Thread(target=submit, args=(wave * 3 + i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert all(a.status is Status.SUCCEEDED for a in answers) and len(answers) == 18
    assert {a.agent for a in answers} == {"agent-0", "agent-1", "agent-2"}


def test_a_held_agent_leaves_the_group_and_holds_no_job_back(pipeline):
    held = pipeline.start_agent()
    pipeline.start_agent()
    seen: set[str] = set()
    assert wait_until(lambda: seen.update({pipeline.client.run(job(steps=40), timeout_s=30).agent}) or len(seen) == 2,
                      timeout_s=60)  # fmt: skip
    held.agent.controls.hold("backend_down")  # as when its WebUI is down
    # Its consumer polled an empty topic last: left open, its fetch would take the next job.
    assert wait_until(lambda: all(lane.consumer is None for lane in held.agent.intake._lanes), timeout_s=10)
    started = time.monotonic()
    answers = [pipeline.client.run(job(steps=4), timeout_s=10) for _ in range(3)]
    assert {a.agent for a in answers} == {"agent-1"} and all(a.status is Status.SUCCEEDED for a in answers)
    assert time.monotonic() - started < 10  # none waited for a lock to run out (15 s)
    held.agent.controls.unhold("backend_down")
    assert wait_until(lambda: all(lane.consumer is not None for lane in held.agent.intake._lanes), timeout_s=10)
