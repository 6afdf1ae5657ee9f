"""One data point as the sinks take it: a value, a statistic set, or a distribution (Values/Counts).

Every datum carries one interval's worth of data, never a running total: a request that botocore
retries after it had in fact succeeded then adds one interval twice, not the whole history.
"""

from __future__ import annotations

from dataclasses import dataclass

# PutMetricData: at most 30 dimensions a metric (AWS API reference, MetricDatum).
MAX_DIMENSIONS = 30

Dimensions = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class StatisticSet:
    sample_count: float
    sum: float
    minimum: float
    maximum: float


@dataclass(frozen=True, slots=True)
class Datum:
    """Exactly one of ``value``, ``stats`` or ``values`` (with ``counts``) is set.

    ``timestamp`` is the start of the interval the data belongs to, in epoch seconds.
    """

    name: str
    dimensions: Dimensions
    timestamp: float
    unit: str = "None"
    value: float | None = None
    stats: StatisticSet | None = None
    values: tuple[float, ...] = ()
    counts: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        kinds = (self.value is not None) + (self.stats is not None) + bool(self.values)
        if kinds != 1:
            raise ValueError(f"{self.name}: a datum holds exactly one of value, stats, values")
        if self.counts and len(self.counts) != len(self.values):
            raise ValueError(f"{self.name}: counts and values differ in length")
        if len(self.dimensions) > MAX_DIMENSIONS:
            raise ValueError(f"{self.name}: {len(self.dimensions)} dimensions, CloudWatch takes {MAX_DIMENSIONS}")

    @property
    def sample_count(self) -> float:
        """How many observations the datum stands for."""
        if self.value is not None:
            return 1
        if self.stats is not None:
            return self.stats.sample_count
        return sum(self.counts) if self.counts else len(self.values)
