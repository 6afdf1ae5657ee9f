"""Creates the agent's topics with their partition counts and retention (``sdagent topics create``)."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from sdagent.config import TopicsConfig

log = structlog.get_logger(__name__)

_HOUR_MS = 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def topic_specs(topics: TopicsConfig, replication_factor: int | None = None) -> list[TopicSpec]:
    """What each topic needs: partitions from the fleet's size, retention from how long it is read."""
    min_isr = str(max(1, min(2, (replication_factor or topics.replication_factor) - 1)))

    def retained(hours: float, **extra: str) -> dict[str, str]:
        return {"retention.ms": str(int(hours * _HOUR_MS)), "min.insync.replicas": min_isr, **extra}

    return [
        TopicSpec(topics.jobs, topics.jobs_partitions, retained(topics.jobs_retention_h)),
        TopicSpec(topics.results, topics.results_partitions, retained(topics.results_retention_h)),
        TopicSpec(topics.dead_letters, 1, retained(topics.dead_letters_retention_h)),
        # Every agent reads the whole control topic: one partition keeps that cheap.
        TopicSpec(topics.control, 1, retained(topics.results_retention_h)),
        TopicSpec(topics.replies, topics.replies_partitions, retained(topics.replies_retention_h)),
    ]


def create_topics(
    admin: AdminClient, topics: TopicsConfig, replication_factor: int | None = None, timeout_s: float = 30.0
) -> dict[str, str]:
    """Create the missing topics; returns ``{name: "created" | "exists"}``. Raises KafkaException."""
    factor = replication_factor or topics.replication_factor
    specs = topic_specs(topics, factor)
    futures = admin.create_topics(
        [NewTopic(s.name, num_partitions=s.partitions, replication_factor=factor, config=s.config) for s in specs],
        request_timeout=timeout_s,
    )
    outcome = {}
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            outcome[name] = "created"
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
            outcome[name] = "exists"
        log.info("topic.ensured", topic=name, outcome=outcome[name])
    return outcome
