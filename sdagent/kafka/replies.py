"""Where a job may have its answers copied: the replies topic or one allow-listed in
``topics.reply_topics``, never one of the fleet's own topics, and only a partition that exists.
Refused on intake with the reason, so a bad address never reaches the answer path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog
from confluent_kafka import KafkaException, Producer

from sdagent.kafka.config import TopicsConfig

log = structlog.get_logger(__name__)

PARTITIONS_TTL_S = 60.0  # a reply topic's partition count is looked up again after this long
METADATA_TIMEOUT_S = 5.0

PartitionCount = Callable[[str], int | None]
"""How many partitions a topic has; 0 when it does not exist, None when the broker cannot say."""


class ReplyPolicy:
    """Decides whether a job's ``reply_to`` / ``reply_partition`` may be written to."""

    def __init__(
        self,
        topics: TopicsConfig,
        partitions_of: PartitionCount,
        *,
        ttl_s: float = PARTITIONS_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fleet = topics.fleet_topics
        self._allowed = frozenset({topics.replies, *topics.reply_topics})
        self._replies = topics.replies
        self._partitions_of = partitions_of
        self._ttl_s = ttl_s
        self._clock = clock
        self._known: dict[str, tuple[int, float]] = {}  # topic -> (partitions, looked up at)
        self._lock = threading.Lock()

    def refusal(self, topic: str, partition: int | None) -> str | None:
        """Why the address is refused, or None when answers may go there."""
        if topic in self._fleet:
            return f"reply_to {topic!r} is one of the fleet's own topics"
        if topic not in self._allowed:
            return f"reply_to {topic!r} is neither the replies topic {self._replies!r} nor in topics.reply_topics"
        count = self._partitions(topic)
        if count == 0:
            return f"reply topic {topic!r} does not exist"
        if partition is not None and count is not None and partition >= count:
            return f"reply_partition {partition} does not exist: {topic!r} has {count} partitions"
        return None

    def _partitions(self, topic: str) -> int | None:
        now = self._clock()
        with self._lock:
            known = self._known.get(topic)
        if known is not None and now - known[1] < self._ttl_s:
            return known[0]
        count = self._partitions_of(topic)
        if count is not None:  # the broker could not say: ask again next time, do not refuse
            with self._lock:
                self._known[topic] = (count, now)
        return count


def partitions_from(producer: Producer) -> PartitionCount:
    """A topic's partition count from the producer's own metadata (no extra client)."""

    def count(topic: str) -> int | None:
        try:
            metadata = producer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
        except KafkaException as exc:
            log.warning("replies.metadata_unavailable", topic=topic, error=str(exc))
            return None
        described = metadata.topics.get(topic)
        if described is None or described.error is not None:
            return 0
        return len(described.partitions)

    return count
