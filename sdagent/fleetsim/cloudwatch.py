"""CloudWatch as the policy sees it: one datapoint per minute per metric, visible late.

The three metrics the shipped math reads, with the statistics the templates ask for:
``QueueBacklog`` (Maximum of the lag sampled each second; published by the member holding
partition 0, so only while an agent is in service), ``JobsInFlight`` (Average over the agents of
each one's maximum in the minute), ``GroupInServiceInstances`` (Average, per group). The math
itself is evaluated by the functions below, one per expression the templates use
(:data:`sdagent.fleetsim.policy.KNOWN_EXPRESSIONS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sdagent.fleetsim.policy import BACKLOG_WITHOUT_CAPACITY, IDLE_INSTANCES, JOBS_PER_INSTANCE


@dataclass(frozen=True)
class Minute:
    """One minute's datapoints for one group; ``None`` is a missing datapoint."""

    backlog: float | None
    busy: float | None
    in_service: float


def jobs_per_instance(m: Minute) -> float | None:
    # (MAX([backlog - in_flight, 0]) + in_flight) / MAX([in_service, 1]), in_flight = FILL(busy, 0) * in_service
    if m.backlog is None:
        return None
    in_flight = (m.busy or 0.0) * m.in_service
    return (max(m.backlog - in_flight, 0.0) + in_flight) / max(m.in_service, 1.0)


def backlog_without_capacity(m: Minute) -> float | None:
    # IF(backlog > 0 AND FILL(inservice, 0) == 0, 1, 0)
    if m.backlog is None:
        return None
    return 1.0 if m.backlog > 0 and m.in_service == 0 else 0.0


def idle_instances(m: Minute) -> float | None:
    # IF(backlog - inflight <= 0, inservice - inflight, 0), inflight = FILL(busy, 0) * inservice
    if m.backlog is None:
        return None
    in_flight = (m.busy or 0.0) * m.in_service
    return m.in_service - in_flight if m.backlog - in_flight <= 0 else 0.0


EXPRESSIONS: dict[str, Callable[[Minute], float | None]] = {
    JOBS_PER_INSTANCE: jobs_per_instance,
    BACKLOG_WITHOUT_CAPACITY: backlog_without_capacity,
    IDLE_INSTANCES: idle_instances,
}


class MetricStore:
    """Samples each second, closes each minute, and answers what is visible at a time."""

    def __init__(self, groups: list[str], ingestion_delay_s: float) -> None:
        self._delay = ingestion_delay_s
        self._groups = groups
        self._minutes: list[dict[str, Minute]] = []
        self._backlog_max: float | None = None
        self._in_service_sum = dict.fromkeys(groups, 0.0)
        self._seconds = 0

    def sample(self, backlog: float | None, in_service: dict[str, int]) -> None:
        """One second: the lag if someone publishes it, and each group's in-service count."""
        if backlog is not None:
            self._backlog_max = backlog if self._backlog_max is None else max(self._backlog_max, backlog)
        for group, count in in_service.items():
            self._in_service_sum[group] += count
        self._seconds += 1

    def close_minute(self, busy: float | None) -> None:
        """Ends the minute; ``busy`` is the mean of the publishing agents' maxima (None: none did)."""
        seconds = max(self._seconds, 1)
        self._minutes.append(
            {g: Minute(self._backlog_max, busy, self._in_service_sum[g] / seconds) for g in self._groups}
        )
        self._backlog_max = None
        self._in_service_sum = dict.fromkeys(self._groups, 0.0)
        self._seconds = 0

    def visible(self, group: str, now: float, count: int, metric: str) -> list[float | None]:
        """The last ``count`` datapoints of ``metric`` CloudWatch has for ``group`` at ``now``."""
        seen = int((now - self._delay) // 60)  # minutes whose datapoint has arrived
        seen = min(seen, len(self._minutes))
        first = max(seen - count, 0)
        evaluate = EXPRESSIONS[metric]
        return [evaluate(self._minutes[i][group]) for i in range(first, seen)]

    def latest(self, group: str) -> Minute | None:
        return self._minutes[-1][group] if self._minutes else None
