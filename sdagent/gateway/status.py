"""Job status for the gateway: the latest event of every recent job, read from the results topic.

Every replica reads every partition of the results topic (a plain reader, no consumer group),
starting ``window_s`` back, so a restarted or added replica knows every job of the window and
any replica can answer for a job another one accepted (its ``queued`` event is on the topic too).
The view is bounded: jobs whose last event is older than the window, or beyond ``max_jobs``, are
forgotten (404). Waiters (sync requests, event streams) get each new event on their own loop.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition
from pydantic import ValidationError

from sdagent.errors import KafkaUnavailable
from sdagent.jobs import Status, StatusEvent
from sdagent.kafka.clients import with_metadata_retries
from sdagent.kafka.records import STATUS_HEADER, header, position

log = structlog.get_logger(__name__)

POLL_S = 0.1
METADATA_TIMEOUT_S = 10.0
EXPIRE_EVERY = 1000  # events between two sweeps of expired jobs


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass(frozen=True)
class _Entry:
    """A job's latest event, kept as its record's bytes: parsed only when someone asks (most
    events are never read over HTTP; parsing each would cost the reader thread, and the GIL)."""

    status: Status
    raw: bytes
    at_ms: int  # the record's timestamp

    def event(self) -> StatusEvent:
        return StatusEvent.from_bytes(self.raw)


class StatusView:
    """The latest status event per job id, kept current by a reader thread."""

    def __init__(
        self,
        consumer: Consumer,
        results_topic: str,
        *,
        window_s: float,
        max_jobs: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._consumer = consumer
        self._topic = results_topic
        self._window_s = window_s
        self._max_jobs = max_jobs
        self._clock = clock
        self._latest: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._waiters: dict[str, list[_Waiter]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        self._targets: dict[int, int] = {}  # partition -> high watermark at start
        self._positions: dict[int, int] = {}
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._since_sweep = 0

    def start(self) -> None:
        try:
            starts = with_metadata_retries(self._start_positions, METADATA_TIMEOUT_S)
        except KafkaException as exc:
            raise KafkaUnavailable(f"cannot read {self._topic}: {exc}") from exc
        self._consumer.assign(starts)
        self._thread = threading.Thread(target=self._run, name="gateway-status", daemon=True)
        self._thread.start()
        log.info("gateway.status_reading", topic=self._topic, partitions=len(starts), window_s=self._window_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._consumer.close()

    def get(self, job_id: str) -> StatusEvent | None:
        with self._lock:
            entry = self._latest.get(job_id)
        return _parsed(entry)

    def subscribe(self, job_id: str) -> tuple[StatusEvent | None, asyncio.Queue]:
        """The job's latest event now, and a queue that receives every later one (from the loop)."""
        waiter = _Waiter(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._waiters[job_id].append(waiter)
            entry = self._latest.get(job_id)
        return _parsed(entry), waiter.queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        with self._lock:
            waiters = [w for w in self._waiters.get(job_id, []) if w.queue is not queue]
            if waiters:
                self._waiters[job_id] = waiters
            else:
                self._waiters.pop(job_id, None)

    async def wait_terminal(self, job_id: str, timeout_s: float) -> StatusEvent | None:
        """The job's terminal event if it comes within ``timeout_s``, else None."""
        latest, queue = self.subscribe(job_id)
        try:
            if latest is not None and latest.status.is_terminal:
                return latest
            deadline = asyncio.get_running_loop().time() + timeout_s
            while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    event = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    return None
                if event.status.is_terminal:
                    return event
            return None
        finally:
            self.unsubscribe(job_id, queue)

    # --- reader thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._consumer.poll(POLL_S)
                if message is not None and message.error() is None:
                    _topic, partition, offset = position(message)
                    self._positions[partition] = offset + 1
                    self._take(message.key(), message.value(), message.headers(), message.timestamp()[1])
                if not self.caught_up.is_set() and all(
                    self._positions.get(p, 0) >= t for p, t in self._targets.items()
                ):
                    self.caught_up.set()
                    log.info("gateway.status_caught_up", jobs=len(self._latest))
            except Exception:  # keep reading: one bad record must not blind the gateway
                log.exception("gateway.status_read_failed")
                self._stop.wait(1.0)

    def _take(self, key: bytes | None, value: bytes | None, headers, timestamp_ms: int) -> None:
        status = _status_of(headers)
        if not key or not value or status is None:
            log.warning("gateway.bad_status_record", key=(key or b"").decode(errors="replace"))
            return
        job_id = key.decode(errors="replace")
        entry = _Entry(status, value, timestamp_ms)
        with self._lock:
            current = self._latest.get(job_id)
            # A terminal answer stands: a late progress record or a requeue's events of a job
            # already answered must not hide it.
            if current is None or not current.status.is_terminal or status.is_terminal:
                self._latest[job_id] = entry
                self._latest.move_to_end(job_id)
            waiters = list(self._waiters.get(job_id, ()))
            self._bound()
        if not waiters:
            return
        event = _parsed(entry)
        if event is None:
            return
        for waiter in waiters:
            waiter.loop.call_soon_threadsafe(waiter.queue.put_nowait, event)

    def _bound(self) -> None:
        while len(self._latest) > self._max_jobs:
            self._latest.popitem(last=False)
        self._since_sweep += 1
        if self._since_sweep < EXPIRE_EVERY:
            return
        self._since_sweep = 0
        horizon_ms = (self._clock() - self._window_s) * 1000
        while self._latest:
            oldest_id, oldest = next(iter(self._latest.items()))
            if oldest.at_ms >= horizon_ms:
                break
            del self._latest[oldest_id]

    def _start_positions(self) -> list[TopicPartition]:
        metadata = self._consumer.list_topics(self._topic, timeout=METADATA_TIMEOUT_S)
        topic = metadata.topics.get(self._topic)
        if topic is None or topic.error is not None:
            raise KafkaUnavailable(f"topic {self._topic} does not exist; run `sdagent topics create`")
        since_ms = int((self._clock() - self._window_s) * 1000)
        wanted = [TopicPartition(self._topic, p, since_ms) for p in topic.partitions]
        starts = []
        for tp in self._consumer.offsets_for_times(wanted, timeout=METADATA_TIMEOUT_S):
            _low, high = self._consumer.get_watermark_offsets(tp, timeout=METADATA_TIMEOUT_S)
            start = tp.offset if tp.offset >= 0 else high
            self._targets[tp.partition] = high
            self._positions[tp.partition] = start
            starts.append(TopicPartition(tp.topic, tp.partition, start))
        return starts


def _status_of(headers) -> Status | None:
    value = header(headers, STATUS_HEADER)
    try:
        return Status(value) if value is not None else None
    except ValueError:
        return None


def _parsed(entry: _Entry | None) -> StatusEvent | None:
    if entry is None:
        return None
    try:
        return entry.event()
    except ValidationError:
        log.warning("gateway.bad_status_record", status=entry.status.value)
        return None
