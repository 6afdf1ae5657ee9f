"""Model affinity: jobs keyed by model so that a partition's jobs mostly share one, and an agent
that prefers, among the jobs it holds, one for the model it has loaded. See docs/model-affinity.md.

A switch costs seconds to tens of seconds on a GPU (the checkpoint is read and moved to VRAM);
a generation costs 2-3 s. Every switch avoided is a job's worth of GPU time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import structlog
from confluent_kafka import KafkaException, Producer

from sdagent.kafka.records import Delivery

log = structlog.get_logger(__name__)

HOT_MODELS_INTERVAL_S = 60.0


def pick_next(held: Sequence[Delivery], loaded_model: str | None, passed_over: int, max_passed_over: int) -> int:
    """Which of the ``held`` jobs (oldest first) runs next: the oldest, unless the next job of
    another partition needs the model already loaded and the oldest was passed over fewer than
    ``max_passed_over`` times. Only a partition's next record is eligible: offsets are committed
    in order within a partition."""
    oldest = held[0]
    if loaded_model is None or oldest.model == loaded_model or passed_over >= max_passed_over:
        return 0
    seen: set[tuple[str, int]] = set()
    for index, delivery in enumerate(held):
        partition = (delivery.topic, delivery.partition)
        if partition in seen:
            continue
        seen.add(partition)
        if delivery.model == loaded_model:
            return index
    return 0


class HotModels:
    """Publishes what this agent holds hot (the loaded model, the cached ones) on the compacted
    agents topic, keyed by instance id: on a change and every ``interval_s``; a tombstone when it
    leaves. A router or an operator reads the topic's latest record per agent."""

    def __init__(
        self,
        producer: Producer,
        topic: str,
        instance_id: str,
        cached_models: Callable[[], list[str]] = list,
        *,
        interval_s: float = HOT_MODELS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._key = instance_id.encode()
        self._instance_id = instance_id
        self._cached_models = cached_models
        self._interval_s = interval_s
        self._clock = clock
        self._last_loaded: str | None = None
        self._next_at = float("-inf")

    def follow(self, loaded_model: str | None) -> None:
        """From the agent's loop: cheap unless the loaded model changed or the interval is up."""
        if loaded_model == self._last_loaded and self._clock() < self._next_at:
            return
        self._last_loaded = loaded_model
        self._next_at = self._clock() + self._interval_s
        record = {
            "schema_version": 1,
            "instance_id": self._instance_id,
            "loaded_model": loaded_model,
            "cached_models": self._cached_models(),
            "at": datetime.now(UTC).isoformat(),
        }
        self._send(json.dumps(record).encode())

    def leave(self) -> None:
        self._send(None)  # the tombstone: compaction drops this agent from the topic

    def _send(self, value: bytes | None) -> None:
        try:
            self._producer.produce(self._topic, key=self._key, value=value)
        except (BufferError, KafkaException) as exc:  # advisory: the next turn sends it again
            log.warning("affinity.hot_models_not_sent", error=str(exc))
            self._next_at = float("-inf")
