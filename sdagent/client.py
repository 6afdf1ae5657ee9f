"""The Python client: submit jobs, wait for their answers, cancel them.

Async callers use :meth:`Client.submit`, which returns once the job is durably queued (acks=all),
and read status events later from the results topic. Sync callers use :meth:`Client.run`: the
client reads one partition of the replies topic (chosen at random, assigned directly, no group
join), and every job it sends names that partition and a fresh correlation id, so the agent's
answers come straight back to it::

    from sdagent.client import Client
    with Client.connect("127.0.0.1:9092") as client:
        answer = client.run({"model": "sd15.safetensors", "prompt": "a lighthouse"}, timeout_s=60)
        print(answer.status, [o.url for o in answer.outputs])
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog
from confluent_kafka import Consumer, Producer, TopicPartition

from sdagent.errors import KafkaUnavailable
from sdagent.jobs import Job, StatusEvent
from sdagent.kafka.acks import Deliveries
from sdagent.kafka.clients import reader_config, submitter_config, with_metadata_retries
from sdagent.kafka.config import KafkaConfig, TopicsConfig
from sdagent.kafka.records import job_headers, job_key
from sdagent.kafka.routing import KEYED, placement_for

log = structlog.get_logger(__name__)

METADATA_TIMEOUT_S = 10.0
DELIVERY_TIMEOUT_S = 30.0

EventCallback = Callable[[StatusEvent], None]


class Client:
    """Submits jobs to the fleet; thread-safe, one per process is enough."""

    def __init__(self, kafka: KafkaConfig, topics: TopicsConfig, *, reply_partition: int | None = None) -> None:
        self._kafka = kafka
        self._topics = topics
        self._producer = Producer(submitter_config(kafka, "sdagent-client"))
        self._placement = placement_for(kafka, topics)
        self._reply_partition = reply_partition
        self._replies: _ReplyListener | None = None
        self._replies_lock = threading.Lock()

    @classmethod
    def connect(cls, bootstrap_servers: str, topics: TopicsConfig | None = None, **client_config: Any) -> Client:
        kafka = KafkaConfig(bootstrap_servers=bootstrap_servers, client_config=client_config)
        return cls(kafka, topics or TopicsConfig())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def submit(self, job: Job | Mapping[str, Any]) -> Job:
        """Queue ``job`` and return it (with its job id) once the broker has it durably."""
        job = _as_job(job)
        topic, partition = self._placement.place(job)
        self._produce_durably(topic, job_key(job, self._topics), job.to_bytes(),
                              job_headers(job), partition)  # fmt: skip
        log.info("client.submitted", job_id=job.job_id)
        return job

    def run(self, job: Job | Mapping[str, Any], timeout_s: float, on_event: EventCallback | None = None) -> StatusEvent:
        """Submit ``job`` and wait for its terminal status event (sync mode).

        ``on_event`` sees every event on the way (accepted, started, progress...). Raises
        TimeoutError when no answer comes in time; the job stays queued (cancel it if unwanted).
        """
        replies = self._reply_listener()
        job = _as_job(job).model_copy(
            update={
                "reply_to": self._topics.replies,
                "reply_partition": replies.partition,
                "correlation_id": (correlation_id := uuid.uuid4().hex),
            }
        )
        inbox = replies.expect(correlation_id)
        try:
            self.submit(job)
            return _await_terminal(inbox, timeout_s, on_event, job.job_id)
        finally:
            replies.forget(correlation_id)

    def cancel(self, job_id: str) -> None:
        """Ask every agent to cancel ``job_id``: queued, it is answered ``cancelled`` without
        running; running, it is interrupted; finished, it is left as it is."""
        request = {"schema_version": 1, "type": "cancel", "job_id": job_id, "at": datetime.now(UTC).isoformat()}
        self._produce_durably(self._topics.control, job_id.encode(), json.dumps(request).encode())
        log.info("client.cancel_sent", job_id=job_id)

    def close(self) -> None:
        if self._replies is not None:
            self._replies.stop()
        self._placement.close()
        self._producer.flush(DELIVERY_TIMEOUT_S)

    def _produce_durably(
        self, topic: str, key: bytes, value: bytes, headers: list | None = None, partition: int = KEYED
    ) -> None:
        deliveries = Deliveries()
        deliveries.expect()
        self._producer.produce(
            topic, key=key, value=value, partition=partition, headers=headers, on_delivery=deliveries
        )
        problem = deliveries.wait(self._producer, DELIVERY_TIMEOUT_S)
        if problem is not None:
            raise KafkaUnavailable(f"could not queue to {topic}: {problem}")

    def _reply_listener(self) -> _ReplyListener:
        with self._replies_lock:
            if self._replies is None:
                self._replies = _ReplyListener(
                    Consumer(reader_config(self._kafka, "replies")), self._topics.replies, self._reply_partition
                )
            return self._replies


class _ReplyListener:
    """Reads one partition of the replies topic and hands events to whoever waits for them."""

    def __init__(self, consumer: Consumer, topic: str, partition: int | None) -> None:
        self._consumer = consumer
        metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            raise KafkaUnavailable(f"replies topic {topic} does not exist; run `sdagent topics create`")
        count = len(metadata.topics[topic].partitions)
        self.partition = random.randrange(count) if partition is None else partition
        tp = TopicPartition(topic, self.partition)
        # Start at the end as of now, before any job is sent, so no answer can be missed.
        _low, tp.offset = with_metadata_retries(lambda: consumer.get_watermark_offsets(tp, timeout=METADATA_TIMEOUT_S))
        consumer.assign([tp])
        self._inboxes: dict[str, queue.Queue[StatusEvent]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdagent-replies", daemon=True)
        self._thread.start()

    def expect(self, correlation_id: str) -> queue.Queue[StatusEvent]:
        inbox: queue.Queue[StatusEvent] = queue.Queue()
        with self._lock:
            self._inboxes[correlation_id] = inbox
        return inbox

    def forget(self, correlation_id: str) -> None:
        with self._lock:
            self._inboxes.pop(correlation_id, None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._consumer.poll(0.1)
            if message is None or message.error() is not None:
                continue
            try:
                event = StatusEvent.from_bytes(message.value())
            except ValueError:
                log.warning("client.bad_reply", offset=message.offset())
                continue
            with self._lock:
                inbox = self._inboxes.get(event.correlation_id or "")
            if inbox is not None:
                inbox.put(event)


def _await_terminal(
    inbox: queue.Queue[StatusEvent], timeout_s: float, on_event: EventCallback | None, job_id: str
) -> StatusEvent:
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no answer for job {job_id} within {timeout_s} s")
        try:
            event = inbox.get(timeout=remaining)
        except queue.Empty:
            continue
        if on_event is not None:
            on_event(event)
        if event.status.is_terminal:
            return event


def _as_job(job: Job | Mapping[str, Any]) -> Job:
    job = job if isinstance(job, Job) else Job.model_validate(dict(job))
    if job.submitted_at is None:
        job = job.model_copy(update={"submitted_at": datetime.now(UTC)})
    return job
