"""The agent's beacon: what it holds (models, partitions, jobs), on the compacted agents topic.

Load-aware submitters (``sdagent.kafka.routing``) send a job to a lightly loaded agent's partition
from these records, so they must be fresh: a record goes out when the agent's state changes (at
most every ``MIN_GAP_S`` for a change of its job count alone) and every ``interval_s`` even
when nothing changed, so a reader can tell a quiet agent from a vanished one. A tombstone when it
leaves. See docs/model-affinity.md and docs/delivery.md#routing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from confluent_kafka import KafkaException, Producer

from sdagent.agent.slot import Load
from sdagent.kafka.agents import AgentRecord

log = structlog.get_logger(__name__)

BEACON_INTERVAL_S = 1.0  # routers treat a record older than a few of these as stale
MIN_GAP_S = 0.2  # one record per job at most: at 100 jobs/s a fleet sends about 100 records/s
# A change of the time until free this large is news: a long job that just showed its length
# (its first progress) must not look like a short one for a whole interval, or it draws jobs.
BACKLOG_CHANGE_S = 0.5
CACHED_MODELS_INTERVAL_S = 60.0  # listing the cache walks its manifest: not every second


@dataclass(frozen=True)
class AgentState:
    loaded_model: str | None
    load: Load
    jobs_partitions: frozenset[int]
    accepting: bool
    mean_switch_s: float = 0.0


class AgentBeacon:
    """Publishes :class:`AgentRecord` for this agent; :meth:`follow` runs on the agent's loop."""

    def __init__(
        self,
        producer: Producer,
        topic: str,
        instance_id: str,
        cached_models: Callable[[], list[str]] = list,
        *,
        interval_s: float = BEACON_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._key = instance_id.encode()
        self._instance_id = instance_id
        self._list_cached_models = cached_models
        self._interval_s = interval_s
        self._clock = clock
        self._sent: AgentState | None = None
        self._sent_at = float("-inf")
        self._cached_models: list[str] = []
        self._cached_models_at = float("-inf")

    def follow(self, state: AgentState) -> None:
        """Cheap unless a record is due: on a change of model, partitions or acceptance at once;
        of the job count, or of the time until free by more than ``BACKLOG_CHANGE_S`` (or half),
        once ``MIN_GAP_S`` passed since the last; every ``interval_s`` in any case."""
        now = self._clock()
        if not self._due(state, now):
            return
        # A switch usually follows staging: list the cache again when the loaded model changes.
        model_changed = self._sent is None or self._sent.loaded_model != state.loaded_model
        self._sent, self._sent_at = state, now
        record = AgentRecord(
            instance_id=self._instance_id,
            loaded_model=state.loaded_model,
            hot_model=state.load.hot_model,
            cached_models=self._cached(now, model_changed),
            jobs_partitions=sorted(state.jobs_partitions),
            queued=state.load.queued,
            accepting=state.accepting,
            backlog_s=round(state.load.backlog_s, 3),
            mean_job_s=round(state.load.mean_job_s, 3),
            mean_switch_s=round(state.mean_switch_s, 3),
        )
        self._send(record.to_bytes())

    def leave(self) -> None:
        self._send(None)  # the tombstone: compaction drops this agent from the topic

    def _due(self, state: AgentState, now: float) -> bool:
        sent = self._sent
        if sent is None or now >= self._sent_at + self._interval_s:
            return True
        if (state.loaded_model, state.load.hot_model, state.jobs_partitions, state.accepting) != (
            sent.loaded_model,
            sent.load.hot_model,
            sent.jobs_partitions,
            sent.accepting,
        ):
            return True
        moved = abs(state.load.backlog_s - sent.load.backlog_s) > max(BACKLOG_CHANGE_S, sent.load.backlog_s / 2)
        return (state.load.queued != sent.load.queued or moved) and now >= self._sent_at + MIN_GAP_S

    def _cached(self, now: float, refresh: bool) -> list[str]:
        if refresh or now >= self._cached_models_at + CACHED_MODELS_INTERVAL_S:
            self._cached_models, self._cached_models_at = self._list_cached_models(), now
        return self._cached_models

    def _send(self, value: bytes | None) -> None:
        try:
            self._producer.produce(self._topic, key=self._key, value=value)
        except (BufferError, KafkaException) as exc:  # advisory: the next turn sends it again
            log.warning("beacon.not_sent", error=str(exc))
            self._sent = None
