"""What the job loop tells the metrics: a recorder that is cheap, thread-safe and never blocks.

Every call takes one short lock and updates a counter; the publisher thread swaps the interval's
state out under the same lock (:meth:`JobMetrics.collect`) and builds data points outside it.
"""

from __future__ import annotations

import threading
from collections import Counter

import structlog

from sdagent.metrics import names
from sdagent.metrics.aggregate import Distribution
from sdagent.metrics.datum import Datum
from sdagent.metrics.dimensions import InstanceIdentity
from sdagent.metrics.dimensions import topic as topic_dimensions

log = structlog.get_logger(__name__)

# job_finished timings keys -> metric names (sdagent/runner.py measures these).
TIMINGS: dict[str, str] = {
    "queue_wait_ms": names.QUEUE_WAIT_TIME,
    "switch_ms": names.MODEL_SWITCH_TIME,
    "stage_ms": names.MODEL_STAGE_TIME,
    "inference_ms": names.INFERENCE_TIME,
    "upload_ms": names.UPLOAD_TIME,
    "total_ms": names.JOB_TOTAL_TIME,
}
# Status and Reason become dimension values: a bounded number of them keeps the metric count (and
# the bill) bounded if a caller ever passes free text. Past the cap, new ones count as "other".
MAX_STATUSES = 16
MAX_REASONS = 32
OTHER = "other"
SUCCEEDED = "succeeded"


class _Interval:
    """One interval's counts; replaced wholesale at each collect."""

    __slots__ = (
        "started",
        "finished",
        "failures",
        "timings",
        "cache_hits",
        "cache_misses",
        "restarts",
        "max_in_flight",
        "max_draining",
    )

    def __init__(self, in_flight: int, draining: bool) -> None:
        self.started = 0
        self.finished: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.timings: dict[str, Distribution] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        self.restarts = 0
        # Gauges report the interval's maximum: a job that ran between two samples still counts,
        # so an instance busy 99% of the interval never reads as idle to the scale-in guard.
        self.max_in_flight = in_flight
        self.max_draining = draining


class JobMetrics:
    """Job counters and timings, aggregated per publish interval.

    Called from the job loop (or any thread); each call is a few hundred nanoseconds under a lock
    no I/O ever holds. ``enabled=False`` makes every call a no-op. With ``jobs_topic``, JobsInFlight
    also goes to the fleet-wide stream (dimension JobsTopic) the scaling policies read.
    """

    def __init__(self, *, jobs_topic: str | None = None, enabled: bool = True) -> None:
        self._enabled = enabled
        self._jobs_topic = jobs_topic
        self._lock = threading.Lock()
        self._in_flight = 0
        self._draining = False
        self._time_to_ready: float | None = None
        self._time_to_ready_reported = False
        self._known_statuses: set[str] = set()
        self._known_reasons: set[str] = set()
        self._interval = _Interval(0, False)

    # --- the job loop's side ------------------------------------------------------------------

    def job_started(self) -> None:
        if not self._enabled:
            return
        with self._lock:
            self._interval.started += 1

    def job_finished(self, status: str, reason: str | None = None, timings_ms: dict[str, float] | None = None) -> None:
        """A job was answered: ``status`` as on the results topic, ``reason`` when it did not succeed."""
        if not self._enabled:
            return
        with self._lock:
            interval = self._interval
            interval.finished[self._bounded(status, self._known_statuses, MAX_STATUSES)] += 1
            if status != SUCCEEDED and reason:
                interval.failures[self._bounded(reason, self._known_reasons, MAX_REASONS)] += 1
            for key, value in (timings_ms or {}).items():
                metric = TIMINGS.get(key)
                if metric is None or value is None or value < 0:
                    continue
                distribution = interval.timings.get(metric)
                if distribution is None:
                    distribution = interval.timings[metric] = Distribution()
                distribution.add(float(value))

    def model_cache(self, hit: bool) -> None:
        if not self._enabled:
            return
        with self._lock:
            if hit:
                self._interval.cache_hits += 1
            else:
                self._interval.cache_misses += 1

    def backend_restarted(self) -> None:
        if not self._enabled:
            return
        with self._lock:
            self._interval.restarts += 1

    def set_draining(self, draining: bool) -> None:
        if not self._enabled:
            return
        with self._lock:
            self._draining = draining
            self._interval.max_draining = self._interval.max_draining or draining

    def set_in_flight(self, n: int) -> None:
        if not self._enabled:
            return
        with self._lock:
            self._in_flight = max(0, int(n))
            if self._in_flight > self._interval.max_in_flight:
                self._interval.max_in_flight = self._in_flight

    def time_to_ready(self, seconds: float) -> None:
        """Boot (or agent start) to ready to serve; recorded once per process, later calls ignored."""
        if not self._enabled:
            return
        with self._lock:
            if self._time_to_ready_reported or self._time_to_ready is not None:
                duplicate = True
            else:
                duplicate = False
                self._time_to_ready = float(seconds)
        if duplicate:
            log.warning("metrics.time_to_ready_repeated", seconds=seconds)

    # --- the publisher's side ------------------------------------------------------------------

    def collect(self, timestamp: float, identity: InstanceIdentity) -> list[Datum]:
        """The interval's data points (stamped ``timestamp``); starts the next interval."""
        with self._lock:
            interval = self._interval
            self._interval = _Interval(self._in_flight, self._draining)
            time_to_ready = self._time_to_ready
            if time_to_ready is not None:
                self._time_to_ready = None
                self._time_to_ready_reported = True
        if not self._enabled:
            return []
        return _datums(interval, time_to_ready, timestamp, identity, self._jobs_topic)

    @staticmethod
    def _bounded(value: str, known: set[str], cap: int) -> str:
        if value in known:
            return value
        if len(known) >= cap:
            return OTHER
        known.add(value)
        return value


def _datums(
    interval: _Interval, time_to_ready: float | None, ts: float, identity: InstanceIdentity, jobs_topic: str | None
) -> list[Datum]:
    instance = identity.instance()
    group = identity.group()
    data = [
        # Zeros are published too: the scaling math and the busy guard need every instance's value
        # every period, and a missing period would read as "no data" rather than "idle".
        Datum(names.JOBS_IN_FLIGHT, instance, ts, "Count", value=interval.max_in_flight),
        Datum(names.JOBS_STARTED, instance, ts, "Count", value=interval.started),
        Datum(names.BACKEND_RESTARTS, instance, ts, "Count", value=interval.restarts),
        Datum(names.DRAINING, instance, ts, "None", value=1.0 if interval.max_draining else 0.0),
    ]
    if jobs_topic is not None:
        # Every agent adds its value to one fleet-wide stream. The scaling math reads its Average
        # (jobs per agent) times GroupInServiceInstances: metric math cannot add per-instance
        # streams up without SEARCH, which target tracking does not take, and an Average does not
        # depend on how many points an agent sends per period (a Sum would, at 10 s publishing).
        data.append(
            Datum(names.JOBS_IN_FLIGHT, topic_dimensions(jobs_topic), ts, "Count", value=interval.max_in_flight)
        )
    if group is not None:
        data.append(Datum(names.BACKEND_RESTARTS, group, ts, "Count", value=interval.restarts))
    for status, count in sorted(interval.finished.items()):
        data.append(Datum(names.JOBS_FINISHED, (*instance, (names.STATUS, status)), ts, "Count", value=count))
    failure_dims = group if group is not None else instance
    for reason, count in sorted(interval.failures.items()):
        data.append(Datum(names.JOB_FAILURES, (*failure_dims, (names.REASON, reason)), ts, "Count", value=count))
    for metric, distribution in sorted(interval.timings.items()):
        datum = distribution.datum(metric, instance, ts, "Milliseconds")
        if datum is not None:
            data.append(datum)
    if interval.cache_hits:
        data.append(Datum(names.MODEL_CACHE_HITS, instance, ts, "Count", value=interval.cache_hits))
    if interval.cache_misses:
        data.append(Datum(names.MODEL_CACHE_MISSES, instance, ts, "Count", value=interval.cache_misses))
    if time_to_ready is not None:
        data.append(Datum(names.TIME_TO_READY, instance, ts, "Seconds", value=time_to_ready))
        if group is not None:
            data.append(Datum(names.TIME_TO_READY, group, ts, "Seconds", value=time_to_ready))
    return data
