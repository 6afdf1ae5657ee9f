"""A lane: one topic a share-group agent takes jobs from, with the share group it reads it in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog
from confluent_kafka import KafkaException, ShareConsumer

log = structlog.get_logger(__name__)


@dataclass
class Lane:
    """One share group the agent takes jobs from: its topic and how to make its consumer.

    Lanes are separate groups, not one group on several topics: a share group's assignor gives
    each member one partition of the subscription (by hash) once members outnumber partitions,
    so a member of a two-topic group would read one topic only."""

    name: str
    topic: str
    new_consumer: Callable[[], ShareConsumer]
    consumer: ShareConsumer | None = None  # None while out of the group (held, or closed)

    def join(self) -> ShareConsumer:
        self.consumer = self.new_consumer()
        self.consumer.subscribe([self.topic])
        log.info("intake.subscribed", topic=self.topic, lane=self.name, mode="share")
        return self.consumer

    def leave(self) -> None:
        consumer, self.consumer = self.consumer, None
        if consumer is None:
            return
        try:
            consumer.close()
        except KafkaException as exc:  # the broker is away: the locks expire and the jobs go on
            log.warning("intake.close_failed", lane=self.name, error=str(exc))
