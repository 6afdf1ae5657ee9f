"""Submissions from the event loop to the jobs topic, answered only once the broker has them.

A job is durable when both its record on the jobs topic and its ``queued`` status event on the
results topic are acknowledged by all in-sync replicas (acks=all, idempotent producer): the event
lets every gateway replica answer for the job before an agent has touched it. A poll thread serves
librdkafka's delivery callbacks and resolves the waiting requests' futures on the loop.
"""

from __future__ import annotations

import asyncio
import threading
import time

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from sdagent.errors import KafkaUnavailable
from sdagent.jobs import Job, Status, StatusEvent
from sdagent.kafka.clients import submitter_config
from sdagent.kafka.config import KafkaConfig, TopicsConfig
from sdagent.kafka.records import STATUS_HEADER, job_headers, job_key
from sdagent.kafka.routing import placement_for

log = structlog.get_logger(__name__)

POLL_S = 0.05
# Batching under load: a request waits for its own acks anyway, so a few ms of linger cost
# little latency and let the broker take hundreds of submissions per request.
LINGER_MS = 2
READY_CACHE_S = 2.0
READY_TIMEOUT_S = 2.0


class JobQueue:
    """Puts jobs on the jobs topic for the gateway; ``submit`` returns once they are durable."""

    def __init__(self, kafka: KafkaConfig, topics: TopicsConfig, gateway_id: str, *, delivery_timeout_s: float) -> None:
        config = submitter_config(kafka, f"sdagent-gateway-{gateway_id}")
        config.update({"linger.ms": LINGER_MS, "message.timeout.ms": int(delivery_timeout_s * 1000)})
        self._producer = Producer(config)
        self._placement = placement_for(kafka, topics)
        self._topics = topics
        self._gateway_id = gateway_id
        self._reachable = False
        self._checked_at = float("-inf")
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="gateway-producer", daemon=True)
        self._poller.start()

    async def submit(self, job: Job) -> None:
        """Queue ``job`` and its ``queued`` event; raise KafkaUnavailable unless both are durable."""
        loop = asyncio.get_running_loop()
        queued = StatusEvent(job_id=job.job_id, status=Status.QUEUED, agent=f"gateway:{self._gateway_id}",
                             correlation_id=job.correlation_id)  # fmt: skip
        deliveries = [loop.create_future(), loop.create_future()]
        topic, partition = self._placement.place(job)
        try:
            self._producer.produce(topic, key=job_key(job, self._topics),
                                   value=job.to_bytes(), headers=job_headers(job),
                                   partition=partition, on_delivery=_resolver(loop, deliveries[0]))  # fmt: skip
            self._producer.produce(self._topics.results, key=job.job_id.encode(), value=queued.to_bytes(),
                                   headers=[(STATUS_HEADER, Status.QUEUED.value.encode())],
                                   on_delivery=_resolver(loop, deliveries[1]))  # fmt: skip
        except (BufferError, KafkaException) as exc:  # local queue full, or the producer is fenced
            raise KafkaUnavailable(f"could not queue job {job.job_id}: {exc}") from exc
        errors = [error for error in await asyncio.gather(*deliveries) if error is not None]
        if errors:
            raise KafkaUnavailable(f"job {job.job_id} was not durably queued: {errors[0]}")

    def broker_reachable(self) -> bool:
        """Whether a broker answered a metadata request just now (blocking: call off the loop).
        Cached briefly so that frequent readiness probes do not each cost a round trip."""
        now = time.monotonic()
        if now - self._checked_at > READY_CACHE_S:
            try:
                self._producer.list_topics(self._topics.jobs, timeout=READY_TIMEOUT_S)
                self._reachable = True
            except KafkaException:
                self._reachable = False
            self._checked_at = now
        return self._reachable

    def close(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._poller.join(timeout_s)
        self._placement.close()
        left = self._producer.flush(timeout_s)
        if left:
            log.warning("gateway.undelivered_at_close", records=left)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(POLL_S)


def _resolver(loop: asyncio.AbstractEventLoop, future: asyncio.Future):
    def on_delivery(error: KafkaError | None, _message: Message) -> None:
        loop.call_soon_threadsafe(_settle, future, None if error is None else str(error))

    return on_delivery


def _settle(future: asyncio.Future, error: str | None) -> None:
    if not future.done():  # the request may have gone (client disconnected)
        future.set_result(error)
