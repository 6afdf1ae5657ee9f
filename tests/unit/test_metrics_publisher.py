"""The metrics loop with an in-memory sink: intervals, a bounded buffer, backoff, a job loop never held up."""

from __future__ import annotations

import threading
import time

import pytest

from sdagent.gpu.fake import FakeNvml
from sdagent.metrics import names
from sdagent.metrics.clock import ScaledClock
from sdagent.metrics.dimensions import InstanceIdentity
from sdagent.metrics.nvml import GpuSampler
from sdagent.metrics.publisher import MetricsPublisher
from sdagent.metrics.sink import MetricsSink, SendResult, SinkUnavailable

IDENTITY = InstanceIdentity("i-0abc", "g5.xlarge", "sdagent-fleet")
FAST = 600  # a 60 s interval passes in 0.1 s


class MemorySink(MetricsSink):
    """Keeps what it is sent; ``down`` makes it unreachable, ``hold`` makes send block."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.attempts: list[float] = []
        self.down = False
        self.hold = threading.Event()
        self.hold.set()
        self.closed = False

    def send(self, data):
        self.attempts.append(time.monotonic())
        self.hold.wait()
        if self.down:
            raise SinkUnavailable("down")
        self.batches.append(list(data))
        return SendResult(len(data), 0, 1)

    def close(self) -> None:
        self.closed = True

    @property
    def data(self) -> list:
        return [datum for batch in self.batches for datum in batch]


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


def publisher(sink: MemorySink, **kwargs) -> MetricsPublisher:
    kwargs.setdefault("clock", ScaledClock(FAST))
    kwargs.setdefault("initial_backoff_s", 5.0)
    kwargs.setdefault("max_backoff_s", 60.0)
    return MetricsPublisher(sink, IDENTITY, **kwargs)


def test_publishes_one_batch_per_interval_stamped_on_interval_boundaries(sink):
    pub = publisher(sink)
    pub.start()
    try:
        assert wait_for(lambda: len(sink.batches) >= 3)
    finally:
        pub.stop()
    stamps = sorted({d.timestamp for d in sink.data})
    assert all(stamp % 60 == 0 for stamp in stamps)
    assert all(b - a == 60 for a, b in zip(stamps, stamps[1:]))
    assert sink.closed


def test_without_a_gpu_only_job_metrics_are_published(sink):
    pub = publisher(sink, gpus=GpuSampler(FakeNvml(library_missing=True)))
    pub.start()
    pub.jobs.job_started()
    try:
        assert wait_for(lambda: sink.batches)
    finally:
        pub.stop()
    published = {d.name for d in sink.data}
    assert names.JOBS_STARTED in published
    assert not {n for n in published if n.startswith("Gpu")}


def test_gpu_samples_between_publishes_become_one_statistic_set(sink):
    pub = publisher(sink, gpus=GpuSampler(FakeNvml(1)), sample_interval_s=10)
    pub.start()
    try:
        assert wait_for(lambda: len(sink.batches) >= 3)
    finally:
        pub.stop()
    full = [d for d in sink.data if d.name == names.GPU_UTILIZATION and d.stats.sample_count >= 5]
    assert full, "a whole interval holds about six 10 s samples"
    assert full[0].stats.minimum == full[0].stats.maximum == 97


def test_stop_publishes_the_partial_interval(sink):
    pub = publisher(sink, clock=None, publish_interval_s=300, sample_interval_s=10)  # real time: no interval ends
    pub.start()
    pub.jobs.job_started()
    pub.stop()
    assert [d.value for d in sink.data if d.name == names.JOBS_STARTED] == [1]


def test_a_slow_sink_never_holds_up_the_job_loop(sink):
    sink.hold.clear()  # send() blocks, as a hung connection would
    pub = publisher(sink)
    pub.start()
    try:
        assert wait_for(lambda: sink.attempts)
        started = time.perf_counter()
        for _ in range(1000):
            pub.jobs.job_started()
            pub.jobs.job_finished("succeeded", None, {"total_ms": 5.0})
        assert time.perf_counter() - started < 0.5
    finally:
        sink.hold.set()
        pub.stop()


def test_unreachable_sink_is_retried_with_growing_backoff(sink):
    sink.down = True
    pub = publisher(sink, initial_backoff_s=2.0, max_backoff_s=32.0, publish_interval_s=300, sample_interval_s=300)
    pub.start()
    try:
        assert wait_for(lambda: len(sink.attempts) >= 5)
    finally:
        pub.stop(timeout_s=0.1)
    gaps = [b - a for a, b in zip(sink.attempts, sink.attempts[1:4])]
    assert gaps[0] < gaps[-1], "each retry waits longer than the one before"
    assert pub.stats().failures >= 4


def test_full_buffer_drops_the_oldest_counts_them_and_reports_after_recovery(sink):
    sink.down = True
    pub = publisher(sink, max_buffered=100, initial_backoff_s=1.0, max_backoff_s=2.0)
    pub.start()
    try:
        # Each interval adds 6 points: after ~20 intervals the buffer has overflowed.
        assert wait_for(lambda: pub.stats().dropped > 0)
        assert pub.stats().buffered <= 100
        sink.down = False
        assert wait_for(lambda: pub.stats().buffered == 0 and sink.batches)
        assert wait_for(lambda: any(d.name == names.METRICS_DROPPED for d in sink.data))
    finally:
        pub.stop()
    stats = pub.stats()
    reported = sum(d.value for d in sink.data if d.name == names.METRICS_DROPPED)
    assert reported == stats.dropped > 0
    # The oldest went: what survived is the newest run of intervals, with no gap inside it.
    stamps = sorted({d.timestamp for d in sink.data if d.name == names.JOBS_STARTED})
    assert all(b - a == 60 for a, b in zip(stamps, stamps[1:]))


def test_a_partly_sent_batch_is_not_sent_twice(sink):
    class HalfSink(MemorySink):
        def send(self, data):
            if not self.batches:
                self.batches.append(list(data[:2]))
                raise SinkUnavailable("second request failed", consumed=2)
            return super().send(data)

    half = HalfSink()
    pub = publisher(half, initial_backoff_s=0.5, max_backoff_s=0.5)
    pub.start()
    try:
        assert wait_for(lambda: len(half.batches) >= 2)
    finally:
        pub.stop()
    first_interval = [d for d in half.data if d.timestamp == half.data[0].timestamp]
    keys = [(d.name, d.dimensions) for d in first_interval]
    assert len(keys) == len(set(keys))


def test_validation_of_intervals():
    with pytest.raises(ValueError):
        MetricsPublisher(MemorySink(), IDENTITY, publish_interval_s=10, sample_interval_s=60)
