"""No record can stall an agent: whatever the per-record path raises, the record is retried a
bounded number of times on its own partition, then dead-lettered with the reason, the exception
and its source offset, answered where a caller can be told, and committed; the agent's other
partitions go on meanwhile."""

from __future__ import annotations

import json

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from test_pipeline import headers_of, job

from sdagent.jobs import Status

ATTEMPTS = 3
BACKOFF_S = 1.0  # the poison's partition waits 1 s, then 2 s: the other partition's job runs first
POISON = "poison-record"


def produce_to(pipeline, partition: int, document: dict) -> None:
    producer = Producer({"bootstrap.servers": pipeline.settings.kafka.bootstrap_servers})
    producer.produce(pipeline.settings.topics.jobs, value=json.dumps(document).encode(), partition=partition)
    producer.flush(10)


def raise_for_poison(original, error: Exception, matches):
    def wrapped(*args, **kwargs):
        if matches(*args, **kwargs):
            raise error
        return original(*args, **kwargs)

    return wrapped


def poison_in_parse(agent, monkeypatch):
    import sdagent.agent.runner as runner

    monkeypatch.setattr(
        runner,
        "parse_job",
        raise_for_poison(runner.parse_job, RecursionError("deep"), lambda raw, *a, **k: POISON.encode() in raw),
    )
    return RecursionError


def poison_in_ledger(agent, monkeypatch):
    ledger = agent.agent.parts.ledger
    monkeypatch.setattr(
        ledger, "finished", raise_for_poison(ledger.finished, KeyError("ledger"), lambda job_id: job_id == POISON)
    )
    return KeyError


def poison_in_answer(agent, monkeypatch):
    publisher = agent.agent.parts.publisher
    refused = KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "answer too large"))
    monkeypatch.setattr(
        publisher,
        "publish_durably",
        raise_for_poison(
            publisher.publish_durably,
            refused,
            lambda event, *a, **k: event.job_id == POISON and event.status.is_terminal,
        ),
    )
    return KafkaException


STEPS = {"parse": poison_in_parse, "ledger": poison_in_ledger, "answer": poison_in_answer}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_a_record_whose_path_keeps_raising_is_dead_lettered_and_holds_up_no_other_partition(
    pipeline, monkeypatch, step
):
    agent = pipeline.start_agent(agent={"record_attempts": ATTEMPTS, "record_retry_backoff_s": BACKOFF_S})
    exception = STEPS[step](agent, monkeypatch)
    produce_to(pipeline, 0, job(job_id=POISON))
    produce_to(pipeline, 0, job(job_id="behind-the-poison"))
    produce_to(pipeline, 1, job(job_id="on-another-partition"))

    (letter,) = pipeline.read(pipeline.settings.topics.dead_letters, 1, timeout_s=60)
    headers = headers_of(letter)
    assert headers["sdagent-reason"] == "poison_record"
    assert headers["sdagent-exception"] == exception.__name__ and headers["sdagent-attempts"] == str(ATTEMPTS)
    assert headers["sdagent-source-partition"] == "0" and int(headers["sdagent-source-offset"]) >= 0
    assert headers["sdagent-job-id"] == POISON and json.loads(letter.value())["job_id"] == POISON

    other = [e for e in pipeline.events("on-another-partition") if e.status.is_terminal]
    assert [e.status for e in other] == [Status.SUCCEEDED]

    # Answered while the poison still waited for its last try: its partition alone was held back.
    def other_succeeded(message) -> bool:
        return message.key() == b"on-another-partition" and headers_of(message)["sdagent-status"] == "succeeded"

    answered_at = pipeline.read(pipeline.settings.topics.results, 1, match=other_succeeded)[0].timestamp()[1]
    assert answered_at < letter.timestamp()[1]
    # The record behind it on its own partition runs once it is given up: in order, nothing lost.
    assert [e.status for e in pipeline.events("behind-the-poison") if e.status.is_terminal] == [Status.SUCCEEDED]
    if step != "answer":  # the answer itself is what cannot be written there
        (answer,) = [e for e in pipeline.events(POISON) if e.status.is_terminal]
        assert (
            answer.status is Status.FAILED and answer.reason == "poison_record" and exception.__name__ in answer.message
        )


def test_a_failing_backend_or_upload_fails_the_job_at_once_with_its_reason(pipeline, monkeypatch):
    agent = pipeline.start_agent()
    backend = agent.agent.parts.backend
    backend_bug = raise_for_poison(
        backend.generate, ZeroDivisionError("bug"), lambda job, *a: job.job_id == "backend-bug"
    )
    monkeypatch.setattr(backend, "generate", backend_bug)
    outputs = agent.agent.parts.runner._outputs
    upload_bug = raise_for_poison(outputs.store, TypeError("bug"), lambda job, *a: job.job_id == "upload-bug")
    monkeypatch.setattr(outputs, "store", upload_bug)
    for job_id, exception in (("backend-bug", "ZeroDivisionError"), ("upload-bug", "TypeError")):
        answer = pipeline.client.run(job(job_id=job_id), timeout_s=30)
        assert answer.status is Status.FAILED and answer.reason == "internal_error" and exception in answer.message
    letters = pipeline.read(pipeline.settings.topics.dead_letters, 2)
    assert sorted(headers_of(m)["sdagent-job-id"] for m in letters) == ["backend-bug", "upload-bug"]
    assert pipeline.client.run(job(), timeout_s=30).status is Status.SUCCEEDED


class RefusingReplies:
    """The agent's real producer, except that it refuses every record for one topic at once (as
    librdkafka does for a partition its metadata does not have)."""

    def __init__(self, producer, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    def produce(self, topic, *args, **kwargs):
        if topic == self._topic:
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION, "no such partition"))
        return self._producer.produce(topic, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._producer, name)


def test_a_reply_that_cannot_be_sent_holds_up_neither_the_answer_nor_the_commit(pipeline, monkeypatch):
    agent = pipeline.start_agent()
    publisher = agent.agent.parts.publisher
    replies = pipeline.settings.topics.replies
    monkeypatch.setattr(publisher, "_producer", RefusingReplies(publisher._producer, replies))
    queued = pipeline.client.submit(job(job_id="reply-refused", reply_to=replies, reply_partition=0))
    assert [e.status for e in pipeline.events(queued.job_id) if e.status.is_terminal] == [Status.SUCCEEDED]
    assert pipeline.client.submit(job(job_id="next-one")).job_id == "next-one"
    assert [e.status for e in pipeline.events("next-one") if e.status.is_terminal] == [Status.SUCCEEDED]


@pytest.mark.parametrize("own", ["jobs", "results", "dead_letters", "control", "agents"])
def test_a_reply_address_naming_the_fleet_s_own_topics_is_refused_and_nothing_is_written_there(pipeline, own):
    pipeline.start_agent()
    topic = getattr(pipeline.settings.topics, own)
    job_id = f"replies-into-{own}"
    pipeline.produce_raw(json.dumps(job(job_id=job_id, reply_to=topic)).encode())
    (answer,) = [e for e in pipeline.events(job_id) if e.status.is_terminal]
    assert (
        answer.status is Status.REJECTED and answer.reason == "bad_reply_to" and "fleet's own topics" in answer.message
    )
    if own != "results":  # the one answer of record is there
        # No answer (a status record) went there; the dead letter itself goes to dead_letters.
        answers = pipeline.read(topic, 1, timeout_s=2, match=lambda m: "sdagent-status" in headers_of(m))
        assert answers == []
    (letter,) = pipeline.read(pipeline.settings.topics.dead_letters, 1, match=lambda m: m.key() == job_id.encode())
    assert headers_of(letter)["sdagent-reason"] == "bad_reply_to"
    assert pipeline.client.run(job(), timeout_s=30).status is Status.SUCCEEDED


def test_a_reply_partition_that_does_not_exist_is_refused_on_intake(pipeline):
    pipeline.start_agent()
    replies = pipeline.settings.topics.replies
    pipeline.produce_raw(json.dumps(job(job_id="partition-99", reply_to=replies, reply_partition=99)).encode())
    (answer,) = [e for e in pipeline.events("partition-99") if e.status.is_terminal]
    assert answer.status is Status.REJECTED and answer.reason == "bad_reply_to"
    assert answer.message == f"reply_partition 99 does not exist: {replies!r} has 2 partitions"


def test_a_reply_topic_outside_the_allow_list_is_refused_and_answered_on_the_results_topic(pipeline):
    pipeline.start_agent()
    queued = pipeline.client.submit(job(job_id="no-such-reply-topic", reply_to="nobody.listens.here"))
    (answer,) = [e for e in pipeline.events(queued.job_id) if e.status.is_terminal]
    assert (
        answer.status is Status.REJECTED and answer.reason == "bad_reply_to" and "nobody.listens.here" in answer.message
    )


def test_an_answer_the_broker_refuses_for_good_is_a_poison_record_not_an_outage(pipeline):
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

    # The results topic takes records up to 8 KiB here: a success that echoes 10 KB of metadata
    # is refused by the broker (MSG_SIZE_TOO_LARGE) on every try, however long one waits.
    admin = AdminClient({"bootstrap.servers": pipeline.settings.kafka.bootstrap_servers})
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        pipeline.settings.topics.results,
        incremental_configs=[ConfigEntry("max.message.bytes", "8192", incremental_operation=AlterConfigOpType.SET)],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)
    pipeline.start_agent(agent={"record_attempts": ATTEMPTS, "record_retry_backoff_s": 0.2})
    pipeline.client.submit(job(job_id="answer-too-large", metadata={"note": "x" * 10_000}))

    (letter,) = pipeline.read(pipeline.settings.topics.dead_letters, 1, timeout_s=60)
    headers = headers_of(letter)
    assert headers["sdagent-reason"] == "poison_record" and headers["sdagent-exception"] == "RecordRefused"
    (answer,) = [e for e in pipeline.events("answer-too-large") if e.status.is_terminal]
    assert answer.status is Status.FAILED and answer.reason == "poison_record" and "too large" in answer.message.lower()
    assert pipeline.client.run(job(), timeout_s=30).status is Status.SUCCEEDED
