"""Which model topics a share-group agent reads (docs/share-groups.md#model-affinity-in-share-mode).

A submitter sends a job to its model's topic only when an agent holding the model is idle
(``sdagent.kafka.routing.ModelTopicPlacement``), so the topic's readers must be the holders:
an agent reads the topic of the model it has loaded (the hot lane, polled right after the
priority lane). Two ways a job could be left on a topic nobody reads, and what takes it:

- the holder took a job from the jobs topic meanwhile and switched to another model: its previous
  model's topic stays one of its lanes (polled after the jobs topic) until a poll finds it empty;
- the holder died or drained: every agent idle for ``sweep_idle_s`` reads one more model topic for
  a while (the sweep), a different one each time, starting from a place set by its instance id.

A lane is left only once nothing acquired from it is still unsettled (``holding``).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence

import structlog

from sdagent.agent.lanes import Lane

log = structlog.get_logger(__name__)

SWEEP_IDLE_S = 5.0  # idle this long, an agent sweeps one more model topic
# A share consumer fetches nothing until the group has assigned it the topic: measured here,
# about 1 s after subscribe. Routers are told of the lane only once it has been read this long.
HOT_LANE_WARM_S = 2.0
# Empty polls before a lane is left: a poll returns what a fetch brought back, and a fetch may be
# on its way; a swept lane's consumer also needs a few to join and fetch at all.
PREVIOUS_EMPTY_POLLS = 3
SWEEP_EMPTY_POLLS = 20


class ModelLanes:
    """The model topics' lanes one agent reads now: hot, previous, swept."""

    def __init__(
        self,
        lanes: Sequence[Lane],
        topic_of_model: Callable[[str], str | None],
        instance_id: str,
        *,
        sweep_idle_s: float = SWEEP_IDLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lanes = list(lanes)
        self._by_topic = {lane.topic: lane for lane in self._lanes}
        self._topic_of_model = topic_of_model
        self._sweep_idle_s = sweep_idle_s
        self._clock = clock
        self._next_sweep = zlib.crc32(instance_id.encode()) % max(1, len(self._lanes))
        self._hot: Lane | None = None
        self._hot_read_since = float("inf")  # when the hot lane's consumer joined (or was joined)
        self._previous: Lane | None = None
        self._swept: Lane | None = None
        self._empty_polls = {"previous": 0, "swept": 0}
        self._swept_at = float("-inf")
        self._retired: list[Lane] = []  # left lanes still holding an unsettled record

    @property
    def before_jobs(self) -> list[Lane]:
        return [self._hot] if self._hot is not None else []

    @property
    def after_jobs(self) -> list[Lane]:
        return [lane for lane in (self._previous, self._swept) if lane is not None]

    def routable_model(self, loaded_model: str | None) -> str | None:
        """``loaded_model`` once its topic has been read long enough to take a routed job at once."""
        hot_topic = self._hot.topic if self._hot is not None else None
        warm = self._clock() >= self._hot_read_since + HOT_LANE_WARM_S
        if loaded_model and warm and hot_topic == self._topic_of_model(loaded_model):
            return loaded_model
        return None

    def follow(self, loaded_model: str | None, idle_for_s: float, holding: Callable[[Lane], bool]) -> None:
        """Before a poll: read the loaded model's topic, and sweep another after a long idle."""
        for lane in [lane for lane in self._retired if not holding(lane)]:
            self._retired.remove(lane)
            self._leave(lane)
        topic = self._topic_of_model(loaded_model) if loaded_model else None
        hot = self._by_topic.get(topic) if topic else None
        if hot is not self._hot:
            self._rotate(hot, holding)
        long_idle = idle_for_s >= self._sweep_idle_s
        if self._swept is None and long_idle and self._clock() >= self._swept_at + self._sweep_idle_s:
            self._sweep()

    def polled_empty(self, lane: Lane, holding: Callable[[Lane], bool]) -> None:
        """A poll of ``lane`` found nothing: the previous model's lane is done, a swept one nearly."""
        if lane is self._previous:
            self._empty_polls["previous"] += 1
            if self._empty_polls["previous"] >= PREVIOUS_EMPTY_POLLS:
                self._retire(lane, holding)
                self._previous = None
        elif lane is self._swept:
            self._empty_polls["swept"] += 1
            if self._empty_polls["swept"] >= SWEEP_EMPTY_POLLS:
                self._retire(lane, holding)
                self._swept = None

    def leave_all(self) -> None:
        """Leave every lane (the intake calls this with nothing acquired)."""
        for lane in [self._hot, self._previous, self._swept, *self._retired]:
            if lane is not None:
                lane.leave()
        self._hot = self._previous = self._swept = None
        self._hot_read_since = float("inf")
        self._retired.clear()

    def _rotate(self, hot: Lane | None, holding: Callable[[Lane], bool]) -> None:
        old, previous = self._hot, self._previous
        if hot in self._retired:
            self._retired.remove(hot)  # back to a model whose lane was being left: keep it
        if hot is self._swept:
            self._swept = None  # the swept topic's model is now loaded: it is the hot lane
        if previous is not None and previous is not hot:
            self._retire(previous, holding)  # a third model: the one before the last is done
        self._previous, self._empty_polls["previous"] = old, 0
        self._hot = hot
        self._hot_read_since = self._clock()
        if hot is not None and hot.consumer is None:
            hot.join()
        elif hot is not None:  # it was being read already (the previous or the swept lane)
            self._hot_read_since -= HOT_LANE_WARM_S
        log.info("intake.model_lane", hot=hot.topic if hot else None,
                 previous=self._previous.topic if self._previous else None)  # fmt: skip

    def _sweep(self) -> None:
        busy = {lane.topic for lane in (self._hot, self._previous, *self._retired) if lane is not None}
        for _ in range(len(self._lanes)):
            lane = self._lanes[self._next_sweep]
            self._next_sweep = (self._next_sweep + 1) % len(self._lanes)
            if lane.topic not in busy:
                self._swept, self._empty_polls["swept"], self._swept_at = lane, 0, self._clock()
                if lane.consumer is None:
                    lane.join()
                return

    def _retire(self, lane: Lane, holding: Callable[[Lane], bool]) -> None:
        """Leave ``lane`` now, or once what was acquired from it is settled."""
        if holding(lane):
            self._retired.append(lane)
        else:
            self._leave(lane)

    def _leave(self, lane: Lane) -> None:
        lane.leave()
        log.info("intake.model_lane_left", topic=lane.topic)
