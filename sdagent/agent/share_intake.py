"""The share-group side of the job loop (KIP-932): any idle agent takes the fleet's next job.

Every agent of the share group reads the same partitions; the broker hands each record to one
of them under a lock and counts its deliveries. An agent polls only while it has nothing to run,
so it never sits on a job another GPU could start (in explicit acknowledgement mode a poll with
records still unacknowledged is refused anyway). What it takes it settles one way:

- ACCEPT once the answer is durable (the runner's ``Outcome.COMMIT``), or once it is dead-lettered;
- ACCEPT too for a job taken back by a drain, a spot notice or a hang: the runner has queued it
  again (attempt counted) and answered ``released``;
- RELEASE for a retry the agent cannot wait for, and for the records a poll handed over beyond
  the one job it will run: another agent gets them within a fetch. Every hand-back is a
  delivery, and the broker drops a record silently once its deliveries reach the group's
  ``share.delivery.count.limit``: a record whose next delivery would be its last is copied back to
  its topic (a fresh count; the job id is unchanged, so the ledger still knows it) and accepted;
- a record whose path raised is released for the fleet to try again, and dead-lettered once it
  raised on its ``record_attempts``-th delivery (the broker's delivery count is the attempt count,
  fleet-wide: holding it here for a backoff would hold up this agent, which cannot poll meanwhile);
  one the fleet took ``delivery_limit`` times without an answer (agents killed or hung on it) is
  dead-lettered unrun, because the broker would drop it silently at its next release (it archives
  a record at the group's ``share.delivery.count.limit``).

Each lane (the priority lane, then the jobs topic) is a share group of its own with one
consumer per agent, polled in that order while idle; after ``MAX_PRIORITY_STREAK`` priority jobs
in a row the jobs topic is polled first once, so a flood of priority jobs cannot starve it.

The lock is not renewed (the Python client has no RENEW): a job that outruns it may start on a
second agent, and the late ACCEPT is refused by the broker; both answers carry the same job id
and the ledger keeps the first. Long kinds belong on a share group whose lock fits them
(docs/share-groups.md).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from confluent_kafka import AcknowledgeType, KafkaException, Message

from sdagent.agent.controls import Controls
from sdagent.agent.intake import (
    IDLE_POLL_S,
    MAX_PRIORITY_STREAK,
    RETRY_LATER_BACKOFF_S,
    REVOKE_WAIT_S,
    log_record_raised,
    poison_or_retry_later,
)
from sdagent.agent.lanes import Lane
from sdagent.agent.model_lanes import ModelLanes
from sdagent.agent.runner import JobRunner, Outcome
from sdagent.agent.slot import JobSlot, Load
from sdagent.errors import KafkaUnavailable, RecordRefused
from sdagent.kafka.records import Delivery, Headers, model_of, position

log = structlog.get_logger(__name__)

COMMIT_TIMEOUT_S = 10.0
# A retry here must start this long before the record's lock runs out, or it goes back to the fleet.
LOCK_MARGIN_S = 1.0


@dataclass(frozen=True)
class _Acquired:
    message: Message
    lane: Lane
    deliveries: int  # the broker's delivery count, this one included
    at: float  # about when its lock started


CopyBack = Callable[[str, bytes | None, bytes | None, Headers], None]


class ShareIntake:
    """Takes one job at a time from the fleet's share group and hands it to the runner."""

    def __init__(
        self,
        lanes: Sequence[Lane],
        runner: JobRunner,
        interrupt_backend: Callable[[], None],
        controls: Controls,
        *,
        lock_duration_s: float,
        delivery_limit: int,
        copy_back: CopyBack,
        record_attempts: int = 3,
        prepare: Callable[[], None] = lambda: None,
        model_lanes: ModelLanes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lanes = list(lanes)  # the one taken from first first
        self._models = model_lanes  # model topics (affinity), polled around the jobs topic
        self._lane_streak = 0  # jobs in a row from the first lane
        self._prepare = prepare  # sets the groups' configuration before this member joins
        self._runner = runner
        self._slot = JobSlot(runner, interrupt_backend)
        self._controls = controls
        self._lock_duration_s = lock_duration_s
        self._delivery_limit = delivery_limit
        self._copy_back = copy_back
        self._record_attempts = record_attempts
        self._clock = clock
        # The one record acquired and not yet running: its answer could not be made durable and
        # it waits to run again here (the broker is away, so it could not go to another agent).
        self._waiting: Delivery | None = None
        self._waiting_until = 0.0
        self._acquired: dict[str, _Acquired] = {}  # by record id: what this agent holds
        self._idle_since = clock()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._prepare()
        for lane in self._lanes:
            lane.join()

    def step(self) -> None:
        """One turn: wait on the running job, settle it once done, take the next one when idle."""
        if self._slot.busy:
            self._slot.wait(IDLE_POLL_S)
        self._finish_if_done()
        if self._slot.busy:
            return
        if self._waiting is not None:
            self._start_waiting()
            return
        if self._controls.held:
            self._leave_while_held()
            time.sleep(IDLE_POLL_S)
            return
        for lane in self._lanes:
            if lane.consumer is None:
                lane.join()
        if self._models is not None:
            self._models.follow(self._runner.current_model, self._clock() - self._idle_since, self._holding)
        self._take(*self._poll())

    def release_inflight(self, why: str, timeout_s: float = REVOKE_WAIT_S) -> None:
        """Interrupt the running job and wait until it is handed back (or answered)."""
        if self._slot.busy:
            self._slot.abort(why)
            self._slot.wait(timeout_s)
            self._finish_if_done()
        self._release_waiting()

    def inflight_remaining_s(self) -> float | None:
        return self._slot.remaining_s()

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = self._clock() + timeout_s
        while self._slot.busy and self._clock() < deadline:
            self._slot.wait(IDLE_POLL_S)
            self._finish_if_done()
        return not self._slot.busy

    def close(self) -> None:
        """Settle what is acquired (a job still running after the drain is released), then leave
        the group: what this agent held goes to the others at once, not at lock expiry."""
        self.release_inflight("stopping")
        self._slot.shutdown()
        self._finish_if_done()
        self._leave_lanes()
        log.info("intake.closed", mode="share")

    def _leave_while_held(self) -> None:
        """Leave the group while intake is held (draining, WebUI down, GPU lost), and join again
        once it is not. Measured: a share consumer whose last poll came back empty keeps its fetch
        open and acquires the next job that arrives though nobody polls it, holding it from the
        agents that could run it; one that is closed holds nothing (docs/share-groups.md)."""
        if self._acquired or all(lane.consumer is None for lane in self._lanes):
            return
        log.info("intake.left_while_held", reason=self._controls.reason)
        self._leave_lanes()

    def _leave_lanes(self) -> None:
        for lane in self._lanes:
            lane.leave()
        if self._models is not None:
            self._models.leave_all()

    def _holding(self, lane: Lane) -> bool:
        return any(acquired.lane is lane for acquired in self._acquired.values())

    @property
    def busy(self) -> bool:
        return self._slot.busy

    def load(self) -> Load:
        load = self._slot.load(0)  # it never holds a job it is not running
        hot_model = self._models.routable_model(self._runner.current_model) if self._models is not None else None
        return dataclasses.replace(load, hot_model=hot_model)

    @property
    def partitions(self) -> frozenset[tuple[str, int]]:
        return frozenset()  # the share group's partitions belong to every member

    def cancel(self, job_id: str) -> None:
        self._slot.abort("cancelled", job_id)

    def abort_inflight(self, why: str, job_id: str | None = None) -> None:
        self._slot.abort(why, job_id)

    # --- taking records ----------------------------------------------------------------------

    def _poll_order(self) -> list[Lane]:
        """The priority lane, the loaded model's topic, the jobs topic, then the model topics
        being left or swept; after ``MAX_PRIORITY_STREAK`` priority jobs in a row, the priority
        lane goes last once."""
        first, rest = self._lanes[:1], self._lanes[1:]
        if self._models is not None:
            rest = self._models.before_jobs + rest + self._models.after_jobs
        return rest + first if self._lane_streak >= MAX_PRIORITY_STREAK else first + rest

    def _poll(self) -> tuple[Lane, list[Message]]:
        """Poll the lanes in order until one brings records. One of them waits the idle wait:
        the loaded model's topic if any (a job is routed there only when this agent is free, so
        it must start at once), else the last; what reaches the others meanwhile waits a turn."""
        order = self._poll_order()
        hot = self._models.before_jobs if self._models is not None else []
        waiting_lane = hot[0] if hot else order[-1]
        for lane in order:
            messages = self._poll_lane(lane, IDLE_POLL_S if lane is waiting_lane else 0.0)
            if messages:
                first = lane is self._lanes[0] and len(order) > 1
                self._lane_streak = self._lane_streak + 1 if first else 0
                return lane, messages
            if self._models is not None:
                self._models.polled_empty(lane, self._holding)
        return order[-1], []

    def _poll_lane(self, lane: Lane, timeout_s: float) -> list[Message]:
        if lane.consumer is None:
            return []
        try:
            return list(lane.consumer.poll(timeout_s))
        except KafkaException as exc:  # broker away and the like: the client reconnects by itself
            log.warning("intake.poll_failed", lane=lane.name, error=str(exc))
            time.sleep(IDLE_POLL_S)
            return []

    def _take(self, lane: Lane, messages: list[Message]) -> None:
        records = []
        for message in messages:
            error = message.error()
            if error is not None:
                level = log.error if error.fatal() else log.warning
                level("intake.consumer_error", error=str(error), code=error.code())
            else:
                records.append(message)
        if not records:
            return
        deliveries = [self._acquire(lane, message) for message in records]
        delivery, extras = deliveries[0], deliveries[1:]
        if extras:
            # The broker hands over whole producer batches: give the rest back at once.
            log.info("intake.extra_records_released", count=len(extras))
            for extra in extras:
                self._give_back(extra)
                del self._acquired[extra.record_id]
            self._commit(lane)
        count = self._acquired[delivery.record_id].deliveries
        if count >= self._delivery_limit:
            self._settle(delivery, self._give_up(delivery, count))
            return
        self._slot.start(delivery)

    def _acquire(self, lane: Lane, message: Message) -> Delivery:
        delivery = self._delivery(message)
        self._acquired[delivery.record_id] = _Acquired(message, lane, message.delivery_count() or 1, self._clock())
        return delivery

    def _delivery(self, message: Message) -> Delivery:
        topic, partition, offset = position(message)
        timestamp_type, timestamp_ms = message.timestamp()
        return Delivery(
            topic=topic,
            partition=partition,
            offset=offset,
            value=message.value(),
            timestamp_ms=timestamp_ms if timestamp_type else None,
            # Delivered before: another agent may have answered it, or may still be running it.
            possibly_redelivered=(message.delivery_count() or 1) > 1,
            model=model_of(message.headers()),
        )

    def _give_up(self, delivery: Delivery, deliveries: int) -> Outcome:
        error = RuntimeError(f"taken {deliveries} times by the fleet without an answer (agents killed or hung on it)")
        log.error("intake.delivery_limit", offset=delivery.offset, deliveries=deliveries, limit=self._delivery_limit)
        return poison_or_retry_later(self._runner, delivery, error, deliveries)

    # --- settling ----------------------------------------------------------------------------

    def _finish_if_done(self) -> None:
        finished = self._slot.take_finished()
        if finished is None:
            return
        delivery = finished.delivery
        try:
            outcome = finished.future.result()
        except Exception as exc:  # whatever the record's path raised: bounded tries, then a dead letter
            outcome = self._after_crash(delivery, exc)
        self._settle(delivery, outcome)
        self._idle_since = self._clock()

    def _after_crash(self, delivery: Delivery, error: Exception) -> Outcome:
        """Dead-letter the record once it raised on its ``record_attempts``-th delivery; else
        give it back for the fleet's next try."""
        acquired = self._acquired.get(delivery.record_id)
        attempt = acquired.deliveries if acquired else 1
        if attempt >= self._record_attempts:
            return poison_or_retry_later(self._runner, delivery, error, attempt)
        log_record_raised(delivery, error, attempt, self._record_attempts)
        return Outcome.RELEASED

    def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        if outcome is Outcome.RETRY_LATER:  # the answer was not durable: the broker is away
            self._hold_for_retry(delivery, RETRY_LATER_BACKOFF_S)
            return
        if outcome is Outcome.COMMIT:
            self._acknowledge(delivery, AcknowledgeType.ACCEPT)
        else:
            self._give_back(delivery)
        acquired = self._acquired.pop(delivery.record_id, None)
        failed = self._commit(acquired.lane) if acquired else "not acquired here"
        if failed and outcome is Outcome.COMMIT:
            held_s = None if acquired is None else round(self._clock() - acquired.at, 1)
            # Its lock ran out (or the broker restarted): another agent may run it again; the
            # ledger recognises the job id there. Nothing is lost, at worst it is answered twice.
            log.warning("intake.accept_refused", offset=delivery.offset, held_s=held_s,
                        lock_s=self._lock_duration_s, error=failed)  # fmt: skip

    def _hold_for_retry(self, delivery: Delivery, backoff_s: float) -> None:
        acquired = self._acquired.get(delivery.record_id)
        lock_left = (acquired.at if acquired else self._clock()) + self._lock_duration_s - self._clock()
        if backoff_s + LOCK_MARGIN_S >= lock_left:
            self._settle(delivery, Outcome.RELEASED)  # its next try is the fleet's
            return
        self._waiting, self._waiting_until = delivery, self._clock() + backoff_s

    def _start_waiting(self) -> None:
        if self._controls.held:
            self._release_waiting()
            return
        if self._clock() < self._waiting_until:
            time.sleep(min(IDLE_POLL_S, max(0.0, self._waiting_until - self._clock())))
            return
        delivery, self._waiting = self._waiting, None
        if delivery is not None:
            self._slot.start(delivery)

    def _release_waiting(self) -> None:
        delivery, self._waiting = self._waiting, None
        if delivery is not None:
            self._settle(delivery, Outcome.RELEASED)

    def _give_back(self, delivery: Delivery) -> None:
        """RELEASE, unless the next delivery would be the record's last: then a copy goes back
        to its topic and the record is accepted (RELEASE anyway if the copy cannot be made)."""
        acquired = self._acquired.get(delivery.record_id)
        if acquired is None or acquired.deliveries + 1 < self._delivery_limit:
            self._acknowledge(delivery, AcknowledgeType.RELEASE)
            return
        message = acquired.message
        try:
            self._copy_back(delivery.topic, message.key(), message.value(), _headers_of(message))
        except (KafkaUnavailable, RecordRefused) as exc:
            log.warning("intake.copy_back_failed", offset=delivery.offset, error=str(exc))
            self._acknowledge(delivery, AcknowledgeType.RELEASE)
            return
        log.info("intake.copied_back", offset=delivery.offset, deliveries=acquired.deliveries)
        self._acknowledge(delivery, AcknowledgeType.ACCEPT)

    def _acknowledge(self, delivery: Delivery, kind: AcknowledgeType) -> None:
        acquired = self._acquired.get(delivery.record_id)
        consumer = acquired.lane.consumer if acquired else None
        if consumer is None:  # left the group: the broker has taken the record back
            return
        try:
            consumer.acknowledge_offset(delivery.topic, delivery.partition, delivery.offset, kind)
        except Exception as exc:  # no longer in flight (lock expired, member fenced): the broker decides
            log.warning("intake.acknowledge_failed", offset=delivery.offset, error=str(exc))

    def _commit(self, lane: Lane) -> str | None:
        """Send the lane's acknowledgements; the first refusal, as text, or None when all were taken."""
        if lane.consumer is None:
            return "not in the group"
        try:
            results = lane.consumer.commit_sync(COMMIT_TIMEOUT_S)
        except KafkaException as exc:
            return str(exc)
        refusals = [str(error) for error in results.values() if error is not None]
        return refusals[0] if refusals else None


def _headers_of(message: Message) -> Headers:
    headers = message.headers() or []
    return list(headers.items() if isinstance(headers, dict) else headers)
