"""Creates the agent's topics with their partition counts and retention (``sdagent topics create``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from sdagent.kafka.config import TopicsConfig

log = structlog.get_logger(__name__)

_HOUR_MS = 3600 * 1000
LEADER_POLL_S = 0.1
# A share group's members split a topic's partitions among them (each partition to at least one
# member, each member to at least one partition, by hash): with fewer agents than partitions each
# agent would read partitions no other agent reads, the head-of-line waits share groups remove.
# One partition is read by every member; it carries 100 jobs/s with room to spare.
SHARE_JOBS_PARTITIONS = 1


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def topic_specs(topics: TopicsConfig, replication_factor: int | None = None, *, share: bool = False) -> list[TopicSpec]:
    """What each topic needs: partitions from the fleet's size, retention from how long it is read.
    ``share``: the jobs topic is read by a share group (one partition unless configured)."""
    jobs_partitions = topics.jobs_partitions
    if share and "jobs_partitions" not in topics.model_fields_set:
        jobs_partitions = SHARE_JOBS_PARTITIONS
    min_isr = str(max(1, min(2, (replication_factor or topics.replication_factor) - 1)))

    def retained(hours: float, **extra: str) -> dict[str, str]:
        return {"retention.ms": str(int(hours * _HOUR_MS)), "min.insync.replicas": min_isr, **extra}

    return [
        TopicSpec(topics.jobs, jobs_partitions, retained(topics.jobs_retention_h)),
        TopicSpec(topics.priority_jobs, jobs_partitions, retained(topics.jobs_retention_h)),
        # Model topics (share groups only): one partition each, read by every holder of a model.
        *(
            TopicSpec(name, SHARE_JOBS_PARTITIONS, retained(topics.jobs_retention_h))
            for name in topics.model_topic_names
        ),
        TopicSpec(topics.results, topics.results_partitions, retained(topics.results_retention_h)),
        TopicSpec(topics.dead_letters, 1, retained(topics.dead_letters_retention_h)),
        # Every agent reads the whole control topic: one partition keeps that cheap.
        TopicSpec(topics.control, 1, retained(topics.results_retention_h)),
        TopicSpec(topics.replies, topics.replies_partitions, retained(topics.replies_retention_h)),
        # The latest record per agent is what counts; compaction keeps just that.
        TopicSpec(
            topics.agents,
            1,
            {
                "cleanup.policy": "compact",
                "min.insync.replicas": min_isr,
                "min.compaction.lag.ms": "0",
                "segment.ms": str(_HOUR_MS),
            },
        ),  # fmt: skip
    ]


def create_topics(
    admin: AdminClient,
    topics: TopicsConfig,
    replication_factor: int | None = None,
    timeout_s: float = 30.0,
    *,
    share: bool = False,
) -> dict[str, str]:
    """Create the missing topics; returns ``{name: "created" | "exists"}``. Raises KafkaException."""
    factor = replication_factor or topics.replication_factor
    specs = topic_specs(topics, factor, share=share)
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
    _wait_for_leaders(admin, [spec.name for spec in specs], timeout_s)
    return outcome


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout_s: float) -> None:
    """Return once every partition has a leader: a new topic answers NOT_LEADER for a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        metadata = admin.list_topics(timeout=timeout_s)
        leaderless = [
            name
            for name in names
            if name not in metadata.topics
            or metadata.topics[name].error is not None
            or any(p.leader < 0 for p in metadata.topics[name].partitions.values())
        ]
        if not leaderless:
            return
        if time.monotonic() >= deadline:
            raise KafkaException(f"topics without leaders after {timeout_s} s: {', '.join(leaderless)}")
        time.sleep(LEADER_POLL_S)
