"""Where a submitter (Client, gateway) sends a job, from the agents' beacons.

Partition mode, ``[topics] jobs_routing = "least_loaded"``: each agent runs its own partitions'
jobs in order, so a job keyed to a busy agent's partition waits while other GPUs idle
(docs/share-groups.md measures it). The submitter reads the beacons (the compacted agents topic:
each agent's partitions, jobs held and time until free, sent at least every second) and per job
draws ``routing_choices`` agents (2: power of two choices, so that many submitters do not all
crowd the same agent between beacons; 0: all) and sends the job to a partition of the one free
soonest. Jobs this submitter sent an agent since its last beacon count towards its load.

Share mode, ``[topics] model_topics``: a job goes to its model's topic while an agent reading it
will be free soon (``ModelTopicPlacement``). With no fresh beacon (a new fleet, the agents topic
unreadable, every agent held) a job goes where keying puts it: placement only ever improves on
plain keying. The priority lane is always keyed (agents take from it first anyway), and
``least_loaded`` with ``jobs_key = "model"`` is refused by the settings.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from sdagent.jobs import Job
from sdagent.kafka.agents import AgentRecord
from sdagent.kafka.clients import reader_config
from sdagent.kafka.config import KafkaConfig, TopicsConfig
from sdagent.kafka.records import jobs_topic_of

log = structlog.get_logger(__name__)

# A beacon older than this is not trusted: the agent may be gone or its partitions moved. A few
# of the beacon's 1 s interval, so one late record does not drop a live agent.
STALE_AFTER_S = 3.0
POLL_S = 0.1
METADATA_TIMEOUT_S = 5.0
METADATA_REFRESH_S = 30.0  # the jobs topic's partition count: it only grows, and rarely
KEYED = -1  # librdkafka's "no partition given": its partitioner hashes the key
UNKNOWN_JOB_S = 1.0  # what a job sent to an agent that has run none yet is taken to cost
DEMAND_HALF_LIFE_S = 60.0  # how fast a model's recent demand is forgotten


class Placement(Protocol):
    """Where a submitter sends a job: its topic, and a partition of it or KEYED."""

    def place(self, job: Job) -> tuple[str, int]: ...
    def close(self) -> None: ...


class KeyedPlacement:
    """Every job on its lane (the priority lane or the jobs topic), keyed: the default."""

    def __init__(self, topics: TopicsConfig) -> None:
        self._topics = topics

    def place(self, job: Job) -> tuple[str, int]:
        return jobs_topic_of(job, self._topics), KEYED

    def close(self) -> None:
        pass


@dataclass
class _Agent:
    record: AgentRecord
    sent_since: int = 0  # jobs this submitter sent it since the record

    def free_in_s(self, now: datetime) -> float:
        """About how long until it could start another job: its backlog as of its beacon, less
        the time since, plus each job sent it since at its mean run time."""
        record = self.record
        free_at_s = record.backlog_s + self.sent_since * (record.mean_job_s or UNKNOWN_JOB_S)
        return max(0.0, free_at_s - (now - record.at).total_seconds())

    def load(self, now: datetime) -> tuple[float, int]:
        """Time until free, then jobs held (an agent that has run nothing yet has no mean)."""
        return self.free_in_s(now), self.record.queued + self.sent_since


class AgentLoads:
    """The latest beacon of every agent, and the two-choice pick among the fresh ones. Thread-safe:
    the reader thread adds records, submitters pick."""

    def __init__(
        self,
        *,
        choices: int = 2,
        stale_after_s: float = STALE_AFTER_S,
        rng: random.Random | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._choices = choices  # agents drawn per pick; 0: all of them
        self._stale_after_s = stale_after_s
        self._rng = rng or random.Random()
        self._now = now
        self._lock = threading.Lock()
        self._agents: dict[str, _Agent] = {}
        self._partition_count = 0  # of the jobs topic; 0 until known: nothing is routed

    def set_partition_count(self, count: int) -> None:
        with self._lock:
            self._partition_count = count

    def update(self, key: str, record: AgentRecord | None) -> None:
        """The agents topic's record for ``key``; None is a tombstone (the agent left)."""
        with self._lock:
            if record is None:
                self._agents.pop(key, None)
            else:
                self._agents[key] = _Agent(record)

    def pick(self) -> int:
        """A partition of the less loaded of two fresh agents drawn at random, or KEYED."""
        with self._lock:
            candidates = [agent for agent in self._agents.values() if self._fresh(agent) and self._in_topic(agent)]
            if not candidates:
                return KEYED
            if 0 < self._choices < len(candidates):
                candidates = self._rng.sample(candidates, self._choices)
            self._rng.shuffle(candidates)  # ties: any of them, not always the first
            now = self._now()
            chosen = min(candidates, key=lambda agent: agent.load(now))
            chosen.sent_since += 1
            partitions = [p for p in chosen.record.jobs_partitions if p < self._partition_count]
            return self._rng.choice(partitions)

    def holders(self, model: str) -> list[str]:
        """The fresh, accepting agents reading ``model``'s topic, busy or not."""
        with self._lock:
            return sorted(
                key for key, agent in self._agents.items() if self._fresh(agent) and agent.record.hot_model == model
            )

    def take_idle_holder(self, model: str) -> bool:
        """Whether a fresh agent reading ``model``'s topic will be free sooner than a switch
        elsewhere would take (its own mean switch time, or one job's time if longer): waiting
        that long for it costs the job no more than a switch would, and saves the switch's GPU
        time. Counts the jobs sent it since its beacon; if so the soonest free one counts this."""
        with self._lock:
            now = self._now()
            soon = [
                agent
                for agent in self._agents.values()
                if self._fresh(agent)
                and agent.record.hot_model == model
                and agent.free_in_s(now) < max(agent.record.mean_job_s, agent.record.mean_switch_s)
            ]
            if not soon:
                return False
            self._rng.shuffle(soon)
            min(soon, key=lambda agent: agent.free_in_s(now)).sent_since += 1
            return True

    def take_free_switcher(self, demand: Callable[[str], float]) -> str | None:
        """The hot model of the free agent (free now, by its beacon and the jobs sent it since)
        whose model ``demand`` rates lowest, counting this job; None when none is free."""
        with self._lock:
            now = self._now()
            free = [
                agent
                for agent in self._agents.values()
                if self._fresh(agent) and agent.record.hot_model and agent.free_in_s(now) == 0
            ]
            if not free:
                return None
            self._rng.shuffle(free)
            chosen = min(free, key=lambda agent: demand(agent.record.hot_model or ""))
            chosen.sent_since += 1
            return chosen.record.hot_model

    def _fresh(self, agent: _Agent) -> bool:
        record = agent.record
        age_s = (self._now() - record.at).total_seconds()
        return record.accepting and -self._stale_after_s <= age_s <= self._stale_after_s

    def _in_topic(self, agent: _Agent) -> bool:
        return any(p < self._partition_count for p in agent.record.jobs_partitions)


class ModelDemand:
    """Jobs per model this submitter has seen lately: counts that decay with ``DEMAND_HALF_LIFE_S``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._counts: dict[str, tuple[float, float]] = {}  # model -> (count, as of)

    def seen(self, model: str) -> None:
        self._counts[model] = (self.rate(model) + 1, self._clock())

    def rate(self, model: str) -> float:
        count, at = self._counts.get(model, (0.0, self._clock()))
        return count * 0.5 ** ((self._clock() - at) / DEMAND_HALF_LIFE_S)


class BeaconReader:
    """Reads the agents topic into :class:`AgentLoads` on a thread of its own."""

    def __init__(self, kafka: KafkaConfig, topics: TopicsConfig, loads: AgentLoads | None = None) -> None:
        self._topics = topics
        self._loads = loads or AgentLoads(choices=topics.routing_choices)
        self._consumer = Consumer(reader_config(kafka, "router"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdagent-router", daemon=True)
        self._thread.start()

    @property
    def loads(self) -> AgentLoads:
        return self._loads

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._consumer.close()

    def _run(self) -> None:
        assigned = False
        metadata_at = float("-inf")
        while not self._stop.is_set():
            try:
                if time.monotonic() >= metadata_at + METADATA_REFRESH_S:
                    self._loads.set_partition_count(self._partition_count(self._topics.jobs))
                    metadata_at = time.monotonic()
                if not assigned:
                    self._assign_agents_topic()
                    assigned = True
                self._read()
            except (KafkaException, LookupError) as exc:  # routing is advisory: keyed meanwhile
                log.warning("router.agents_unreadable", topic=self._topics.agents, error=str(exc))
                self._stop.wait(METADATA_REFRESH_S / 10)

    def _read(self) -> None:
        message = self._consumer.poll(POLL_S)
        if message is None or message.error() is not None:
            return
        key = (message.key() or b"").decode(errors="replace")
        value = message.value()
        if value is None:
            self._loads.update(key, None)
            return
        try:
            self._loads.update(key, AgentRecord.from_bytes(value))
        except ValueError as exc:  # someone else's record: skipped, never routed to
            log.warning("router.bad_agent_record", key=key, offset=message.offset(), error=str(exc))

    def _partition_count(self, topic: str) -> int:
        return len(self._partitions_of(topic))

    def _assign_agents_topic(self) -> None:
        topic = self._topics.agents
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in self._partitions_of(topic)])

    def _partitions_of(self, topic: str) -> list[int]:
        metadata = self._consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            raise LookupError(f"topic {topic} not found: {found.error if found else 'no metadata'}")
        return sorted(found.partitions)


class LeastLoadedPlacement:
    """Partition mode, ``jobs_routing = "least_loaded"``: a jobs-topic job goes to a partition of
    the agent free soonest of ``routing_choices`` drawn (the priority lane is taken first by
    every agent: keyed)."""

    def __init__(self, beacons: BeaconReader, topics: TopicsConfig) -> None:
        self._beacons = beacons
        self._topics = topics

    def place(self, job: Job) -> tuple[str, int]:
        topic = jobs_topic_of(job, self._topics)
        return topic, self._beacons.loads.pick() if topic == self._topics.jobs else KEYED

    def close(self) -> None:
        self._beacons.close()


class ModelTopicPlacement:
    """Share mode with model topics. A jobs-topic job goes to its model's topic when an agent
    reading it will be free sooner than a switch would take (no switch at all); else, to the
    topic of the free agent whose model this submitter has seen least in demand lately, so that
    the agent that switches is the one whose model is missed least (not whichever polls first,
    which may hold the most popular model); else to the jobs topic."""

    def __init__(
        self, beacons: BeaconReader, topics: TopicsConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._beacons = beacons
        self._topics = topics
        self._demand = ModelDemand(clock)

    def place(self, job: Job) -> tuple[str, int]:
        topic = jobs_topic_of(job, self._topics)
        if topic != self._topics.jobs or not self._topics.model_topics:
            return topic, KEYED
        self._demand.seen(job.model)
        loads = self._beacons.loads
        if loads.take_idle_holder(job.model):
            return self._topics.model_topic(job.model) or topic, KEYED
        evicted = loads.take_free_switcher(self._demand.rate)
        if evicted is not None:
            return self._topics.model_topic(evicted) or topic, KEYED
        return topic, KEYED

    def close(self) -> None:
        self._beacons.close()


def placement_for(kafka: KafkaConfig, topics: TopicsConfig) -> Placement:
    """The submitter's placement: by load or to model topics where configured, keyed otherwise."""
    if kafka.consumption == "share" and topics.model_topics:
        return ModelTopicPlacement(BeaconReader(kafka, topics), topics)
    if kafka.consumption == "partition" and topics.jobs_routing == "least_loaded":
        return LeastLoadedPlacement(BeaconReader(kafka, topics), topics)
    return KeyedPlacement(topics)
