"""Runs one job from the jobs topic to its durable answer.

:meth:`JobRunner.run` takes one Kafka record and returns what the intake loop must do with its
offset: commit it (the job is answered: succeeded, failed, rejected, expired, cancelled, or it was
already answered before), leave it for another agent (released), or try it again here later (the
answer could not be produced durably). It never raises for a bad job.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import structlog
import tenacity

from sdagent.agent.config import RetryConfig
from sdagent.backends.base import Backend, Generation
from sdagent.cache.serving import CachedModels, UncachedModels
from sdagent.errors import (
    TRANSIENT_ERRORS,
    BackendUnavailable,
    JobAborted,
    JobFailed,
    JobRejected,
    KafkaUnavailable,
    RecordRefused,
)
from sdagent.jobs import Job, Limits, Progress, Status, StatusEvent, parse_job, peek_caller
from sdagent.kafka.ledger import JobLedger
from sdagent.kafka.publisher import StatusPublisher
from sdagent.kafka.records import Delivery, ReplyAddress
from sdagent.kafka.replies import ReplyPolicy
from sdagent.metrics.jobs import JobMetrics
from sdagent.storage.inputs import InputResolver
from sdagent.storage.outputs import OutputStore

log = structlog.get_logger(__name__)

READY_POLL_S = 0.5  # how often a job waiting for its WebUI checks whether it was taken back
POISON_REASON = "poison_record"  # the agent itself kept raising on the record


class JobWatch(Protocol):
    """Who watches a running job for hangs: the WebUI supervisor, or nobody (in-process backends)."""

    def watch_job(self, job_id: str) -> AbstractContextManager: ...

    def job_progress(self) -> None: ...

    def wait_ready(self, timeout: float) -> bool: ...


class _NoWatch:
    def watch_job(self, job_id: str) -> AbstractContextManager:
        return contextlib.nullcontext()

    def job_progress(self) -> None:
        pass

    def wait_ready(self, timeout: float) -> bool:
        return True


class Outcome(enum.Enum):
    COMMIT = "commit"  # answered, or answered before: move past it
    RELEASED = "released"  # taken back (revoked, drained): another agent runs it
    RETRY_LATER = "retry_later"  # the answer could not be made durable: run it again here


class JobControl:
    """How the agent follows and takes back a running job: its progress, and abort once with why."""

    def __init__(
        self, job_id: str | None, interrupt: Callable[[], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.job_id = job_id
        self._interrupt = interrupt
        self._clock = clock
        self.event = threading.Event()
        self.why: str | None = None
        self._started_at: float | None = None
        self._fraction = 0.0

    def progressed(self, step: int, steps: int) -> None:
        if self._started_at is None:
            self._started_at = self._clock()
        self._fraction = step / steps if steps else 1.0

    def estimated_remaining_s(self) -> float | None:
        """Time left by linear extrapolation of progress so far; None before any progress."""
        if self._started_at is None or self._fraction <= 0:
            return None
        elapsed = self._clock() - self._started_at
        return elapsed * (1 - self._fraction) / self._fraction

    def abort(self, why: str) -> None:
        if self.event.is_set():
            return
        self.why = why
        self.event.set()
        self._interrupt()

    def check(self) -> None:
        if self.event.is_set():
            raise JobAborted(self.why or "aborted")

    def sleep(self, seconds: float) -> None:
        """Back off for ``seconds``, waking at once (with JobAborted) when the job is taken back."""
        if self.event.wait(seconds):
            raise JobAborted(self.why or "aborted")


@dataclass
class _Timings:
    started: float = field(default_factory=time.perf_counter)
    values: dict[str, float] = field(default_factory=dict)

    def measure(self, name: str, since: float) -> None:
        self.values[name] = round((time.perf_counter() - since) * 1000, 3)


class JobRunner:
    """Runs jobs one at a time on one backend; the intake loop owns the Kafka side."""

    def __init__(
        self,
        backend: Backend,
        inputs: InputResolver,
        outputs: OutputStore,
        publisher: StatusPublisher,
        ledger: JobLedger,
        *,
        limits: Limits,
        retry: RetryConfig,
        catch_up_timeout_s: float,
        progress_interval_s: float,
        watch: JobWatch | None = None,
        backend_ready_wait_s: float = 300.0,
        recorder: JobMetrics | None = None,
        models: CachedModels | UncachedModels | None = None,
        replies: ReplyPolicy | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._backend = backend
        self._inputs = inputs
        self._outputs = outputs
        self._publisher = publisher
        self._ledger = ledger
        self._limits = limits
        self._retry = retry
        self._catch_up_timeout_s = catch_up_timeout_s
        self._progress_interval_s = progress_interval_s
        self._watch = watch or _NoWatch()
        self._backend_ready_wait_s = backend_ready_wait_s
        self._recorder = recorder or JobMetrics(enabled=False)
        self._models = models or UncachedModels()
        self._replies = replies
        self._clock = clock
        # The model the last job ran on, as jobs name it: the intake prefers held jobs for it.
        self.current_model: str | None = None
        self.mean_switch_s = 0.0  # moving average of model switches here (0 before the first)

    def run(self, delivery: Delivery, control: JobControl) -> Outcome:
        try:
            try:
                job = parse_job(delivery.value, self._limits, default_job_id=delivery.record_id)
            except JobRejected as rejection:
                return self._reject(delivery, rejection)
            control.job_id = job.job_id
            with structlog.contextvars.bound_contextvars(job_id=job.job_id):
                return self._run_valid(job, delivery, control)
        except KafkaUnavailable as exc:
            log.warning("job.answer_not_durable", job_id=control.job_id, offset=delivery.offset, error=str(exc))
            return Outcome.RETRY_LATER

    def poison(self, delivery: Delivery, error: BaseException, attempts: int) -> Outcome:
        """Give up a record whose path raised ``attempts`` times: dead-letter it with the reason,
        the exception and its source offset, tell the caller where one can be told, commit it.
        Raises KafkaUnavailable only when the dead letter itself cannot be made durable."""
        message = f"the agent raised {type(error).__name__} on each of {attempts} attempts: {error}"
        caller = peek_caller(delivery.value)
        job_id = caller.get("job_id")
        log.error("job.poison_record", job_id=job_id, offset=delivery.offset, partition=delivery.partition,
                  attempts=attempts, error=message)  # fmt: skip

        def dead_letter(value: bytes | None, why: str) -> None:
            self._publisher.dead_letter(value, delivery.source, POISON_REASON, why, job_id,
                                        exception=type(error).__name__, attempts=attempts)  # fmt: skip

        try:
            dead_letter(delivery.value, message)
        except RecordRefused as refused:  # the record itself is what the broker will not take again
            message = f"{message}; the record could not be copied: {refused}"
            dead_letter(None, message)
        self._recorder.job_finished(Status.FAILED.value, POISON_REASON)
        if job_id is None:
            return Outcome.COMMIT
        event = StatusEvent(job_id=job_id, status=Status.FAILED, correlation_id=caller.get("correlation_id"),
                            reason=POISON_REASON, message=message)  # fmt: skip
        reply_to = caller.get("reply_to")
        reply = (
            ReplyAddress(reply_to, caller.get("reply_partition"), caller.get("correlation_id")) if reply_to else None
        )
        try:
            self._publisher.publish_durably(event, self._allowed(reply))
            self._ledger.record_finished(job_id, Status.FAILED)
        except Exception as exc:  # the dead letter holds the record and the reason: move on
            log.warning("job.poison_answer_not_sent", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
        return Outcome.COMMIT

    def _allowed(self, reply: ReplyAddress | None) -> ReplyAddress | None:
        """``reply`` when the policy lets answers go there, else None."""
        return reply if reply is not None and self._refused(reply) is None else None

    def _refused(self, reply: ReplyAddress) -> str | None:
        return self._replies.refusal(reply.topic, reply.partition) if self._replies is not None else None

    def _run_valid(self, job: Job, delivery: Delivery, control: JobControl) -> Outcome:
        reply = _reply_address(job)
        if reply is not None and (refusal := self._refused(reply)):
            log.warning("job.rejected", reason="bad_reply_to", error=refusal)
            self._publisher.dead_letter(delivery.value, delivery.source, "bad_reply_to", refusal, job.job_id)
            # Answered on the results topic only: the address it named is the problem.
            return self._answer(job, None, Status.REJECTED, reason="bad_reply_to", message=refusal)
        if delivery.possibly_redelivered and not self._ledger.wait_caught_up(self._catch_up_timeout_s):
            log.warning("ledger.catch_up_timeout", timeout_s=self._catch_up_timeout_s)
        answered = self._ledger.finished(job.job_id)
        if answered is not None:
            log.info("job.duplicate_skipped", answered=answered.value, offset=delivery.offset)
            if reply is not None:
                # Tell a waiting caller at once; the results topic keeps its one answer of record.
                message = f"job {job.job_id} was already answered {answered.value}; see the results topic"
                self._publisher.reply_only(
                    self._event(job, Status.REJECTED, reason="duplicate", message=message), reply
                )
            return Outcome.COMMIT
        if self._ledger.cancelled(job.job_id):
            return self._answer(job, reply, Status.CANCELLED, reason="cancelled", message="cancelled before it ran")
        expires_at = job.expires_at(delivery.received_at)
        if expires_at is not None and self._clock() >= expires_at:
            return self._answer(
                job, reply, Status.EXPIRED, reason="expired", message=f"deadline {expires_at.isoformat()} passed"
            )
        if self._waits_before_starting(job):
            self._publisher.publish(self._event(job, Status.ACCEPTED), reply)
        self._recorder.job_started()
        return self._execute(job, delivery, reply, control)

    def _waits_before_starting(self, job: Job) -> bool:
        """Whether anything stands between taking ``job`` and ``started``: its model to load (and
        perhaps stage), its init image to fetch, or its WebUI not ready. Only then does the caller
        hear ``accepted`` first; a job that starts at once goes straight to ``started``, one record
        fewer on the results topic (and the reply topic) for every job of a warm agent."""
        return self.current_model != job.model or job.init_image is not None or not self._watch.wait_ready(0)

    def _execute(self, job: Job, delivery: Delivery, reply: ReplyAddress | None, control: JobControl) -> Outcome:
        timings = _Timings()
        timings.values["queue_wait_ms"] = round((self._clock() - delivery.received_at).total_seconds() * 1000, 3)
        try:
            job = self._with_retries(lambda: self._inputs.resolve(job), control)
            generation = self._with_retries(lambda: self._generate(job, reply, control, timings), control)
            since = time.perf_counter()
            outputs = self._with_retries(lambda: self._outputs.store(job, generation.artifacts), control)
            timings.measure("upload_ms", since)
        except JobAborted as aborted:
            # The backend only knows it was interrupted; the control knows why.
            why = control.why or aborted.why
            if why == "hung" and job.attempt + 1 >= self._retry.max_attempts:
                return self._fail(job, delivery, reply, "hung", f"hung on {job.attempt + 1} WebUIs in a row")
            return self._aborted(job, reply, why)
        except JobFailed as failure:
            return self._fail(job, delivery, reply, failure.reason, str(failure))
        except Exception as exc:  # a bug must fail one job, never the daemon
            log.exception("job.internal_error")
            return self._fail(job, delivery, reply, "internal_error", f"{type(exc).__name__}: {exc}")
        timings.measure("total_ms", timings.started)
        log.info("job.succeeded", outputs=len(outputs), **timings.values)
        return self._answer(
            job, reply, Status.SUCCEEDED, outputs=outputs, info=generation.info, timings_ms=timings.values
        )

    def _generate(self, job: Job, reply: ReplyAddress | None, control: JobControl, timings: _Timings) -> Generation:
        self._wait_backend_ready(control)
        # Pinned until the generation ends: the cache never evicts a model a job runs on.
        with self._models.use(job.model) as model:
            if model.stage_ms is not None:
                timings.values["stage_ms"] = model.stage_ms
            control.check()
            if self._models.take_rescan():
                listed = self._backend.refresh_models()
                log.info("backend.models_refreshed", models=len(listed))
            # The cache and the WebUI may know the model by its full file name ("sd_xl_base_1.0.safetensors").
            name = self._backend.canonical_model(model.name)
            self._switch_if_needed(name, timings)
            self.current_model = job.model
            self._publisher.publish(self._event(job, Status.STARTED), reply)
            since = time.perf_counter()
            control.progressed(0, job.steps)
            served = job if name == job.model else job.model_copy(update={"model": name})
            with self._watch.watch_job(job.job_id):
                generation = self._backend.generate(served, self._progress_reporter(job, reply, control), control.event)
            timings.measure("inference_ms", since)
        control.check()
        return generation

    def _switch_if_needed(self, model: str, timings: _Timings) -> None:
        if self._backend.loaded_model() == model:
            return  # the model stays loaded for the next job that asks for it
        since = time.perf_counter()
        self._backend.switch_model(model)
        timings.measure("switch_ms", since)
        switch_s = timings.values["switch_ms"] / 1000
        self.mean_switch_s = switch_s if not self.mean_switch_s else 0.8 * self.mean_switch_s + 0.2 * switch_s
        log.info("model.switched", model=model, switch_ms=timings.values["switch_ms"])

    def _wait_backend_ready(self, control: JobControl) -> None:
        """While the WebUI restarts (crash, hang), wait for it rather than spend the job's attempts."""
        deadline = time.monotonic() + self._backend_ready_wait_s
        while not self._watch.wait_ready(READY_POLL_S):
            control.check()
            if time.monotonic() >= deadline:
                raise BackendUnavailable(f"the WebUI is not ready after {self._backend_ready_wait_s} s")
        control.check()

    def _with_retries(self, attempt: Callable, control: JobControl):
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._retry.max_attempts),
            wait=tenacity.wait_exponential_jitter(
                multiplier=self._retry.initial_backoff_s, max=self._retry.max_backoff_s
            ),
            retry=tenacity.retry_if_exception_type(TRANSIENT_ERRORS),
            sleep=control.sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        return retrying(attempt)

    def _progress_reporter(
        self, job: Job, reply: ReplyAddress | None, control: JobControl
    ) -> Callable[[int, int], None]:
        # The first event comes one interval into the run: a job faster than that says
        # started and succeeded only, two records fewer for every reader of the results topic.
        last_sent = time.monotonic()

        def report(step: int, steps: int) -> None:
            nonlocal last_sent
            control.progressed(step, steps)
            self._watch.job_progress()
            now = time.monotonic()
            if now - last_sent < self._progress_interval_s:
                return
            last_sent = now
            progress = Progress(step=step, steps=steps, fraction=round(step / steps, 4) if steps else 1.0)
            self._publisher.publish(self._event(job, Status.PROGRESS, progress=progress), reply)

        return report

    # --- answers -----------------------------------------------------------------------------

    def _aborted(self, job: Job, reply: ReplyAddress | None, why: str) -> Outcome:
        if why == "cancelled":
            return self._answer(job, reply, Status.CANCELLED, reason="cancelled", message="cancelled while running")
        log.info("job.released", why=why, attempt=job.attempt)
        self._recorder.job_finished(Status.RELEASED.value, why)
        if why == "revoked":
            # The partition is gone: its next owner reads the job again from the committed offset.
            self._publisher.publish(self._event(job, Status.RELEASED, reason=why), reply)
            return Outcome.RELEASED
        # Draining or hung: queue the job again now (attempt counted), so it does not wait for
        # this instance's partitions to move or its WebUI to restart; then commit its offset.
        self._publisher.requeue(job.model_copy(update={"attempt": job.attempt + 1}))
        self._publisher.publish_durably(self._event(job, Status.RELEASED, reason=why), reply)
        return Outcome.COMMIT

    def _fail(self, job: Job, delivery: Delivery, reply: ReplyAddress | None, reason: str, message: str) -> Outcome:
        log.warning("job.failed", reason=reason, error=message)
        self._publisher.dead_letter(delivery.value, delivery.source, reason, message, job.job_id)
        return self._answer(job, reply, Status.FAILED, reason=reason, message=message)

    def _reject(self, delivery: Delivery, rejection: JobRejected) -> Outcome:
        log.warning("job.rejected", job_id=rejection.job_id, reason=rejection.reason, error=rejection.message)
        self._recorder.job_finished(Status.REJECTED.value, rejection.reason)
        self._publisher.dead_letter(
            delivery.value, delivery.source, rejection.reason, rejection.message, rejection.job_id
        )
        if rejection.job_id or rejection.reply_to:
            event = StatusEvent(
                # Without a readable id, name the answer after the record, never a shared
                # placeholder that the ledger would then take as a real job answered.
                job_id=rejection.job_id or f"rejected-{delivery.record_id}",
                status=Status.REJECTED,
                correlation_id=rejection.correlation_id,
                reason=rejection.reason,
                message=rejection.message,
            )
            reply = None
            if rejection.reply_to:
                reply = ReplyAddress(rejection.reply_to, rejection.reply_partition, rejection.correlation_id)
            self._publisher.publish_durably(event, self._allowed(reply))
        return Outcome.COMMIT

    def _answer(self, job: Job, reply: ReplyAddress | None, status: Status, **fields) -> Outcome:
        self._publisher.publish_durably(self._event(job, status, **fields), reply)
        self._ledger.record_finished(job.job_id, status)
        self._recorder.job_finished(status.value, fields.get("reason"), fields.get("timings_ms"))
        if status is not Status.SUCCEEDED:
            log.info("job.answered", status=status.value, reason=fields.get("reason"))
        return Outcome.COMMIT

    def _event(self, job: Job, status: Status, **fields) -> StatusEvent:
        return StatusEvent(
            job_id=job.job_id,
            status=status,
            attempt=job.attempt,
            correlation_id=job.correlation_id,
            metadata=job.metadata if status.is_terminal else {},
            webhook=job.webhook if status.is_terminal else None,
            **fields,
        )


def _reply_address(job: Job) -> ReplyAddress | None:
    if job.reply_to is None:
        return None
    return ReplyAddress(job.reply_to, job.reply_partition, job.correlation_id)


def _log_retry(state: tenacity.RetryCallState) -> None:
    log.warning(
        "job.retrying",
        attempt=state.attempt_number,
        error=str(state.outcome.exception()) if state.outcome else None,
        backoff_s=round(state.upcoming_sleep, 3),
    )
