"""The metrics loop: samples, aggregates per interval and publishes, on its own thread.

The job loop only ever touches :class:`JobMetrics` (a counter under a short lock). Everything slow -
NVML calls, Kafka admin requests, HTTP to CloudWatch - happens here. Data points wait in a bounded
buffer; when the sink is unreachable the loop backs off and keeps sampling, and when the buffer is
full the oldest points are dropped and counted (``MetricsDropped``, published once it is back).

Intervals are aligned to the wall clock (minute boundaries at 60 s), so every instance's point for
a period carries the same timestamp and CloudWatch periods line up with ours.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass

import structlog

from sdagent.metrics import names
from sdagent.metrics.clock import Clock
from sdagent.metrics.datum import Datum
from sdagent.metrics.dimensions import InstanceIdentity
from sdagent.metrics.gpustats import GpuAggregator
from sdagent.metrics.jobs import JobMetrics
from sdagent.metrics.lag import LagReporter
from sdagent.metrics.nvml import GpuSampler
from sdagent.metrics.sink import MetricsSink, SinkUnavailable

log = structlog.get_logger(__name__)

# The final publish at stop starts only within this long; the drain budget is tight. One request
# may still run to the client's timeouts: stop() waits for it no longer than this plus a second.
STOP_FLUSH_S = 5.0
THREAD_NAME = "sdagent-metrics"


@dataclass(frozen=True)
class PublisherStats:
    buffered: int
    delivered: int
    dropped: int
    rejected: int
    requests: int
    failures: int  # failed send attempts so far
    intervals: int
    cpu_s: float  # CPU time of the publisher thread


class MetricsPublisher:
    """Owns the metrics thread: ``start()``, ``stop()``; ``jobs`` is what the job loop records into."""

    def __init__(
        self,
        sink: MetricsSink,
        identity: InstanceIdentity,
        *,
        jobs: JobMetrics | None = None,
        gpus: GpuSampler | None = None,
        lag: LagReporter | None = None,
        gpu_detail: bool = True,
        publish_interval_s: float = 60.0,
        sample_interval_s: float = 10.0,
        max_buffered: int = 10_000,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if sample_interval_s > publish_interval_s:
            raise ValueError("sample_interval_s must not exceed publish_interval_s")
        self.jobs = jobs if jobs is not None else JobMetrics()
        self.gpus = gpus
        self.lag = lag
        self._sink = sink
        self._identity = identity
        self._gpu_stats = GpuAggregator(identity, detail=gpu_detail)
        self._publish_s = publish_interval_s
        self._sample_s = sample_interval_s
        self._buffer: deque[Datum] = deque()
        self._max_buffered = max_buffered
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._clock = clock or Clock()
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the counters read by stats() from other threads
        self._delivered = self._dropped = self._rejected = self._requests = self._failures = 0
        self._dropped_unreported = 0
        self._intervals = 0
        self._cpu_s = 0.0
        self._consecutive_failures = 0
        self._retry_at = 0.0
        self._interval_start = 0.0
        self._stop_flush_s = STOP_FLUSH_S

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start sampling and publishing in the background; returns at once."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()
        log.info("metrics.started", publish_interval_s=self._publish_s, sample_interval_s=self._sample_s)

    def stop(self, timeout_s: float = STOP_FLUSH_S) -> None:
        """Publish the partial interval (best effort, within ``timeout_s``) and stop the thread."""
        thread = self._thread
        if thread is None:
            return
        self._stop_flush_s = timeout_s
        self._stop.set()
        thread.join(timeout_s + 1.0)
        if thread.is_alive():
            log.warning("metrics.stop_timeout", timeout_s=timeout_s)
        self._thread = None
        try:
            self._sink.close()
        finally:
            if self.gpus is not None:
                self.gpus.close()
            if self.lag is not None:
                self.lag.close()
        stats = self.stats()
        log.info("metrics.stopped", delivered=stats.delivered, dropped=stats.dropped, buffered=stats.buffered)

    def stats(self) -> PublisherStats:
        with self._lock:
            return PublisherStats(
                buffered=len(self._buffer),
                delivered=self._delivered,
                dropped=self._dropped,
                rejected=self._rejected,
                requests=self._requests,
                failures=self._failures,
                intervals=self._intervals,
                cpu_s=self._cpu_s,
            )

    # --- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        cpu_start = time.thread_time()
        if self.gpus is not None:
            # On this thread: nvmlInit can take seconds on a GPU without persistence mode.
            try:
                self.gpus.start()
            except Exception:
                log.exception("gpu.start_failed")
        clock = self._clock
        now_wall = clock.time()
        self._interval_start = math.floor(now_wall / self._publish_s) * self._publish_s
        next_publish = clock.monotonic() + (self._interval_start + self._publish_s - now_wall)
        next_sample = clock.monotonic()
        while True:
            try:
                now = clock.monotonic()
                if now >= next_sample:
                    self._sample()
                    next_sample = max(next_sample + self._sample_s, now)  # a late tick is not made up
                if now >= next_publish:
                    self._close_interval()
                    next_publish += self._publish_s
                    if next_publish <= now:  # suspended or starved past whole intervals: realign
                        skipped = math.floor((now - next_publish) / self._publish_s) + 1
                        next_publish += skipped * self._publish_s
                        self._interval_start += skipped * self._publish_s
                if self._buffer and now >= self._retry_at:
                    self._flush()
            except Exception:  # a bug in one tick must not end metrics for the life of the agent
                log.exception("metrics.tick_failed")
            with self._lock:
                self._cpu_s = time.thread_time() - cpu_start
            wake = min(next_sample, next_publish)
            if self._buffer and self._retry_at > clock.monotonic():
                wake = min(wake, self._retry_at)
            if clock.wait(self._stop, wake - clock.monotonic()):
                break
        try:
            self._close_interval()
            self._flush(deadline=time.monotonic() + self._stop_flush_s)
        except Exception:
            log.exception("metrics.final_flush_failed")
        with self._lock:
            self._cpu_s = time.thread_time() - cpu_start

    def _sample(self) -> None:
        if self.gpus is not None and self.gpus.available:
            self._gpu_stats.add(self.gpus.sample())

    def _close_interval(self) -> None:
        timestamp = self._interval_start
        self._interval_start += self._publish_s
        data = self.jobs.collect(timestamp, self._identity)
        data.extend(self._gpu_stats.collect(timestamp))
        if self.lag is not None:
            data.extend(self.lag.collect(timestamp))
        with self._lock:
            dropped, self._dropped_unreported = self._dropped_unreported, 0
            self._intervals += 1
        if dropped:
            data.append(Datum(names.METRICS_DROPPED, self._identity.instance(), timestamp, "Count", value=dropped))
        self._enqueue(data)

    def _enqueue(self, data: list[Datum]) -> None:
        with self._lock:
            self._buffer.extend(data)
            overflow = len(self._buffer) - self._max_buffered
            if overflow <= 0:
                return
            for _ in range(overflow):
                self._buffer.popleft()  # the oldest: the freshest points matter most to scaling
            first_drop = self._dropped_unreported == 0 and self._consecutive_failures > 0
            self._dropped += overflow
            self._dropped_unreported += overflow
        if first_drop:
            log.warning("metrics.buffer_full", dropped=overflow, max_buffered=self._max_buffered)

    def _flush(self, deadline: float | None = None) -> None:
        if not self._buffer or (deadline is not None and time.monotonic() >= deadline):
            return
        with self._lock:
            batch = list(self._buffer)
        try:
            result = self._sink.send(batch)
        except SinkUnavailable as exc:
            self._consumed(exc.consumed, delivered=exc.delivered, rejected=exc.consumed - exc.delivered)
            self._failed(exc)
            return
        self._consumed(len(batch), delivered=result.delivered, rejected=result.rejected, requests=result.requests)
        if self._consecutive_failures:
            log.info("metrics.publish_recovered", failures=self._consecutive_failures, dropped=self._dropped)
        self._consecutive_failures = 0
        self._retry_at = 0.0

    def _consumed(self, count: int, *, delivered: int = 0, rejected: int = 0, requests: int = 0) -> None:
        with self._lock:
            for _ in range(min(count, len(self._buffer))):
                self._buffer.popleft()
            self._delivered += delivered
            self._rejected += rejected
            self._requests += requests

    def _failed(self, exc: SinkUnavailable) -> None:
        self._consecutive_failures += 1
        with self._lock:
            self._failures += 1
        # Exponential backoff with jitter: a fleet that lost CloudWatch together must not retry in step.
        backoff = min(self._max_backoff_s, self._initial_backoff_s * 2 ** (self._consecutive_failures - 1))
        backoff *= self._rng.uniform(0.5, 1.0)
        self._retry_at = self._clock.monotonic() + backoff
        event = log.warning if self._consecutive_failures == 1 else log.debug
        event(
            "metrics.publish_failed",
            error=str(exc),
            attempt=self._consecutive_failures,
            retry_in_s=round(backoff, 1),
            buffered=len(self._buffer),
        )
