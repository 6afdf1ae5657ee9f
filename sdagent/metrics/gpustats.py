"""GPU readings of one publish interval turned into data points: statistic sets and error counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from sdagent.metrics import names
from sdagent.metrics.aggregate import StatAccumulator
from sdagent.metrics.datum import Datum
from sdagent.metrics.dimensions import InstanceIdentity
from sdagent.metrics.nvml import POWER_THROTTLE, THERMAL_THROTTLE, GpuReading, GpuSample

# Gauge metrics: name, unit, how to read the sample.
_GAUGES: tuple[tuple[str, str, Callable[[GpuSample], float | None]], ...] = (
    (names.GPU_UTILIZATION, "Percent", lambda s: s.utilization_gpu),
    (names.GPU_MEMORY_UTILIZATION, "Percent", lambda s: s.utilization_memory),
    (names.GPU_MEMORY_USED, "Bytes", lambda s: s.memory_used_bytes),
    (names.GPU_MEMORY_TOTAL, "Bytes", lambda s: s.memory_total_bytes),
    (names.GPU_TEMPERATURE, "None", lambda s: s.temperature_c),
    (names.GPU_POWER_DRAW, "None", lambda s: s.power_draw_w),
    (names.GPU_POWER_LIMIT, "None", lambda s: s.power_limit_w),
    (names.GPU_SM_CLOCK, "None", lambda s: s.sm_clock_mhz),
    (
        names.GPU_THERMAL_THROTTLE,
        "Percent",
        lambda s: None if s.throttle_reasons is None else 100.0 * bool(s.throttle_reasons & THERMAL_THROTTLE),
    ),
    (
        names.GPU_POWER_THROTTLE,
        "Percent",
        lambda s: None if s.throttle_reasons is None else 100.0 * bool(s.throttle_reasons & POWER_THROTTLE),
    ),
)


class GpuAggregator:
    """Accumulates readings between two publishes.

    Gauges become statistic sets per GPU (``detail=False`` skips them); errors (XID, new ECC errors,
    lost GPUs) are counted per GPU and for the whole group, and published only when non-zero.
    """

    def __init__(self, identity: InstanceIdentity, *, detail: bool = True) -> None:
        self._identity = identity
        self._detail = detail
        self._reset()

    def add(self, reading: GpuReading) -> None:
        for sample in reading.samples:
            if sample.lost:
                self._lost.add(sample.index)
                continue
            if sample.ecc_uncorrected_new:
                self._ecc[sample.index] += sample.ecc_uncorrected_new
            if not self._detail:
                continue
            for name, _, read in _GAUGES:
                value = read(sample)
                if value is not None:
                    key = (sample.index, name)
                    accumulator = self._gauges.get(key)
                    if accumulator is None:
                        accumulator = self._gauges[key] = StatAccumulator()
                    accumulator.add(float(value))
        for event in reading.xids:
            self._xids[event.index] += 1

    def collect(self, timestamp: float) -> list[Datum]:
        identity = self._identity
        data: list[Datum] = []
        units = {name: unit for name, unit, _ in _GAUGES}
        for (index, name), accumulator in sorted(self._gauges.items()):
            datum = accumulator.datum(name, identity.gpu(index), timestamp, units[name])
            if datum is not None:
                data.append(datum)
        group = identity.group()
        for name, counts in (
            (names.GPU_XID_ERRORS, self._xids),
            (names.GPU_ECC_UNCORRECTED, self._ecc),
            (names.GPU_LOST, Counter({index: 1 for index in self._lost})),
        ):
            for gpu, count in sorted(counts.items(), key=lambda item: -1 if item[0] is None else item[0]):
                if gpu is not None:  # an XID NVML could not place on a GPU counts for the group only
                    data.append(Datum(name, identity.gpu(gpu), timestamp, "Count", value=count))
            total = sum(counts.values())
            if total and group is not None:
                data.append(Datum(name, group, timestamp, "Count", value=total))
        self._reset()
        return data

    def _reset(self) -> None:
        self._gauges: dict[tuple[int, str], StatAccumulator] = {}
        self._xids: Counter[int | None] = Counter()
        self._ecc: Counter[int] = Counter()
        self._lost: set[int] = set()
