"""The record format every producer and consumer of the fleet shares: header names, record keys,
and the types that say where a record came from and where its answers go.

Nothing here depends on the agent, the gateway or the client: each of them imports this module to
learn a header name, never another part of the program.
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from confluent_kafka import Message

from sdagent.jobs import Job

Headers = list[tuple[str, str | bytes | None]]
# What confluent-kafka's Message.headers() may return: a list of pairs (librdkafka's order) or None.
HeadersLike = Sequence[tuple[str, str | bytes | None]] | Mapping[str, str | bytes | None] | None

STATUS_HEADER = "sdagent-status"  # a status event's status: readers skip parsing what they ignore
CORRELATION_HEADER = "correlation_id"  # echoed on replies so a sync caller matches its answer
MODEL_HEADER = "sdagent-model"  # lets an agent see a job's model without parsing the JSON
REQUEUED_BY_HEADER = "sdagent-requeued-by"

# Dead letters: why, and where the record came from.
REASON_HEADER = "sdagent-reason"
ERROR_HEADER = "sdagent-error"
SOURCE_TOPIC_HEADER = "sdagent-source-topic"
SOURCE_PARTITION_HEADER = "sdagent-source-partition"
SOURCE_OFFSET_HEADER = "sdagent-source-offset"
AGENT_HEADER = "sdagent-agent"
JOB_ID_HEADER = "sdagent-job-id"
EXCEPTION_HEADER = "sdagent-exception"  # the exception class, when the agent itself raised
ATTEMPTS_HEADER = "sdagent-attempts"  # how many times the record was tried before it was given up
ERROR_HEADER_MAX_BYTES = 4096


class KeyLayout(Protocol):
    """Where jobs go and how they are keyed (``TopicsConfig`` has these fields)."""

    @property
    def jobs(self) -> str: ...

    @property
    def priority_jobs(self) -> str: ...

    @property
    def jobs_key(self) -> str: ...

    @property
    def model_lanes(self) -> int: ...


def jobs_topic_of(job: Job, layout: KeyLayout) -> str:
    """The lane ``job`` is queued on: the priority lane for a priority above 0."""
    return layout.priority_jobs if job.priority > 0 else layout.jobs


def job_key(job: Job, layout: KeyLayout) -> bytes:
    """The Kafka key of ``job`` on the jobs topic (the default partitioner hashes it).

    ``jobs_key = "model"``: the model, spread over ``model_lanes`` keys by the job id, so that one
    hot model fills a few partitions (and agents) rather than one; ``"job_id"``: jobs spread evenly
    whatever their model.
    """
    if layout.jobs_key == "job_id":
        return job.job_id.encode()
    if layout.model_lanes == 1:
        return job.model.encode()
    lane = zlib.crc32(job.job_id.encode()) % layout.model_lanes
    return f"{job.model}#{lane}".encode()


def job_headers(job: Job) -> Headers:
    return [(MODEL_HEADER, job.model.encode())]


def header(headers: HeadersLike, name: str) -> str | None:
    """The first value of header ``name``, decoded; None when absent."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    for key, value in pairs:
        if key == name and value is not None:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def position(message: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a record the broker delivered. librdkafka leaves them unset
    only on error events, which every reader skips before it asks."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"not a delivered record: {message.error()}")
    return topic, partition, offset


def model_of(headers: HeadersLike) -> str | None:
    """The model a jobs-topic record says it needs, from its header; None if it has none."""
    return header(headers, MODEL_HEADER)


@dataclass(frozen=True)
class ReplyAddress:
    """Where a sync caller waits: its reply topic (and partition) and its correlation id."""

    topic: str
    partition: int | None = None
    correlation_id: str | None = None


@dataclass(frozen=True)
class SourceRecord:
    """Where a record came from (a dead letter names it)."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Delivery:
    """One record from the jobs topic, as the runner needs it."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    timestamp_ms: int | None
    possibly_redelivered: bool = False  # the first record of a partition after it was assigned
    model: str | None = None  # from the record's header, for model affinity; None when absent

    @property
    def record_id(self) -> str:
        """A stable id for this record: the same on every redelivery."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"kafka:{self.topic}/{self.partition}/{self.offset}"))

    @property
    def source(self) -> SourceRecord:
        return SourceRecord(self.topic, self.partition, self.offset)

    @property
    def received_at(self) -> datetime:
        seconds = self.timestamp_ms / 1000 if self.timestamp_ms else time.time()
        return datetime.fromtimestamp(seconds, UTC)
