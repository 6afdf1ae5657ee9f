"""The share group's own configuration (KIP-932), set with the admin API.

A share group starts reading at the log's end unless told otherwise (``share.auto.offset.reset``
defaults to ``latest``): jobs queued before its first member joined would never run. So the reset,
the lock and the delivery limit are set before any member joins, by ``sdagent topics create`` and
again by every agent at start (a no-op when they are set; a warning when the agent may not).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from sdagent.kafka.config import ShareGroupConfig, TopicsConfig

log = structlog.get_logger(__name__)


PRIORITY_LANE = "priority"


@dataclass(frozen=True)
class LaneSpec:
    """A topic an agent takes jobs from, and its share group (one group per topic: a share
    group's assignor gives each member one partition of its subscription once members outnumber
    partitions, so a member of a group on several topics would read one of them only)."""

    name: str
    topic: str
    group: str


def lane_specs(kafka_group: str, topics: TopicsConfig) -> list[LaneSpec]:
    """The lanes every agent reads, the one taken from first first."""
    return [
        LaneSpec(PRIORITY_LANE, topics.priority_jobs, f"{kafka_group}.{PRIORITY_LANE}"),
        LaneSpec("jobs", topics.jobs, kafka_group),
    ]


def model_lane_specs(kafka_group: str, topics: TopicsConfig) -> list[LaneSpec]:
    """The model topics' lanes, read by the agents holding one of their models."""
    return [
        LaneSpec(f"model-{k}", topic, f"{kafka_group}.model-{k}") for k, topic in enumerate(topics.model_topic_names)
    ]


def share_group_settings(share: ShareGroupConfig) -> dict[str, str]:
    return {
        "share.auto.offset.reset": "earliest",
        "share.record.lock.duration.ms": str(int(share.lock_duration_s * 1000)),
        "share.delivery.count.limit": str(share.delivery_limit),
    }


def configure_share_group(admin: AdminClient, group: str, share: ShareGroupConfig, timeout_s: float = 10.0) -> None:
    """Set the group's reset, lock and delivery limit. Raises KafkaException (the broker refused:
    no share groups, a lock outside the broker's bounds, not authorised)."""
    entries = [
        ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
        for name, value in share_group_settings(share).items()
    ]
    resource = ConfigResource(ResourceType.GROUP, group, incremental_configs=entries)
    for future in admin.incremental_alter_configs([resource], request_timeout=timeout_s).values():
        future.result(timeout=timeout_s)
    log.info("share_group.configured", group=group, **share_group_settings(share))


def configure_lane_groups(
    admin: AdminClient, kafka_group: str, share: ShareGroupConfig, topics: TopicsConfig
) -> list[str]:
    """:func:`configure_share_group` for every lane's group of ``kafka_group``; returns their
    names. Raises KafkaException."""
    groups = [lane.group for lane in lane_specs(kafka_group, topics) + model_lane_specs(kafka_group, topics)]
    for group in groups:
        configure_share_group(admin, group, share)
    return groups


def ensure_share_groups(admin: AdminClient, groups: list[str], share: ShareGroupConfig) -> None:
    """:func:`configure_share_group` for each group at an agent's start: a refusal is logged, not
    raised, since ``sdagent topics create`` may have set them with rights the agent lacks."""
    for group in groups:
        try:
            configure_share_group(admin, group, share)
        except KafkaException as exc:
            log.warning("share_group.not_configured", group=group, error=str(exc),
                        hint="run `sdagent topics create` with rights to alter the group's configs")  # fmt: skip
