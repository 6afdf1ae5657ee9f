"""The Kafka side of the job loop: one member of the fleet's consumer group, one job at a time.

While a job runs on the job thread, every assigned partition is paused and this loop keeps polling,
so the group never sees a slow member however long the job takes (``max.poll.interval.ms`` only
watches this thread). The paused set is tracked here and reconciled after every rebalance, because
librdkafka can leave a partition paused across pause -> assign -> resume (librdkafka #5591).

A job's offset is committed only after its answer is durable (the runner's ``Outcome.COMMIT``).
A partition revoked or lost while its job runs takes the job back: the job is interrupted, answered
``released``, and its offset is left for the partition's next owner.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Protocol

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from sdagent.agent.affinity import pick_next
from sdagent.agent.controls import Controls
from sdagent.agent.runner import JobRunner, Outcome
from sdagent.agent.slot import CrashCounts, JobSlot, Load, Running
from sdagent.errors import KafkaUnavailable
from sdagent.kafka.records import Delivery, model_of, position

log = structlog.get_logger(__name__)

IDLE_POLL_S = 0.1  # how long poll() waits when idle: bounds how fast a stop request is seen
RETRY_LATER_BACKOFF_S = 2.0  # after an answer could not be made durable (broker away)
REVOKE_WAIT_S = 30.0  # how long a rebalance waits for an interrupted job to hand back
COMMITTED_TIMEOUT_S = 5.0
# Read-ahead is also bounded in bytes: a job with an inline init image can weigh megabytes.
READ_AHEAD_BYTES = 8 * 1024 * 1024
# How often the oldest held job may be passed over for one on the loaded model: bounds its wait
# at this many jobs' run time (no switch among them), so affinity never starves a job.
MAX_PASSED_OVER = 4
# How many priority-lane jobs in a row may pass a waiting job of the jobs topic: bounds its wait
# under a flood of priority jobs at this many jobs' run time.
MAX_PRIORITY_STREAK = 8

PartitionKey = tuple[str, int]


class JobIntake(Protocol):
    """What the agent asks of an intake, partition-bound (:class:`Intake`) or share-group
    (:class:`sdagent.agent.share_intake.ShareIntake`)."""

    def start(self) -> None: ...
    def step(self) -> None: ...
    def release_inflight(self, why: str, timeout_s: float = REVOKE_WAIT_S) -> None: ...
    def inflight_remaining_s(self) -> float | None: ...
    def wait_idle(self, timeout_s: float) -> bool: ...
    def close(self) -> None: ...
    def cancel(self, job_id: str) -> None: ...
    def abort_inflight(self, why: str, job_id: str | None = None) -> None: ...
    @property
    def busy(self) -> bool: ...
    def load(self) -> Load: ...
    @property
    def partitions(self) -> frozenset[PartitionKey]: ...  # assigned (empty in a share group)


class Intake:
    """Consumes the jobs topic and hands one job at a time to the runner."""

    def __init__(
        self,
        consumer: Consumer,
        jobs_topic: str,
        runner: JobRunner,
        interrupt_backend: Callable[[], None],
        controls: Controls,
        *,
        read_ahead: int = 256,
        record_attempts: int = 3,
        record_retry_backoff_s: float = 1.0,
        on_assignment: Callable[[frozenset[PartitionKey]], None] | None = None,
        loaded_model: Callable[[], str | None] = lambda: None,
        priority_topic: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._consumer = consumer
        self._jobs_topic = jobs_topic
        self._priority_topic = priority_topic
        self._priority_streak = 0  # priority-lane jobs started in a row while a jobs-topic one waited
        self._runner = runner
        self._slot = JobSlot(runner, interrupt_backend)
        self._controls = controls
        self._read_ahead = read_ahead
        self._record_attempts = record_attempts
        self._record_retry_backoff_s = record_retry_backoff_s
        self._crashes = CrashCounts()
        # Partitions held back until a time, while their head record waits for its next try.
        self._blocked: dict[PartitionKey, float] = {}
        self._on_assignment = on_assignment or (lambda _assigned: None)
        self._loaded_model = loaded_model
        self._oldest_passed_over = 0  # times the job at the head of _held was passed over
        self._clock = clock
        # Records taken from Kafka but not yet run (fetched just before a pause, or to retry here).
        self._held: collections.deque[Delivery] = collections.deque()
        self._assigned: set[PartitionKey] = set()
        self._paused: set[PartitionKey] = set()
        self._pause_unknown: set[PartitionKey] = set()  # newly assigned: librdkafka may keep a pause
        self._fresh: set[PartitionKey] = set()  # assigned, nothing read yet: may redeliver
        self._next_offsets: dict[PartitionKey, int] = {}  # per partition, the next record to read
        self._done_offsets: dict[PartitionKey, int] = {}  # answered, commit not yet accepted
        self._retry_at = 0.0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        topics = [self._jobs_topic] if self._priority_topic is None else [self._priority_topic, self._jobs_topic]
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        log.info("intake.subscribed", topics=topics)

    def step(self) -> None:
        """One turn of the loop: wait a little, poll, finish a done job, start the next one."""
        running = self._slot.busy
        if running:
            self._slot.wait(IDLE_POLL_S)
        # Busy: something runs or could start now. Held records that all wait (a retry backoff, a
        # partition held back) leave the poll its idle wait, or the loop would spin until then.
        busy = running or self._can_start()
        # poll() returns as soon as one record is there; consume(n, timeout) would wait for n of
        # them or the whole timeout. The rest of what is already fetched comes without waiting.
        first = self._consumer.poll(0 if busy else IDLE_POLL_S)
        messages = [] if first is None else [first]
        if first is not None and self._read_ahead > 0:
            messages += self._consumer.consume(self._read_ahead, 0)
        self._finish_if_done()
        for message in messages:
            self._take(message)
        self._reconcile_pause()
        self._start_next()

    def release_inflight(self, why: str, timeout_s: float = REVOKE_WAIT_S) -> None:
        """Interrupt the running job and wait until it is handed back (or answered)."""
        if not self._slot.busy:
            return
        self._slot.abort(why)
        self._slot.wait(timeout_s)
        self._finish_if_done()

    def inflight_remaining_s(self) -> float | None:
        """How long the running job still needs, from its progress; None when idle or unknown."""
        return self._slot.remaining_s()

    def wait_idle(self, timeout_s: float) -> bool:
        """Keep polling (so the group stays healthy) until no job runs, up to ``timeout_s``."""
        deadline = self._clock() + timeout_s
        while self._slot.busy and self._clock() < deadline:
            self.step()
        return not self._slot.busy

    def close(self) -> None:
        """Commit what is done, then leave the group at once so the partitions move now, not
        after a session timeout."""
        self._held.clear()
        self._slot.shutdown()
        self._commit_done(asynchronous=False)
        self._consumer.close()
        log.info("intake.closed")

    @property
    def busy(self) -> bool:
        return self._slot.busy

    def load(self) -> Load:
        return self._slot.load(len(self._held))

    @property
    def partitions(self) -> frozenset[PartitionKey]:
        return frozenset(self._assigned)

    def cancel(self, job_id: str) -> None:
        """Interrupt the running job if it is ``job_id`` (called from the ledger's reader thread)."""
        self.abort_inflight("cancelled", job_id)

    def abort_inflight(self, why: str, job_id: str | None = None) -> None:
        """Interrupt the running job (only if it is ``job_id``, when given); safe from any thread.
        The loop answers or hands it back on its next turn."""
        self._slot.abort(why, job_id)

    # --- records -----------------------------------------------------------------------------

    def _take(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            # Broker-down and similar errors are transient: librdkafka reconnects on its own.
            level = log.error if error.fatal() else log.warning
            level("intake.consumer_error", error=str(error), code=error.code())
            return
        key = (message.topic(), message.partition())
        if key not in self._assigned:
            return  # from a partition revoked during this poll: its next owner reads it
        timestamp_type, timestamp_ms = message.timestamp()
        topic, partition, offset = position(message)
        self._held.append(
            Delivery(
                topic=topic,
                partition=partition,
                offset=offset,
                value=message.value(),
                timestamp_ms=timestamp_ms if timestamp_type else None,
                possibly_redelivered=key in self._fresh,
                model=model_of(message.headers()),
            )
        )
        self._fresh.discard(key)
        self._next_offsets[key] = offset + 1

    def _start_next(self) -> None:
        if self._slot.busy or not self._can_start():
            return
        delivery = self._next_held()
        if delivery is None:
            return
        self._slot.start(delivery)
        self._reconcile_pause()

    def _next_held(self) -> Delivery | None:
        index = self._next_priority()
        if index is not None:
            delivery = self._held[index]
            del self._held[index]
            return delivery
        if self._blocked:  # affinity aside: the oldest of a partition not held back
            index = self._first_unblocked()
            if index is None:
                return None
            delivery = self._held[index]
            del self._held[index]
            return delivery
        index = pick_next(self._held, self._loaded_model(), self._oldest_passed_over, MAX_PASSED_OVER)
        if index == 0:
            self._oldest_passed_over = 0
            return self._held.popleft()
        self._oldest_passed_over += 1  # the oldest stays first, passed over once more
        delivery = self._held[index]
        del self._held[index]
        return delivery

    def _next_priority(self) -> int | None:
        """Where the next job is when the priority lane decides: its oldest held job (of a
        partition not held back), or, once ``MAX_PRIORITY_STREAK`` of them in a row passed a
        waiting jobs-topic job, that job. None: no lane job waits, the usual choice applies."""
        if self._priority_topic is None:
            return None
        self._first_unblocked()  # drops the backoffs that ran out
        free = [i for i, d in enumerate(self._held) if (d.topic, d.partition) not in self._blocked]
        lane = [i for i in free if self._held[i].topic == self._priority_topic]
        others = [i for i in free if self._held[i].topic != self._priority_topic]
        if not lane:
            self._priority_streak = 0
            return None
        if others and self._priority_streak >= MAX_PRIORITY_STREAK:
            self._priority_streak = 0
            return others[0]
        self._priority_streak = self._priority_streak + 1 if others else 0
        return lane[0]

    def _can_start(self) -> bool:
        """A held record could start now: no hold, no retry wait, and one whose partition is not
        held back."""
        if not self._held or self._controls.held or self._clock() < self._retry_at:
            return False
        return not self._blocked or self._first_unblocked() is not None

    def _first_unblocked(self) -> int | None:
        """Where the oldest held record of a partition not held back is (in order within each
        partition); backoffs that ran out are dropped on the way."""
        now = self._clock()
        self._blocked = {key: until for key, until in self._blocked.items() if until > now}
        return next((index for index, d in enumerate(self._held) if (d.topic, d.partition) not in self._blocked), None)

    def _finish_if_done(self) -> None:
        inflight = self._slot.take_finished()
        if inflight is None:
            return
        delivery = inflight.delivery
        key = (delivery.topic, delivery.partition)
        outcome: Outcome | None
        try:
            outcome = inflight.future.result()
        except Exception as exc:  # whatever the record's path raised: bounded tries, then a dead letter
            outcome = self._after_crash(delivery, exc)
        if outcome in (Outcome.COMMIT, Outcome.RELEASED):
            self._crashes.forget(delivery.record_id)
        if outcome is Outcome.COMMIT and key in self._assigned:
            self._commit(delivery)
        elif outcome is Outcome.RETRY_LATER and key in self._assigned:
            self._held.appendleft(delivery)
            self._retry_at = self._clock() + RETRY_LATER_BACKOFF_S
        self._reconcile_pause()

    def _after_crash(self, delivery: Delivery, error: Exception) -> Outcome | None:
        """Try the record again later on its own partition (the others go on), or give it up once
        it raised ``record_attempts`` times. None: it waits, held, for its next try."""
        attempts = self._crashes.add(delivery.record_id)
        if attempts >= self._record_attempts:
            outcome = poison_or_retry_later(self._runner, delivery, error, attempts)
            if outcome is Outcome.RETRY_LATER:
                self._crashes.set(delivery.record_id, attempts - 1)  # given up with the next try
            return outcome
        log_record_raised(delivery, error, attempts, self._record_attempts)
        key = (delivery.topic, delivery.partition)
        if key in self._assigned:
            self._held.appendleft(delivery)
            self._blocked[key] = self._clock() + self._record_retry_backoff_s * 2 ** (attempts - 1)
        return None

    def _commit(self, delivery: Delivery) -> None:
        self._done_offsets[(delivery.topic, delivery.partition)] = delivery.offset + 1
        self._commit_done(asynchronous=True)

    def _commit_done(self, *, asynchronous: bool) -> None:
        if not self._done_offsets:
            return
        offsets = [
            TopicPartition(topic, partition, offset) for (topic, partition), offset in self._done_offsets.items()
        ]
        try:
            if asynchronous:  # two calls: the client's stubs type each mode on its own
                self._consumer.commit(offsets=offsets, asynchronous=True)
            else:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            self._done_offsets.clear()
        except Exception as exc:  # retried with the next commit; at worst the job is redelivered
            log.warning("intake.commit_failed", offsets=[tp.offset for tp in offsets], error=str(exc))

    # --- pausing -----------------------------------------------------------------------------

    def _reconcile_pause(self) -> None:
        """Pause every partition while intake is held (draining, backend down...) or once
        ``read_ahead`` records wait locally; resume when a quarter of them is used up.

        Records read ahead sit in this agent only: an assigned partition is read by no other
        member, so holding a few costs the fleet nothing and spares a pause and resume per job,
        which costs a fetch round (up to fetch.wait.max.ms) each time. ``read_ahead = 0`` pauses
        whenever a job runs.
        """
        if self._controls.held or self._clock() < self._retry_at:
            want_paused = True
        elif self._read_ahead == 0:
            want_paused = self._slot.busy or bool(self._held)
        elif self._paused:
            # Resume once a quarter of the read-ahead is used up: the jobs still held then cover the
            # first fetch after resume, which waits for the fetch already at the broker (resuming
            # at half, bench/pipeline.py still ran dry 6 times in 2000 zero-latency jobs).
            want_paused = len(self._held) > self._read_ahead * 3 // 4 or self._held_bytes() > READ_AHEAD_BYTES * 3 // 4
        else:
            want_paused = len(self._held) >= self._read_ahead or self._held_bytes() >= READ_AHEAD_BYTES
        if want_paused:
            missing = self._assigned - self._paused
            if missing:
                self._consumer.pause(_partitions(missing))
                self._paused |= missing
                self._pause_unknown -= missing
        elif self._paused or self._pause_unknown:
            partitions = _partitions((self._paused | self._pause_unknown) & self._assigned)
            self._consumer.resume(partitions)
            self._paused.clear()
            self._pause_unknown.clear()
            self._wake_fetcher(partitions)

    def _held_bytes(self) -> int:
        return sum(len(delivery.value or b"") for delivery in self._held)

    def _wake_fetcher(self, partitions: list[TopicPartition]) -> None:
        # Measured with librdkafka 2.16 (bench/pipeline.py, docs/delivery.md): after a pause,
        # resume() alone can leave the next fetch 0.2-0.8 s late. Seeking every resumed partition
        # to where it already stands restarts its fetcher at once: the next record we would read,
        # or for a partition not read since assignment, its committed offset (else the beginning,
        # as auto.offset.reset=earliest would).
        unread = [tp for tp in partitions if (tp.topic, tp.partition) not in self._next_offsets]
        starts = dict(self._next_offsets)
        if unread:
            try:
                for tp in self._consumer.committed(unread, timeout=COMMITTED_TIMEOUT_S):
                    starts[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            except KafkaException as exc:  # only a latency cost: the fetcher wakes up by itself
                log.warning("intake.committed_lookup_failed", error=str(exc))
        for tp in partitions:
            start = starts.get((tp.topic, tp.partition))
            if start is not None:
                self._consumer.seek(TopicPartition(tp.topic, tp.partition, start))

    # --- rebalance callbacks (run inside poll) -----------------------------------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned |= keys
        self._fresh |= keys
        # librdkafka may hand a partition back still paused (librdkafka #5591): the next reconcile
        # pauses it while a job runs, or resumes it explicitly.
        self._paused -= keys
        self._pause_unknown |= keys
        log.info("intake.assigned", partitions=sorted(p for _, p in keys), total=len(self._assigned))
        self._on_assignment(frozenset(self._assigned))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._give_back(partitions, lost=False)

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._give_back(partitions, lost=True)

    def _give_back(self, partitions: list[TopicPartition], *, lost: bool) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        inflight = self._slot.running
        if inflight is not None and (inflight.delivery.topic, inflight.delivery.partition) in keys:
            self._settle_inflight_of_revoked(inflight, lost=lost)
        self._held = collections.deque(d for d in self._held if (d.topic, d.partition) not in keys)
        self._assigned -= keys
        self._paused -= keys
        self._pause_unknown -= keys
        self._fresh -= keys
        for key in keys:
            self._next_offsets.pop(key, None)
            self._done_offsets.pop(key, None)
            self._blocked.pop(key, None)  # its next owner tries the record afresh
        log.info("intake.revoked", lost=lost, partitions=sorted(p for _, p in keys), total=len(self._assigned))
        self._on_assignment(frozenset(self._assigned))

    def _settle_inflight_of_revoked(self, inflight: Running, *, lost: bool) -> None:
        inflight.control.abort("revoked")
        if not self._slot.wait(REVOKE_WAIT_S):
            # Still running: its answer, if it comes, is recognised by job id on redelivery.
            log.error("intake.revoked_job_still_running", offset=inflight.delivery.offset)
            return
        self._slot.take_finished()
        outcome = inflight.future.result() if inflight.future.exception() is None else Outcome.RELEASED
        if outcome is Outcome.COMMIT and not lost:
            # Answered just before the revoke: commit now, while the partition is still ours.
            self._done_offsets[(inflight.delivery.topic, inflight.delivery.partition)] = inflight.delivery.offset + 1
            self._commit_done(asynchronous=False)


def _partitions(keys: set[PartitionKey]) -> list[TopicPartition]:
    return [TopicPartition(topic, partition) for topic, partition in sorted(keys)]


def poison_or_retry_later(runner: JobRunner, delivery: Delivery, error: Exception, attempts: int) -> Outcome:
    """Dead-letter a record that raised ``attempts`` times; RETRY_LATER when not even that is
    durable (the broker is away): it is then tried once more later."""
    try:
        return runner.poison(delivery, error, attempts)
    except KafkaUnavailable as exc:
        log.warning("intake.poison_not_durable", offset=delivery.offset, error=str(exc))
        return Outcome.RETRY_LATER


def log_record_raised(delivery: Delivery, error: Exception, attempt: int, of: int) -> None:
    log.error("intake.record_raised", offset=delivery.offset, partition=delivery.partition, attempt=attempt, of=of,
              error=f"{type(error).__name__}: {error}", exc_info=error)  # fmt: skip
