"""Per-interval accumulators: a statistic set for gauges, Values/Counts for distributions."""

from __future__ import annotations

import math
from collections import Counter

from sdagent.metrics.datum import Datum, Dimensions, StatisticSet

# Distribution values are kept to 3 significant digits: CloudWatch computes percentiles from
# Values/Counts approximately anyway, and rounding bounds the number of distinct values an
# interval can hold (a Values array takes at most 150 of them).
SIGNIFICANT_DIGITS = 3


class StatAccumulator:
    """Count, sum, minimum and maximum of one gauge over an interval."""

    __slots__ = ("count", "total", "minimum", "maximum")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.minimum = math.inf
        self.maximum = -math.inf

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if value < self.minimum:
            self.minimum = value
        if value > self.maximum:
            self.maximum = value

    def datum(self, name: str, dimensions: Dimensions, timestamp: float, unit: str) -> Datum | None:
        if self.count == 0:
            return None
        stats = StatisticSet(self.count, self.total, self.minimum, self.maximum)
        return Datum(name, dimensions, timestamp, unit, stats=stats)


def quantize(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``value`` rounded to ``digits`` significant digits."""
    if value == 0 or not math.isfinite(value):
        return 0.0 if not math.isfinite(value) else value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


class Distribution:
    """Observations of one timing over an interval, as distinct values and their counts."""

    __slots__ = ("counter",)

    def __init__(self) -> None:
        self.counter: Counter[float] = Counter()

    def add(self, value: float) -> None:
        self.counter[quantize(value)] += 1

    def __bool__(self) -> bool:
        return bool(self.counter)

    def datum(self, name: str, dimensions: Dimensions, timestamp: float, unit: str) -> Datum | None:
        """One datum with every distinct value; sinks split it where their format has a limit."""
        if not self.counter:
            return None
        items = sorted(self.counter.items())
        values = tuple(value for value, _ in items)
        counts = tuple(float(count) for _, count in items)
        return Datum(name, dimensions, timestamp, unit, values=values, counts=counts)
