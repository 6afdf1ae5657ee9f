"""The agent's view of the fleet: which jobs are already answered and which are cancelled.

Every agent reads the results topic (terminal events only, told apart by a header so nothing is
parsed) and the control topic (cancel requests) from ``window_s`` ago onwards, without joining a
group. That is what lets an agent recognise a redelivered job whose result another agent already
produced, and skip or interrupt a cancelled one, whoever received the cancel. Job ids are forgotten
after the window (docs/delivery.md explains the choice).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition

from sdagent.errors import KafkaUnavailable
from sdagent.jobs import TERMINAL_STATUSES, Status
from sdagent.kafka.clients import with_metadata_retries
from sdagent.kafka.records import STATUS_HEADER, position

log = structlog.get_logger(__name__)

POLL_S = 0.02  # bounds how late a catch-up check runs; an idle poll costs nothing
METADATA_TIMEOUT_S = 10.0
_TERMINAL_HEADER_VALUES = {status.value.encode(): status for status in TERMINAL_STATUSES}

CancelListener = Callable[[str], None]


class _ExpiringIds:
    """Job ids with the time they were seen, forgotten after ``window_s``."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self._window_s = window_s
        self._clock = clock
        self._seen: OrderedDict[str, tuple[float, object]] = OrderedDict()

    def add(self, job_id: str, value: object = True) -> None:
        self._seen[job_id] = (self._clock(), value)
        self._seen.move_to_end(job_id)
        self._expire()

    def get(self, job_id: str) -> object | None:
        entry = self._seen.get(job_id)
        return None if entry is None else entry[1]

    def _expire(self) -> None:
        horizon = self._clock() - self._window_s
        while self._seen:
            first = next(iter(self._seen.values()))
            if first[0] >= horizon:
                break
            self._seen.popitem(last=False)


class JobLedger:
    """Fleet-wide memory of answered and cancelled jobs, fed by a background reader thread."""

    def __init__(
        self,
        consumer: Consumer,
        probe: Consumer,
        results_topic: str,
        control_topic: str,
        window_s: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._consumer = consumer
        # Watermark queries go through a second, idle client: on the reader's own connection they
        # would queue behind its long-poll fetch (a broker answers one connection in order).
        self._probe = probe
        self._topics = (results_topic, control_topic)
        self._results_topic = results_topic
        self._window_s = window_s
        self._finished = _ExpiringIds(window_s, clock)
        self._cancelled = _ExpiringIds(window_s, clock)
        self._clock = clock
        self._lock = threading.Lock()
        self._listeners: list[CancelListener] = []
        self._partitions: list[TopicPartition] = []
        # Next offset to read per partition, tracked here: librdkafka's position() stays unset
        # for a partition that was assigned at its end and has not received a record since.
        self._positions: dict[tuple[str, int], int] = {}
        self._catch_up_targets: dict[tuple[str, int], int] | None = None
        self._caught_up = threading.Event()
        self._catch_up_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Assign every partition from ``window_s`` ago and start reading in the background."""
        try:
            self._partitions = with_metadata_retries(self._start_positions, METADATA_TIMEOUT_S)
        except KafkaException as exc:
            raise KafkaUnavailable(f"cannot read {', '.join(self._topics)}: {exc}") from exc
        self._consumer.assign(self._partitions)
        self._thread = threading.Thread(target=self._run, name="sdagent-ledger", daemon=True)
        self._thread.start()
        log.info("ledger.started", partitions=len(self._partitions), window_s=self._window_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._consumer.close()
        self._probe.close()

    # --- queries -----------------------------------------------------------------------------

    def finished(self, job_id: str) -> Status | None:
        """The terminal status of ``job_id`` if any agent answered it within the window."""
        with self._lock:
            return self._finished.get(job_id)  # type: ignore[return-value]

    def cancelled(self, job_id: str) -> bool:
        with self._lock:
            return self._cancelled.get(job_id) is not None

    def record_finished(self, job_id: str, status: Status) -> None:
        """Remember this agent's own answer at once, before the reader sees it come back."""
        with self._lock:
            self._finished.add(job_id, status)

    def on_cancel(self, listener: CancelListener) -> None:
        """Call ``listener(job_id)`` from the reader thread for every cancel request."""
        self._listeners.append(listener)

    def wait_caught_up(self, timeout_s: float) -> bool:
        """Block until everything produced before this call has been read; False on timeout.

        Used before running a job that may be a redelivery, so a result another agent produced
        just before it lost the partition is seen.
        """
        targets = self._high_watermarks()
        with self._catch_up_lock:
            self._caught_up.clear()
            self._catch_up_targets = targets
        return self._caught_up.wait(timeout_s)

    # --- reader thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._consumer.poll(POLL_S)
                if message is not None and message.error() is None:
                    self._take(message)
                    topic, partition, offset = position(message)
                    self._positions[(topic, partition)] = offset + 1
                self._check_caught_up()
            except Exception:  # keep reading: a bad record must not blind the agent
                log.exception("ledger.read_failed")
                self._stop.wait(1.0)

    def _take(self, message) -> None:
        if message.topic() == self._results_topic:
            status = terminal_status(message.headers())
            if status is not None and message.key():
                with self._lock:
                    self._finished.add(message.key().decode(), status)
            return
        job_id = _cancelled_job_id(message.value())
        if job_id is None:
            log.warning("ledger.bad_control_record", offset=message.offset())
            return
        with self._lock:
            self._cancelled.add(job_id)
        log.info("job.cancel_seen", job_id=job_id)
        for listener in self._listeners:
            listener(job_id)

    def _check_caught_up(self) -> None:
        with self._catch_up_lock:
            targets = self._catch_up_targets
            if targets is None:
                return
            for partition, target in targets.items():
                if self._positions.get(partition, 0) < target:
                    return
            self._catch_up_targets = None
            self._caught_up.set()

    def _high_watermarks(self) -> dict[tuple[str, int], int]:
        marks = {}
        for tp in self._partitions:
            _low, high = self._probe.get_watermark_offsets(tp, timeout=METADATA_TIMEOUT_S, cached=False)
            marks[(tp.topic, tp.partition)] = high
        return marks

    def _start_positions(self) -> list[TopicPartition]:
        metadata = self._consumer.list_topics(timeout=METADATA_TIMEOUT_S)
        since_ms = int((self._clock() - self._window_s) * 1000)
        wanted = []
        for topic in self._topics:
            if topic not in metadata.topics or metadata.topics[topic].error is not None:
                raise KafkaUnavailable(f"topic {topic} does not exist; run `sdagent topics create`")
            wanted += [TopicPartition(topic, p, since_ms) for p in metadata.topics[topic].partitions]
        starts = []
        for tp in self._consumer.offsets_for_times(wanted, timeout=METADATA_TIMEOUT_S):
            if tp.offset < 0:  # no record that recent: start at the end
                _low, tp.offset = self._consumer.get_watermark_offsets(tp, timeout=METADATA_TIMEOUT_S)
            self._positions[(tp.topic, tp.partition)] = tp.offset
            starts.append(TopicPartition(tp.topic, tp.partition, tp.offset))
        return starts


def terminal_status(headers) -> Status | None:
    for name, value in headers or ():
        if name == STATUS_HEADER:
            return _TERMINAL_HEADER_VALUES.get(value)
    return None


def _cancelled_job_id(raw: bytes | None) -> str | None:
    try:
        request = json.loads(raw or b"")
    except ValueError:
        return None
    if not isinstance(request, dict) or request.get("type") != "cancel":
        return None
    job_id = request.get("job_id")
    return job_id if isinstance(job_id, str) and job_id else None
