"""The reply policy: which reply addresses a job may name."""

from __future__ import annotations

import pytest

from sdagent.kafka.config import TopicsConfig
from sdagent.kafka.replies import ReplyPolicy

TOPICS = TopicsConfig(reply_topics=["team.replies"])


class Partitions:
    def __init__(self, counts: dict[str, int | None]) -> None:
        self.counts = counts
        self.asked: list[str] = []

    def __call__(self, topic: str) -> int | None:
        self.asked.append(topic)
        return self.counts.get(topic, 0)


@pytest.mark.parametrize("topic", sorted(TOPICS.fleet_topics))
def test_the_fleet_s_own_topics_are_never_a_reply_address(topic):
    policy = ReplyPolicy(TOPICS, Partitions({topic: 16}))
    assert "fleet's own topics" in (policy.refusal(topic, None) or "")


def test_only_the_replies_topic_and_the_allow_list_are_reply_addresses():
    policy = ReplyPolicy(TOPICS, Partitions({TOPICS.replies: 16, "team.replies": 2, "elsewhere": 4}))
    assert policy.refusal(TOPICS.replies, 3) is None
    assert policy.refusal("team.replies", None) is None
    assert "neither the replies topic" in (policy.refusal("elsewhere", 0) or "")


def test_a_partition_or_topic_that_does_not_exist_is_refused_naming_it():
    policy = ReplyPolicy(TOPICS, Partitions({TOPICS.replies: 16}))
    assert (
        policy.refusal(TOPICS.replies, 16) == f"reply_partition 16 does not exist: {TOPICS.replies!r} has 16 partitions"
    )
    assert policy.refusal("team.replies", 0) == "reply topic 'team.replies' does not exist"


def test_a_broker_that_cannot_say_refuses_nothing_and_is_asked_again():
    partitions = Partitions({TOPICS.replies: None})
    policy = ReplyPolicy(TOPICS, partitions)
    assert policy.refusal(TOPICS.replies, 99) is None  # the reply copy is best effort anyway
    policy.refusal(TOPICS.replies, 99)
    assert partitions.asked == [TOPICS.replies, TOPICS.replies]


def test_partition_counts_are_cached_for_their_ttl():
    now = [0.0]
    partitions = Partitions({TOPICS.replies: 4})
    policy = ReplyPolicy(TOPICS, partitions, ttl_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert policy.refusal(TOPICS.replies, 1) is None
    now[0] = 61.0
    policy.refusal(TOPICS.replies, 1)
    assert partitions.asked == [TOPICS.replies, TOPICS.replies]


def test_reply_topics_may_not_name_the_fleet_s_own_topics():
    with pytest.raises(ValueError, match="fleet's own topics"):
        TopicsConfig(reply_topics=["sdagent.jobs"])
