"""The ``[kafka]`` and ``[topics]`` sections: how to reach the cluster, the topics and their layout."""

from __future__ import annotations

import zlib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from sdagent.jobs import TOPIC_PATTERN


class ShareGroupConfig(BaseModel):
    """The share group's settings (KIP-932), set by ``sdagent topics create`` and checked at start."""

    model_config = ConfigDict(extra="forbid")

    # How long a job is the agent's before the broker hands it to another: longer than the
    # longest job of the topics read, within the broker's group.share.min/max.record.lock.duration.ms
    # (15 s..60 s by default; the max can be raised to 1 h).
    lock_duration_s: float = Field(60.0, ge=1, le=3600)
    # Deliveries before the broker archives a record silently (share.delivery.count.limit,
    # 2..10): the agent dead-letters a record on its last delivery instead.
    delivery_limit: int = Field(10, ge=2, le=10)


class KafkaConfig(BaseModel):
    """How to reach the cluster and how the fleet shares the jobs topic."""

    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = Field("sdagent", min_length=1)
    # "consumer" is KIP-848 (Kafka >= 4.0 brokers): incremental, broker-side assignment, so a scale
    # event moves only the partitions that must move. "classic" falls back to cooperative-sticky.
    group_protocol: Literal["consumer", "classic"] = "consumer"
    # "share": one share group (KIP-932, Kafka >= 4.2), any idle agent takes the next job.
    # "partition": a consumer group, each agent runs its own partitions' jobs in order (brokers
    # without share groups, e.g. Amazon MSK up to 4.0). docs/share-groups.md compares them.
    consumption: Literal["share", "partition"] = "partition"
    share: ShareGroupConfig = Field(default_factory=ShareGroupConfig)
    # Static membership keeps a vanished instance's partitions idle until its session times out:
    # good for in-place restarts, bad for spot instances that vanish; off by default (docs/kafka.md).
    static_membership: bool = False
    # Extra librdkafka settings for every client (security.protocol, sasl.*, ssl.*, client.rack).
    client_config: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # MSK IAM access control: the cluster's region. Every client then signs in over SASL_SSL with
    # OAUTHBEARER tokens signed by the instance role's credentials (docs/kafka.md).
    msk_iam_region: str | None = Field(None, pattern=r"^[a-z]{2}(-[a-z]+)+-\d+$")


class TopicsConfig(BaseModel):
    """Topic names and the layout ``sdagent topics create`` gives them."""

    model_config = ConfigDict(extra="forbid")

    jobs: str = Field("sdagent.jobs", pattern=TOPIC_PATTERN)
    # The priority lane: jobs with priority > 0 go here, and agents take from it first (with a
    # bound on how many lane jobs pass a waiting job of the jobs topic). docs/delivery.md#priority.
    # Default: the jobs topic's name + ".priority", so renaming one renames both.
    priority_jobs: str = Field("", pattern=f"^$|{TOPIC_PATTERN}")
    results: str = Field("sdagent.results", pattern=TOPIC_PATTERN)
    dead_letters: str = Field("sdagent.dead-letters", pattern=TOPIC_PATTERN)
    control: str = Field("sdagent.control", pattern=TOPIC_PATTERN)
    replies: str = Field("sdagent.replies", pattern=TOPIC_PATTERN)
    # Compacted: one record per agent with the models it holds (docs/model-affinity.md).
    agents: str = Field("sdagent.agents", pattern=TOPIC_PATTERN)
    # Topics a job may name as reply_to besides `replies` (callers with reply topics of their own).
    # The fleet's own topics are never allowed: an agent would write answers into them.
    reply_topics: list[Annotated[str, StringConstraints(pattern=TOPIC_PATTERN)]] = Field(default_factory=list)
    # How jobs are keyed (docs/model-affinity.md): "job_id" spreads them evenly whatever the
    # model; "model" sends a model's jobs to at most model_lanes partitions (fewer switches, but a
    # fleet serving few models then keeps only that many agents busy: opt in with lanes sized).
    jobs_key: Literal["model", "job_id"] = "job_id"
    # Where submitters (client, gateway) send a job in partition-bound consumption: "key" lets
    # the job's key pick the partition; "least_loaded" sends it to a partition of the less loaded
    # of two agents drawn at random, from the agents' beacons (docs/delivery.md#routing). Needs
    # read access to the agents topic; ignored in a share group.
    jobs_routing: Literal["key", "least_loaded"] = "key"
    # Agents drawn per job with least_loaded: 2 keeps many submitters from all picking the same
    # agent between its beacons; 0 compares every agent (best for one or a few submitters).
    routing_choices: int = Field(2, ge=0, le=1024)
    # Share groups only: model topics (`<jobs>.model-<k>`, k from the model's CRC32), each read
    # only by the agents holding one of its models. A submitter with jobs_key = "model" sends a
    # job there when an agent holding its model is idle (from the beacons), else to the jobs
    # topic; 0 turns model topics off (docs/share-groups.md#model-affinity-in-share-mode).
    model_topics: int = Field(0, ge=0, le=64)
    # Keys per model when keyed by model: a hot model fills up to this many partitions.
    model_lanes: int = Field(2, ge=1, le=1024)
    # One job runs per partition holder at a time: partitions >= the fleet's maximum size.
    jobs_partitions: int = Field(64, ge=1, le=10_000)
    results_partitions: int = Field(16, ge=1, le=10_000)
    replies_partitions: int = Field(16, ge=1, le=10_000)
    replication_factor: int = Field(3, ge=1, le=16)
    jobs_retention_h: float = Field(72, gt=0)
    results_retention_h: float = Field(72, gt=0)
    dead_letters_retention_h: float = Field(14 * 24, gt=0)
    replies_retention_h: float = Field(1, gt=0)

    @property
    def fleet_topics(self) -> frozenset[str]:
        """The topics the fleet itself reads or writes (never a caller's reply address)."""
        own = {self.jobs, self.priority_jobs, self.results, self.dead_letters, self.control, self.agents}
        return frozenset(own | set(self.model_topic_names))

    @property
    def model_topic_names(self) -> list[str]:
        return [f"{self.jobs}.model-{k}" for k in range(self.model_topics)]

    def model_topic(self, model: str) -> str | None:
        """The model topic ``model``'s jobs may go to; None with model topics off."""
        if not self.model_topics:
            return None
        return f"{self.jobs}.model-{zlib.crc32(model.encode()) % self.model_topics}"

    @model_validator(mode="after")
    def _priority_lane_named(self) -> TopicsConfig:
        if not self.priority_jobs:
            if len(self.jobs) > 240:
                raise ValueError("jobs is too long to name the priority lane after it: set priority_jobs")
            self.priority_jobs = f"{self.jobs}.priority"
        return self

    @model_validator(mode="after")
    def _model_topics_keyed_by_model(self) -> TopicsConfig:
        if self.model_topics and self.jobs_key != "model":
            raise ValueError("model_topics needs jobs_key = model (they hold the jobs of models agents have loaded)")
        if self.model_topics and len(self.jobs) > 240:
            raise ValueError("jobs is too long to name the model topics after it")
        return self

    @model_validator(mode="after")
    def _one_placement(self) -> TopicsConfig:
        if self.jobs_routing == "least_loaded" and self.jobs_key == "model":
            raise ValueError(
                "jobs_routing = least_loaded places jobs by load and jobs_key = model places them by model: choose one"
            )
        return self

    @model_validator(mode="after")
    def _distinct_names(self) -> TopicsConfig:
        names = [self.jobs, self.priority_jobs, self.results, self.dead_letters, self.control, self.replies,
                 self.agents]  # fmt: skip
        if len(set(names)) != len(names):
            raise ValueError("topic names must all differ")
        if own := sorted(self.fleet_topics & set(self.reply_topics)):
            raise ValueError(f"reply_topics may not name the fleet's own topics: {', '.join(own)}")
        return self
