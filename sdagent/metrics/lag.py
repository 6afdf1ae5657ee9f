"""The queue signal: the jobs consumer group's lag, published by exactly one member.

Backlog = for every partition of the jobs topic, high watermark minus the group's committed offset
(minus the low watermark where the group has committed nothing yet: a new group starts at the
oldest job). One member publishes it - whichever holds partition 0, told by the agent's rebalance
callbacks - so the fleet's ``QueueBacklog`` is one series, not one per instance.

Per publish interval, on the publisher thread, each bounded by ``timeout_s``: metadata and
watermarks through the admin client, the committed offsets through a consumer of the group that
never joins it (``Consumer.committed``). Not the admin client's ``list_consumer_group_offsets``:
librdkafka 2.16.1 aborts the process when a broker goes away while that coordinator request is in
flight (``rd_kafka_enq_once_del_source_return: Assertion `eonce->refcnt > 0'`, in
``rd_kafka_admin_coord_response_parse``; bench/broker_restarts.py, docs/upstream/).
"""

from __future__ import annotations

import threading

import structlog
from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec

from sdagent.metrics import names
from sdagent.metrics.datum import Datum
from sdagent.metrics.dimensions import topic as topic_dimensions

log = structlog.get_logger(__name__)


class LagReporter:
    """Computes the jobs topic's backlog for ``group_id``: an injected confluent_kafka AdminClient
    (metadata, watermarks) and a Consumer configured with ``group.id = group_id`` that never
    subscribes (the group's committed offsets)."""

    def __init__(self, admin, committed_reader, topic: str, group_id: str, *, timeout_s: float = 5.0) -> None:
        self._admin = admin
        self._committed_reader = committed_reader
        self._topic = topic
        self._group_id = group_id
        self._timeout_s = timeout_s
        self._holds_partition_zero = threading.Event()
        self._failing = False

    def close(self) -> None:
        """Close the committed-offsets reader (it never joined the group: nothing to leave)."""
        self._committed_reader.close()

    @property
    def topic(self) -> str:
        return self._topic

    def set_holds_partition_zero(self, holds: bool) -> None:
        """Whether this member is assigned partition 0 of the jobs topic; safe from any thread."""
        if holds:
            self._holds_partition_zero.set()
        else:
            self._holds_partition_zero.clear()

    @property
    def holds_partition_zero(self) -> bool:
        return self._holds_partition_zero.is_set()

    def backlog(self) -> int:
        """Jobs produced but not yet committed by the group, over every partition; raises KafkaException."""
        metadata = self._admin.list_topics(topic=self._topic, timeout=self._timeout_s)
        topic = metadata.topics.get(self._topic)
        if topic is None or topic.error is not None:
            raise KafkaException(topic.error if topic is not None else f"no topic {self._topic}")
        partitions = [TopicPartition(self._topic, p) for p in sorted(topic.partitions)]
        if not partitions:
            return 0
        committed = self._committed(partitions)
        high = self._offsets(partitions, OffsetSpec.latest())
        low = self._offsets(partitions, OffsetSpec.earliest())
        backlog = 0
        for partition in partitions:
            p = partition.partition
            start = committed.get(p, -1)
            if start < 0 or start < low[p]:  # nothing committed, or the committed jobs expired
                start = low[p]
            backlog += max(0, high[p] - start)
        return backlog

    def collect(self, timestamp: float) -> list[Datum]:
        """``QueueBacklog`` while this member holds partition 0; nothing otherwise or on failure."""
        if not self._holds_partition_zero.is_set():
            return []
        try:
            backlog = self.backlog()
        except (KafkaException, TimeoutError, OSError) as exc:
            if not self._failing:
                log.warning("metrics.backlog_failed", topic=self._topic, error=str(exc))
            self._failing = True
            return []
        if self._failing:
            log.info("metrics.backlog_recovered", topic=self._topic)
            self._failing = False
        return [Datum(names.QUEUE_BACKLOG, topic_dimensions(self._topic), timestamp, "Count", value=backlog)]

    def _committed(self, partitions: list[TopicPartition]) -> dict[int, int]:
        committed = self._committed_reader.committed(partitions, timeout=self._timeout_s)
        return {tp.partition: tp.offset for tp in committed if tp.error is None}

    def _offsets(self, partitions: list[TopicPartition], spec: OffsetSpec) -> dict[int, int]:
        futures = self._admin.list_offsets({tp: spec for tp in partitions}, request_timeout=self._timeout_s)
        return {tp.partition: future.result(timeout=self._timeout_s).offset for tp, future in futures.items()}
