"""The job pipeline end to end on the real broker, moto S3 and the simulated backend."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from PIL import Image

from sdagent.client import Client
from sdagent.devstack.process import wait_until
from sdagent.jobs import Status

MODEL = "sd15.safetensors"
OTHER_MODEL = "sdxl-base.safetensors"


def job(**fields) -> dict:
    return {"model": MODEL, "prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 4, **fields}


def headers_of(message) -> dict[str, str]:
    return {name: value.decode() for name, value in message.headers() or ()}


@pytest.mark.both_intakes
def test_sync_job_succeeds_with_a_link_that_serves_the_image(pipeline):
    pipeline.start_agent()
    seen = []
    answer = pipeline.client.run(job(seed=7), timeout_s=30, on_event=lambda e: seen.append(e.status))
    assert answer.status is Status.SUCCEEDED
    assert seen[:2] == [Status.ACCEPTED, Status.STARTED] and seen[-1] is Status.SUCCEEDED
    assert answer.info["seed"] == 7 and answer.info["simulator"] is True
    assert {"queue_wait_ms", "inference_ms", "upload_ms", "total_ms"} <= answer.timings_ms.keys()
    (output,) = answer.outputs
    with urllib.request.urlopen(output.url, timeout=10) as response:
        image = Image.open(response)
        assert image.size == (64, 64) and image.format == "PNG"


def test_accepted_is_said_only_when_a_job_must_wait_before_it_starts(pipeline):
    pipeline.start_agent()

    def statuses(**fields) -> list[Status]:
        seen = []
        answer = pipeline.client.run(job(**fields), timeout_s=30, on_event=lambda e: seen.append(e.status))
        assert answer.status is Status.SUCCEEDED
        return seen

    statuses()  # loads MODEL
    on_the_loaded_model = statuses()
    on_another_model = statuses(model=OTHER_MODEL)
    assert Status.ACCEPTED not in on_the_loaded_model and on_the_loaded_model[0] is Status.STARTED
    assert on_another_model[:2] == [Status.ACCEPTED, Status.STARTED]  # the switch comes between them


@pytest.mark.both_intakes
def test_async_job_is_answered_on_the_results_topic(pipeline):
    pipeline.start_agent()
    queued = pipeline.client.submit(job(metadata={"order": 42}))
    events = pipeline.events(queued.job_id)
    terminal = [e for e in events if e.status.is_terminal]
    assert [e.status for e in terminal] == [Status.SUCCEEDED]
    assert terminal[0].metadata == {"order": 42}


@pytest.mark.both_intakes
def test_poison_messages_go_to_the_dead_letter_topic_and_the_agent_carries_on(pipeline):
    pipeline.start_agent()
    pipeline.produce_raw(b"{this is not json")
    pipeline.produce_raw(json.dumps(job(schema_version=9)).encode())
    pipeline.produce_raw(None)
    pipeline.produce_raw(json.dumps(job(width=100, job_id="bad-width", correlation_id="c-1")).encode())
    (rejected,) = pipeline.events("bad-width")
    assert rejected.status is Status.REJECTED and rejected.reason == "invalid" and "width" in rejected.message
    assert rejected.correlation_id == "c-1"

    letters = pipeline.read(pipeline.settings.topics.dead_letters, 4)
    reasons = sorted(headers_of(m)["sdagent-reason"] for m in letters)
    assert reasons == ["invalid", "invalid", "not_json", "schema_version"]
    not_json = next(m for m in letters if headers_of(m)["sdagent-reason"] == "not_json")
    assert not_json.value() == b"{this is not json"
    assert headers_of(not_json)["sdagent-source-topic"] == pipeline.settings.topics.jobs
    assert int(headers_of(not_json)["sdagent-source-offset"]) >= 0

    assert pipeline.client.run(job(), timeout_s=30).status is Status.SUCCEEDED


def test_transient_backend_failures_are_retried_then_succeed(pipeline):
    agent = pipeline.start_agent()
    agent.backend.faults.fail_next(2, transient=True)
    answer = pipeline.client.run(job(), timeout_s=30)
    assert answer.status is Status.SUCCEEDED
    assert agent.backend.faults.calls == 3


@pytest.mark.both_intakes
def test_a_job_failing_every_attempt_fails_and_is_dead_lettered(pipeline):
    agent = pipeline.start_agent(retry={"max_attempts": 3})
    agent.backend.faults.fail_next(10, transient=True)
    answer = pipeline.client.run(job(job_id="always-failing"), timeout_s=30)
    assert answer.status is Status.FAILED and answer.reason == "backend_unavailable"
    assert agent.backend.faults.calls == 3
    (letter,) = pipeline.read(pipeline.settings.topics.dead_letters, 1)
    assert headers_of(letter)["sdagent-job-id"] == "always-failing"
    assert headers_of(letter)["sdagent-reason"] == "backend_unavailable"


def test_permanent_backend_error_fails_without_retrying(pipeline):
    agent = pipeline.start_agent()
    agent.backend.faults.fail_next(1, transient=False, message="CUDA out of memory")
    answer = pipeline.client.run(job(), timeout_s=30)
    assert answer.status is Status.FAILED and "out of memory" in answer.message
    assert agent.backend.faults.calls == 1


def test_expired_job_is_answered_without_running(pipeline):
    agent = pipeline.start_agent()
    past = datetime.now(UTC) - timedelta(seconds=5)
    answer = pipeline.client.run(job(deadline=past.isoformat()), timeout_s=30)
    assert answer.status is Status.EXPIRED
    assert agent.backend.faults.calls == 0


def test_unknown_model_fails_with_a_clear_reason(pipeline):
    pipeline.start_agent()
    answer = pipeline.client.run(job(model="nope.safetensors"), timeout_s=30)
    assert answer.status is Status.FAILED and answer.reason == "model_not_found"


@pytest.mark.both_intakes
def test_cancelling_a_running_job_interrupts_it(pipeline):
    agent = pipeline.start_agent(backend={"step_latency_s": 0.5})
    queued = pipeline.client.submit(job(job_id="long-running", steps=60))
    assert wait_until(lambda: agent.agent.intake.busy)
    started = time.monotonic()
    pipeline.client.cancel(queued.job_id)
    events = pipeline.events(queued.job_id)
    assert [e.status for e in events if e.status.is_terminal] == [Status.CANCELLED]
    assert time.monotonic() - started < 10  # 60 steps would take 30 s


@pytest.mark.both_intakes
def test_cancelling_a_queued_job_answers_it_without_running(pipeline):
    agent = pipeline.start_agent(backend={"step_latency_s": 0.2})
    # Both on one partition (same key routing is not needed: one agent runs one job at a time).
    blocker = pipeline.client.submit(job(job_id="blocker", steps=15))
    assert wait_until(lambda: agent.agent.intake.busy)
    waiting = pipeline.client.submit(job(job_id="waiting"))
    pipeline.client.cancel(waiting.job_id)
    waiting_events = pipeline.events(waiting.job_id)
    assert [e.status for e in waiting_events if e.status.is_terminal] == [Status.CANCELLED]
    assert Status.STARTED not in [e.status for e in waiting_events]
    assert [e.status for e in pipeline.events(blocker.job_id) if e.status.is_terminal] == [Status.SUCCEEDED]


@pytest.mark.both_intakes
def test_a_job_id_answered_before_is_not_run_again(pipeline):
    agent = pipeline.start_agent()
    first = pipeline.client.run(job(job_id="submitted-twice"), timeout_s=30)
    assert first.status is Status.SUCCEEDED
    pipeline.client.submit(job(job_id="submitted-twice"))
    marker = pipeline.client.run(job(job_id="after-the-duplicate"), timeout_s=30)
    assert marker.status is Status.SUCCEEDED
    events = pipeline.events("submitted-twice")
    assert [e.status for e in events if e.status.is_terminal] == [Status.SUCCEEDED]
    assert agent.backend.faults.calls == 2


def test_a_sync_caller_resubmitting_an_answered_job_is_told_at_once(pipeline):
    pipeline.start_agent()
    assert pipeline.client.run(job(job_id="asked-twice"), timeout_s=30).status is Status.SUCCEEDED
    again = pipeline.client.run(job(job_id="asked-twice"), timeout_s=30)
    assert again.status is Status.REJECTED and again.reason == "duplicate" and "succeeded" in again.message
    assert [e.status for e in pipeline.events("asked-twice") if e.status.is_terminal] == [Status.SUCCEEDED]


@pytest.mark.both_intakes
def test_two_agents_share_the_work(pipeline, consumption):
    pipeline.start_agent(backend={"step_latency_s": 0.02})
    pipeline.start_agent(backend={"step_latency_s": 0.02})
    if consumption == "partition":
        assert wait_until(lambda: all(pipeline.jobs_partitions_held(a) == 1 for a in pipeline.agents), timeout_s=30)
    else:  # a share group has no assignment to wait for: both members have joined once both answered
        seen: set[str] = set()
        assert wait_until(
            lambda: seen.update({pipeline.client.run(job(steps=40), timeout_s=30).agent}) or len(seen) == 2,
            timeout_s=60,
        )
    answers, lock = [], threading.Lock()
    # One model for all: keyed by job id, so that both partitions (and agents) get some.
    client = Client(pipeline.settings.kafka, pipeline.settings.topics.model_copy(update={"jobs_key": "job_id"}))

    def submit(index: int) -> None:
        answer = client.run(job(job_id=f"shared-{index}", steps=10), timeout_s=60)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(a.status is Status.SUCCEEDED for a in answers) and len(answers) == 16
    client.close()
    assert {a.agent for a in answers} == {"agent-0", "agent-1"}


def test_img2img_reads_its_init_image_from_s3(pipeline, aws_endpoint, s3_bucket):
    import io

    from sdagent.devstack.moto import aws_client

    source = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(source, format="PNG")
    aws_client("s3", aws_endpoint).put_object(Bucket=s3_bucket, Key="inputs/red.png", Body=source.getvalue())
    pipeline.start_agent()
    answer = pipeline.client.run(
        job(kind="img2img", init_image={"s3_uri": f"s3://{s3_bucket}/inputs/red.png"}), timeout_s=30
    )
    assert answer.status is Status.SUCCEEDED
    missing = pipeline.client.run(
        job(kind="img2img", init_image={"s3_uri": f"s3://{s3_bucket}/inputs/absent.png"}), timeout_s=30
    )
    assert missing.status is Status.FAILED and missing.reason == "input_error"


def test_uploads_failing_every_attempt_fail_the_job_into_the_dead_letter_topic(pipeline):
    from sdagent.devstack.kafka import free_loopback_port

    dead_endpoint = f"http://127.0.0.1:{free_loopback_port()}"
    pipeline.start_agent(outputs={"endpoint_url": dead_endpoint}, retry={"max_attempts": 2})
    answer = pipeline.client.run(job(job_id="upload-never-lands"), timeout_s=60)
    assert answer.status is Status.FAILED and answer.reason == "output_unavailable"
    (letter,) = pipeline.read(pipeline.settings.topics.dead_letters, 1)
    assert headers_of(letter)["sdagent-job-id"] == "upload-never-lands"


@pytest.mark.both_intakes
def test_a_priority_job_overtakes_a_backlog(pipeline):
    agent = pipeline.start_agent(backend={"step_latency_s": 0.02})
    assert pipeline.client.run(job(steps=1), timeout_s=60).status is Status.SUCCEEDED  # joined, warm
    backlog = [pipeline.client.submit(job(job_id=f"backlog-{i}", steps=10)).job_id for i in range(20)]
    urgent = pipeline.client.submit(job(job_id="urgent", priority=5, steps=10)).job_id
    assert [e.status for e in pipeline.events(urgent) if e.status.is_terminal] == [Status.SUCCEEDED]
    finished_before = agent.backend.faults.calls - 2  # the warm-up job and the urgent one
    assert finished_before < len(backlog) // 2, f"{finished_before} backlog jobs ran first"
    for job_id in backlog:
        assert [e.status for e in pipeline.events(job_id) if e.status.is_terminal] == [Status.SUCCEEDED]
