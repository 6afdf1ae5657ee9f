"""Produces what the agent says about jobs: status events, replies to sync callers, dead letters.

Every event goes to the results topic keyed by job id (so one job's events stay in order on one
partition) and, when the job names a ``reply_to`` topic, to that topic as well. Terminal events are
produced durably: :meth:`StatusPublisher.publish_durably` returns only once the broker has them with
acks=all, and the job's offset is committed only after that.
"""

from __future__ import annotations

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from sdagent.errors import KafkaUnavailable, RecordRefused
from sdagent.jobs import Job, StatusEvent
from sdagent.kafka.acks import Deliveries
from sdagent.kafka.config import TopicsConfig
from sdagent.kafka.records import (
    AGENT_HEADER,
    ATTEMPTS_HEADER,
    CORRELATION_HEADER,
    ERROR_HEADER,
    ERROR_HEADER_MAX_BYTES,
    EXCEPTION_HEADER,
    JOB_ID_HEADER,
    REASON_HEADER,
    REQUEUED_BY_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
    STATUS_HEADER,
    Headers,
    ReplyAddress,
    SourceRecord,
    job_headers,
    job_key,
    jobs_topic_of,
)

log = structlog.get_logger(__name__)

# Errors that belong to one record, not to the cluster: retrying the same bytes cannot help.
# (A missing topic or a refused authorisation stays KafkaUnavailable: it is the fleet's, and a
# poison verdict for every job would empty the jobs topic into the dead letters.)
REFUSED_FOR_GOOD = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError._INVALID_ARG,
    }
)


class StatusPublisher:
    """Publishes status events and dead letters through one shared idempotent producer."""

    def __init__(self, producer: Producer, topics: TopicsConfig, agent_id: str, *, delivery_timeout_s: float = 30.0):
        self._producer = producer
        self._topics = topics
        self._agent_id = agent_id
        self._delivery_timeout_s = delivery_timeout_s

    def publish(self, event: StatusEvent, reply: ReplyAddress | None = None) -> None:
        """Queue an advisory event (accepted, started, progress); delivery is not awaited."""
        self._produce_event(event, reply, self._log_failed_delivery)
        self._producer.poll(0)

    def publish_durably(self, event: StatusEvent, reply: ReplyAddress | None = None) -> None:
        """Produce a terminal event and wait until the broker acknowledged every copy.

        Raises KafkaUnavailable when a copy fails or is not acknowledged in time; the caller must
        then not commit the job's offset.
        """
        deliveries = Deliveries()
        self._produce_event(event, reply, deliveries)
        self._await(deliveries, f"status {event.status.value} of job {event.job_id}")

    def reply_only(self, event: StatusEvent, reply: ReplyAddress) -> None:
        """Send ``event`` to the caller's reply topic only (best effort), not to the results topic."""
        key, value, headers = self._record(event)
        self._send_reply(reply, key, value, headers)
        self._producer.poll(0)

    def dead_letter(
        self,
        raw: bytes | None,
        source: SourceRecord,
        reason: str,
        message: str,
        job_id: str | None = None,
        *,
        exception: str | None = None,
        attempts: int | None = None,
    ) -> None:
        """Durably copy a message that could not be run to the dead-letter topic, with why (and,
        when the agent itself raised, the exception's class and how many times it was tried)."""
        headers: Headers = [
            (REASON_HEADER, reason.encode()),
            (ERROR_HEADER, message.encode()[:ERROR_HEADER_MAX_BYTES]),
            (SOURCE_TOPIC_HEADER, source.topic.encode()),
            (SOURCE_PARTITION_HEADER, str(source.partition).encode()),
            (SOURCE_OFFSET_HEADER, str(source.offset).encode()),
            (AGENT_HEADER, self._agent_id.encode()),
        ]
        if job_id:
            headers.append((JOB_ID_HEADER, job_id.encode()))
        if exception:
            headers.append((EXCEPTION_HEADER, exception.encode()))
        if attempts is not None:
            headers.append((ATTEMPTS_HEADER, str(attempts).encode()))
        deliveries = Deliveries()
        self._produce(self._topics.dead_letters, None, job_id.encode() if job_id else None, raw, headers, deliveries)
        self._await(deliveries, f"dead letter from {source.topic}/{source.partition}@{source.offset}")
        log.warning("job.dead_lettered", job_id=job_id, reason=reason, error=message, offset=source.offset)

    def requeue(self, job: Job) -> None:
        """Durably put ``job`` back on the jobs topic, keyed as a caller's submission is."""
        deliveries = Deliveries()
        self._produce(
            jobs_topic_of(job, self._topics),
            None,
            job_key(job, self._topics),
            job.to_bytes(),
            [*job_headers(job), (REQUEUED_BY_HEADER, self._agent_id.encode())],
            deliveries,
        )
        self._await(deliveries, f"requeue of job {job.job_id}")

    def copy_back(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        """Durably put a copy of a record, as it came, back on ``topic`` (a share group's record
        that must go back with a fresh delivery count). Raises KafkaUnavailable or RecordRefused."""
        deliveries = Deliveries()
        self._produce(topic, None, key, value, [*headers, (REQUEUED_BY_HEADER, self._agent_id.encode())], deliveries)
        self._await(deliveries, f"copy of a record back to {topic}")

    def flush(self, timeout_s: float) -> int:
        """Send what is queued; returns how many records are still undelivered."""
        return self._producer.flush(timeout_s)

    def _record(self, event: StatusEvent) -> tuple[bytes, bytes, Headers]:
        """Key, value and headers of an event; the status header lets readers skip parsing."""
        if event.agent is None:
            event.agent = self._agent_id
        headers: Headers = [(STATUS_HEADER, event.status.value.encode())]
        if event.correlation_id:
            headers.append((CORRELATION_HEADER, event.correlation_id.encode()))
        return event.job_id.encode(), event.to_bytes(), headers

    def _produce_event(self, event: StatusEvent, reply: ReplyAddress | None, on_delivery) -> None:
        key, value, headers = self._record(event)
        self._produce(self._topics.results, None, key, value, headers, on_delivery)
        if reply is not None:
            self._send_reply(reply, key, value, headers)

    def _send_reply(self, reply: ReplyAddress, key: bytes, value: bytes, headers: Headers) -> None:
        """The caller's copy is best effort: the results topic holds the answer of record, and a
        caller's missing, full or refused reply topic must never hold up the answer or the commit."""
        try:
            self._produce(reply.topic, reply.partition, key, value, headers, self._log_failed_delivery)
        except (KafkaUnavailable, RecordRefused) as exc:
            log.warning("reply.not_sent", topic=reply.topic, partition=reply.partition, error=str(exc))

    def _produce(self, topic, partition, key, value, headers, on_delivery) -> None:
        """Queue one record; raises only RecordRefused (this record, for good) or KafkaUnavailable."""
        if isinstance(on_delivery, Deliveries):
            on_delivery.expect()
        kwargs = {"partition": partition} if partition is not None else {}
        try:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery, **kwargs)
            except BufferError:
                # The local queue is full (broker away for long): make room, then try once more.
                self._producer.poll(1.0)
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery, **kwargs)
        except BufferError as exc:  # still full: the broker has been away for long
            raise KafkaUnavailable(f"{topic}: the producer's queue is full ({exc})") from None
        except KafkaException as exc:  # refused before it left: too large for this client, say
            error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if error is not None and error.code() in REFUSED_FOR_GOOD:
                raise RecordRefused(f"{topic}: {error}") from None
            raise KafkaUnavailable(f"{topic}: {exc}") from None

    def _await(self, deliveries: Deliveries, what: str) -> None:
        problem = deliveries.wait(self._producer, self._delivery_timeout_s)
        if problem is None:
            return
        if deliveries.error is not None and deliveries.error.code() in REFUSED_FOR_GOOD:
            raise RecordRefused(f"the broker refused {what}: {problem}")
        raise KafkaUnavailable(f"could not durably produce {what}: {problem}")

    @staticmethod
    def _log_failed_delivery(error: KafkaError | None, message: Message) -> None:
        if error is not None:
            log.warning("status.delivery_failed", topic=message.topic(), error=str(error))
