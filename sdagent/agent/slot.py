"""The one job an agent runs at a time, on its own thread, and how often a record's path raised.

Both intakes (partition-bound and share-group) start jobs here, take them back here and count
the attempts of a record that raised here; they differ only in how a record is taken from Kafka
and how it is given back.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from sdagent.agent.runner import JobControl, JobRunner, Outcome
from sdagent.kafka.records import Delivery

log = structlog.get_logger(__name__)

MAX_REMEMBERED_CRASHES = 1024
RUN_TIME_WEIGHT = 0.2  # of the latest job in the moving average of run times


@dataclass(frozen=True)
class Load:
    """What an agent holds, for load-aware routing (its beacon)."""

    queued: int  # jobs held: read ahead and running
    backlog_s: float  # about how long until it could start one more
    mean_job_s: float  # its moving average of job run times (0 before the first)
    hot_model: str | None = None  # share mode: the model whose topic it has read for a while


@dataclass
class Running:
    delivery: Delivery
    control: JobControl
    future: concurrent.futures.Future[Outcome]
    started_at: float


class JobSlot:
    """Runs one delivery at a time on the job thread; the intake's loop finishes it."""

    def __init__(self, runner: JobRunner, interrupt_backend: Callable[[], None]) -> None:
        self._runner = runner
        self._interrupt_backend = interrupt_backend
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdagent-job")
        self._running: Running | None = None
        self._lock = threading.Lock()  # guards _running against other threads (cancel, hang)
        self.mean_run_s = 0.0  # moving average of this agent's job run times (0 before the first)

    @property
    def running(self) -> Running | None:
        return self._running

    @property
    def busy(self) -> bool:
        return self._running is not None

    def start(self, delivery: Delivery) -> None:
        control = JobControl(None, self._interrupt_backend)
        with self._lock:
            future = self._executor.submit(self._runner.run, delivery, control)
            self._running = Running(delivery, control, future, time.monotonic())

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the running job to end; True when none runs any more."""
        running = self._running
        if running is None:
            return True
        done, _ = concurrent.futures.wait([running.future], timeout=timeout_s)
        return bool(done)

    def take_finished(self) -> Running | None:
        """The job that ended, once, and the slot is free again; None while it runs or when idle."""
        running = self._running
        if running is None or not running.future.done():
            return None
        with self._lock:
            self._running = None
        run_s = time.monotonic() - running.started_at
        self.mean_run_s = (
            run_s if self.mean_run_s == 0 else (1 - RUN_TIME_WEIGHT) * self.mean_run_s + RUN_TIME_WEIGHT * run_s
        )
        return running

    def load(self, waiting: int) -> Load:
        """This slot's load with ``waiting`` more jobs held by the intake."""
        remaining = self.remaining_s() if self.busy else 0.0
        if remaining is None:  # running, no progress yet
            remaining = self.mean_run_s
        return Load(waiting + self.busy, remaining + waiting * self.mean_run_s, self.mean_run_s)

    def abort(self, why: str, job_id: str | None = None) -> None:
        """Interrupt the running job (only if it is ``job_id``, when given); safe from any thread."""
        with self._lock:
            running = self._running
            if running is not None and job_id in (None, running.control.job_id):
                running.control.abort(why)
                log.info("job.abort_requested", job_id=running.control.job_id, why=why)

    def remaining_s(self) -> float | None:
        running = self._running
        return None if running is None else running.control.estimated_remaining_s()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class CrashCounts:
    """How often each record's path raised here, by record id (the oldest are forgotten)."""

    def __init__(self, limit: int = MAX_REMEMBERED_CRASHES) -> None:
        self._counts: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._limit = limit

    def add(self, record_id: str) -> int:
        """Count one more crash of ``record_id``; returns how many it has now."""
        attempts = self._counts.pop(record_id, 0) + 1
        self._counts[record_id] = attempts
        while len(self._counts) > self._limit:
            self._counts.popitem(last=False)
        return attempts

    def set(self, record_id: str, attempts: int) -> None:
        self._counts.pop(record_id, None)
        self._counts[record_id] = attempts

    def forget(self, record_id: str) -> None:
        self._counts.pop(record_id, None)
