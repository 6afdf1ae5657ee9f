"""The agent: one object that owns the loops and starts them in order and stops them in reverse.

Start: models prewarmed (while the WebUI starts) and shown to the WebUI -> backend ready -> ledger
caught up on the window -> intake subscribed -> store watcher -> READY. Stop: intake stops
fetching -> the job in flight is released (or answered) -> offsets committed and the group left
-> ledger closed -> producer flushed -> backend closed. ``cli.py`` installs the signal handlers;
nothing here touches process-global state.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import psutil
import structlog
from confluent_kafka import Consumer, Producer

from sdagent.agent.affinity import HotModels
from sdagent.backends.base import Backend
from sdagent.cache.cache import ModelCache, PrewarmReport
from sdagent.cache.serving import CachedModels
from sdagent.cache.watch import ManifestWatcher
from sdagent.config import Settings
from sdagent.errors import BackendError, BackendUnavailable
from sdagent.storage.inputs import InputResolver
from sdagent.agent.intake import Intake
from sdagent.kafka.clients import jobs_consumer_config, ledger_reader_config, producer_config, reader_config
from sdagent.kafka.ledger import JobLedger
from sdagent.lifecycle.autoscaling import Heartbeater, HookTarget, LifecycleActions
from sdagent.metrics.publisher import MetricsPublisher
from sdagent.storage.outputs import OutputStore
from sdagent.kafka.publisher import StatusPublisher
from sdagent.agent.runner import JobRunner
from sdagent.webui.supervisor import WebUISupervisor
from sdagent.lifecycle.systemd import Notifier

log = structlog.get_logger(__name__)

BACKEND_READY_POLL_S = 0.5
PRODUCER_FLUSH_S = 10.0
PROTECTION_IDLE_S = 30.0  # idle this long before scale-in protection is lifted
MEMORY_CHECK_INTERVAL_S = 5.0  # psutil walks the WebUI's process tree: not on every loop turn


class Agent:
    """Runs jobs from the fleet's jobs topic on one backend until drained."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        inputs: InputResolver,
        outputs: OutputStore,
        *,
        supervisor: WebUISupervisor | None = None,
        lifecycle: LifecycleActions | None = None,
        notifier: Notifier | None = None,
        metrics: MetricsPublisher | None = None,
        model_cache: ModelCache | None = None,
        consumer_factory: Callable[[dict], Consumer] = Consumer,
        producer_factory: Callable[[dict], Producer] = Producer,
    ) -> None:
        self._settings = settings
        self._backend = backend
        self._supervisor = supervisor
        self._lifecycle = lifecycle
        self._protection = _Protection(lifecycle, settings) if lifecycle and settings.lifecycle.protect_while_busy else None
        self._terminating_by_group = False  # the group's terminate hook is waiting for us
        self._notifier = notifier or Notifier(None)
        self._metrics = metrics
        self._cache = model_cache
        self._models = (
            CachedModels(model_cache, metrics.jobs if metrics else None, webui_models=lambda: backend.health().models)
            if model_cache
            else None
        )
        self._cache_watcher: ManifestWatcher | None = None
        self._prewarm: Future[PrewarmReport] | None = None
        self._drain_lock = threading.Lock()
        self._drain_reason = "stop requested"
        self.drain_deadline: float | None = None  # time.monotonic() value set by a notice
        agent_id = settings.agent.instance_id or socket.gethostname()
        self._producer = producer_factory(producer_config(settings.kafka, f"sdagent-{agent_id}"))
        self.publisher = StatusPublisher(self._producer, settings.topics, agent_id)
        self.ledger = JobLedger(
            consumer_factory(ledger_reader_config(settings.kafka)),
            consumer_factory(reader_config(settings.kafka, "ledger-probe")),
            settings.topics.results,
            settings.topics.control,
            settings.idempotency.window_s,
        )
        runner = JobRunner(
            backend,
            inputs,
            outputs,
            self.publisher,
            self.ledger,
            limits=settings.limits,
            retry=settings.retry,
            catch_up_timeout_s=settings.idempotency.catch_up_timeout_s,
            progress_interval_s=settings.agent.progress_interval_s,
            watch=supervisor,
            backend_ready_wait_s=settings.backend.process.ready_timeout_s,
            recorder=metrics.jobs if metrics is not None else None,
            models=self._models,
        )
        self._runner = runner
        self._hot_models = HotModels(self._producer, settings.topics.agents, agent_id, self._cached_model_names)
        self.intake = Intake(
            consumer_factory(jobs_consumer_config(settings.kafka, agent_id)),
            settings.topics.jobs,
            runner,
            backend.interrupt,
            read_ahead=settings.agent.read_ahead,
            on_assignment=self._follow_assignment,
            loaded_model=lambda: runner.current_model,
        )
        self.ledger.on_cancel(self.intake.cancel)
        self.stopping = threading.Event()
        self._forced = threading.Event()

    def start(self, ready_timeout_s: float = 120.0) -> None:
        """Wait for the prewarmed models and the backend, read the fleet's recent answers, then
        join the consumer group.

        Order: the prewarm and the WebUI start together; once the models are local, the WebUI
        rescans its folders (and loads one when it has none loaded: a fresh instance whose only
        checkpoints come from the store), then the agent waits for the WebUI to be ready.
        """
        if self._metrics is not None:
            self._metrics.start()  # returns at once; NVML starts on the metrics thread
        prewarm = self._prewarm = self._start_prewarm()  # overlaps the WebUI's start-up
        if self._supervisor is not None:
            self._launch_supervised()
            ready_timeout_s = self._settings.backend.process.ready_timeout_s
        # The WebUI's time starts once the models are local: a long prewarm must not eat it.
        prewarm_status = self._finish_prewarm(prewarm, ready_timeout_s)
        deadline = time.monotonic() + ready_timeout_s
        if self._supervisor is not None:
            self._wait_supervised_ready(deadline)
        else:
            self._wait_backend_ready(deadline, ready_timeout_s)
        if self.stopping.is_set():
            log.warning("agent.not_consuming", reason=self._drain_reason)  # a notice came first
            return
        self.ledger.start()
        self.intake.start()
        self._start_cache_watcher()
        self._notifier.ready(f"consuming {self._settings.topics.jobs}{prewarm_status}")
        if self._metrics is not None:
            self._metrics.jobs.time_to_ready(time.time() - psutil.boot_time())
        log.info("agent.started", instance_id=self._settings.agent.instance_id, backend=self._backend.name)
        launch_hook = self._hook(self._settings.lifecycle.launch_hook)
        if launch_hook is not None:
            # Tell the group this instance can serve; retried in the background while the group
            # has not put the instance in Pending:Wait yet.
            threading.Thread(target=self._lifecycle.complete, args=(launch_hook,), daemon=True).start()

    def run(self) -> None:
        """Run jobs until :meth:`request_stop` is called."""
        next_memory_check = 0.0
        watchdog = self._notifier.watchdog_period()
        next_ping = 0.0
        while not self.stopping.is_set():
            self.intake.step()
            if self._metrics is not None:
                self._metrics.jobs.set_in_flight(1 if self.intake.busy else 0)
            if watchdog is not None and time.monotonic() >= next_ping:
                # From the loop itself: a stuck loop stops the pings and systemd restarts us.
                self._notifier.watchdog_ping()
                next_ping = time.monotonic() + watchdog / 2
            if self._protection is not None:
                self._protection.follow(self.intake.busy)
            self._hot_models.follow(self._runner.current_model)
            if self._supervisor is not None and not self.intake.busy and time.monotonic() >= next_memory_check:
                # Between jobs only: a restart for memory never cuts a job short.
                self._supervisor.restart_if_over_memory()
                next_memory_check = time.monotonic() + MEMORY_CHECK_INTERVAL_S

    def request_stop(self, reason: str) -> None:
        """Ask the loop to leave; safe from a signal handler or another thread."""
        self.request_drain(reason, None)

    def request_drain(self, reason: str, deadline: float | None) -> None:
        """Ask the loop to leave and drain by ``deadline`` (a ``time.monotonic()`` value, or the
        configured drain timeout); the earliest deadline asked for wins. Safe from any thread."""
        with self._drain_lock:
            if not self.stopping.is_set():
                self._drain_reason = reason
                log.info("agent.stop_requested", reason=reason)
            if deadline is not None and (self.drain_deadline is None or deadline < self.drain_deadline):
                self.drain_deadline = deadline
            self.stopping.set()

    def hold(self, reason: str) -> None:
        self.intake.hold(reason)

    def unhold(self, reason: str) -> None:
        self.intake.unhold(reason)

    @property
    def drain_reason(self) -> str:
        return self._drain_reason

    def drain(self, reason: str, deadline: float | None = None) -> None:
        """Stop taking work; let the job in flight finish when its progress says it will, well
        before ``deadline`` (a ``time.monotonic()`` value), else release it to the fleet.

        :meth:`force` (a second SIGTERM) cuts the wait short: the job is released at once.
        """
        if deadline is None:
            deadline = time.monotonic() + self._settings.agent.drain_timeout_s
        log.info("agent.draining", reason=reason, busy=self.intake.busy, budget_s=round(deadline - time.monotonic(), 1))
        self.intake.hold("draining")
        self._notifier.stopping(f"draining: {reason}")
        if self._metrics is not None:
            self._metrics.jobs.set_draining(True)
        terminate_hook = self._hook(self._settings.lifecycle.terminate_hook)
        heartbeats = (
            Heartbeater(self._lifecycle, terminate_hook, self._settings.lifecycle.heartbeat_interval_s)
            if terminate_hook is not None and self._terminating_by_group
            else contextlib.nullcontext()
        )
        with heartbeats:
            self._finish_or_release(deadline)
        log.info("agent.drained", reason=reason, forced=self._forced.is_set())

    def terminating_by_group(self) -> None:
        """The group is terminating this instance: heartbeat its hook while draining, complete it after."""
        self._terminating_by_group = True

    def _finish_or_release(self, deadline: float) -> None:
        margin = self._settings.agent.drain_margin_s
        while self.intake.busy and not self._forced.is_set():
            remaining = self.intake.inflight_remaining_s()
            time_left = deadline - time.monotonic()
            if time_left <= margin or (remaining is not None and remaining > time_left - margin):
                break
            self.intake.step()  # keeps polling, so the group and the job's answer go on
        if self.intake.busy:
            self.intake.release_inflight("draining")

    def force(self) -> None:
        """Make a drain in progress release the job in flight now."""
        self._forced.set()

    @property
    def prewarm_running(self) -> bool:
        """A prewarm was left running by a stop during start-up."""
        return self._prewarm is not None and not self._prewarm.done()

    def stop(self) -> None:
        """Leave the group, close the readers and send what is queued; reverse of :meth:`start`."""
        for name, step in (
            ("cache watcher", self._cache_watcher.stop if self._cache_watcher else lambda: None),
            ("intake", self.intake.close),
            ("ledger", self.ledger.stop),
            ("webui", self._supervisor.stop if self._supervisor else lambda: None),
            ("hot models", self._hot_models.leave),
            ("producer", lambda: self.publisher.flush(PRODUCER_FLUSH_S)),
            ("terminate hook", self._complete_terminate_hook),
            ("metrics", self._metrics.stop if self._metrics else lambda: None),  # last: sends the partial interval
            ("backend", self._backend.close),
            ("model cache", self._cache.close if self._cache else lambda: None),
        ):
            try:
                step()
            except Exception:  # keep stopping the rest: a failing step must not strand the others
                log.exception("agent.stop_step_failed", step=name)
        log.info("agent.stopped")

    def _cached_model_names(self) -> list[str]:
        return [entry.name for entry in self._cache.ls()] if self._cache is not None else []

    def _follow_assignment(self, assigned: frozenset[tuple[str, int]]) -> None:
        # Exactly one member publishes the group's backlog: the holder of partition 0.
        if self._metrics is not None and self._metrics.lag is not None:
            self._metrics.lag.set_holds_partition_zero((self._settings.topics.jobs, 0) in assigned)

    def _hook(self, name: str | None) -> HookTarget | None:
        if self._lifecycle is None or name is None:
            return None
        return HookTarget(self._settings.lifecycle.autoscaling_group, name, self._settings.agent.instance_id)

    def _complete_terminate_hook(self) -> None:
        terminate_hook = self._hook(self._settings.lifecycle.terminate_hook)
        if terminate_hook is not None and self._terminating_by_group:
            self._lifecycle.complete(terminate_hook)

    def _start_prewarm(self) -> Future[PrewarmReport] | None:
        if self._cache is None:
            return None
        config = self._settings.cache
        future: Future[PrewarmReport] = Future()

        def prewarm() -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(self._cache.prewarm(config.prewarm, most_used=config.prewarm_most_used,
                                                      concurrency=config.prewarm_concurrency))  # fmt: skip
            except BaseException as exc:
                future.set_exception(exc)

        # Its own thread: start() waits for it in slices, so a stop during a long prewarm is seen.
        threading.Thread(target=prewarm, name="cache-prewarm", daemon=True).start()
        log.info("agent.prewarm_started", models=config.prewarm, most_used=config.prewarm_most_used)
        return future

    def _finish_prewarm(self, prewarm: Future[PrewarmReport] | None, ready_timeout_s: float) -> str:
        """Wait for the models staged at boot and show them to the WebUI: the agent takes work
        only once they are local and listed. A model that failed is logged and reported in the
        systemd status (returned), not fatal: its jobs try again (and fail with a reason)."""
        if prewarm is None:
            return ""
        try:
            report = self._wait_for(prewarm)
            if report is None:
                log.warning("agent.prewarm_abandoned", reason=self._drain_reason)  # stopping
                return ""
        except Exception:  # a bug in prewarm must not keep a healthy instance from serving
            log.exception("cache.prewarm_crashed")
            self._models.request_rescan()
            return "; prewarm crashed"
        local = [result.name for result in report.results if result.error is None]
        log.info("agent.prewarmed", models=local, failed=len(report.failed), ms=round(report.total_ms))
        if local:
            self._show_prewarmed(local, time.monotonic() + ready_timeout_s)
        if not report.failed:
            return ""
        failed = [result.name for result in report.failed]
        log.warning("agent.prewarm_incomplete", failed=failed, errors=[result.error for result in report.failed])
        return f"; prewarm failed for {len(failed)} of {len(report.results)} models: {', '.join(failed)}"

    def _wait_for(self, prewarm: Future[PrewarmReport]) -> PrewarmReport | None:
        """The prewarm's report, or None once a stop is requested (a notice during boot)."""
        while True:
            try:
                return prewarm.result(timeout=BACKEND_READY_POLL_S)
            except FutureTimeout:
                if self.stopping.is_set():
                    return None

    def _show_prewarmed(self, models: list[str], deadline: float) -> None:
        """Once the WebUI answers, have it rescan its folders; if it has no model loaded (its only
        checkpoints come from the cache), load the first prewarmed checkpoint, or it never gets
        ready. On this thread: no job runs yet. A failure here leaves the rescan to the first job."""
        while True:
            try:
                listed = self._backend.refresh_models()
                break
            except BackendUnavailable as exc:  # still starting
                if time.monotonic() >= deadline or self.stopping.wait(BACKEND_READY_POLL_S):
                    log.warning("agent.prewarm_rescan_skipped", error=str(exc))
                    self._models.request_rescan()
                    return
            except BackendError as exc:
                log.warning("agent.prewarm_rescan_failed", error=str(exc))
                self._models.request_rescan()
                return
        log.info("backend.models_refreshed", models=len(listed))
        if self._backend.loaded_model() is not None:
            return
        kinds = {entry.name: entry.kind for entry in self._cache.ls()}
        checkpoint = next((name for name in models if kinds.get(name) == "checkpoint" and name in listed), None)
        if checkpoint is None:
            return
        since = time.perf_counter()
        try:
            self._backend.switch_model(checkpoint)
        except BackendError as exc:  # the readiness wait reports what is wrong with the WebUI
            log.warning("agent.prewarmed_model_not_loaded", model=checkpoint, error=str(exc))
            return
        self._runner.current_model = checkpoint
        log.info("agent.prewarmed_model_loaded", model=checkpoint, ms=round((time.perf_counter() - since) * 1000, 1))

    def _start_cache_watcher(self) -> None:
        if self._cache is None or self._models is None:
            return
        config = self._settings.cache
        self._cache_watcher = ManifestWatcher(
            self._cache, self._models.models_changed, interval_s=config.poll_interval_s, use_events=config.watch
        )
        try:
            self._cache_watcher.start()
        except Exception:  # without it, store changes are found on a job's miss: serve anyway
            log.exception("cache.watch_not_started")

    def _launch_supervised(self) -> None:
        supervisor = self._supervisor
        # Intake follows the WebUI: held while it is down or restarting, resumed once it is back.
        supervisor.on_state_change(
            lambda ready, reason: self.intake.unhold("backend_down") if ready else self.intake.hold("backend_down")
        )
        supervisor.on_hang(lambda job_id, reason: self.intake.abort_inflight("hung", job_id))
        supervisor.start()

    def _wait_supervised_ready(self, deadline: float) -> None:
        while not self._supervisor.wait_ready(min(BACKEND_READY_POLL_S, max(0.0, deadline - time.monotonic()))):
            if self.stopping.is_set():
                return  # start() sees the stop and does not consume
            if time.monotonic() >= deadline:
                timeout_s = self._settings.backend.process.ready_timeout_s
                raise BackendUnavailable(f"WebUI not ready after {timeout_s} s: {self._supervisor.ready_reason}")
        log.info("backend.ready", backend=self._backend.name, supervised=True)

    def _wait_backend_ready(self, deadline: float, timeout_s: float) -> None:
        while True:
            health = self._backend.health()
            if health.ready:
                log.info("backend.ready", backend=self._backend.name, models=len(health.models))
                return
            if time.monotonic() >= deadline:
                raise BackendUnavailable(f"backend {self._backend.name} not ready after {timeout_s} s: {health.detail}")
            if self.stopping.wait(BACKEND_READY_POLL_S):
                return  # start() sees the stop and does not consume


class _Protection:
    """Scale-in protection that follows busy/idle with hysteresis: a few API calls, not two per job."""

    def __init__(self, lifecycle: LifecycleActions, settings: Settings) -> None:
        self._lifecycle = lifecycle
        self._group = settings.lifecycle.autoscaling_group
        self._instance_id = settings.agent.instance_id
        self._protected = False
        self._last_busy = 0.0

    def follow(self, busy: bool) -> None:
        now = time.monotonic()
        if busy:
            self._last_busy = now
        wanted = busy or now - self._last_busy < PROTECTION_IDLE_S
        if wanted != self._protected:
            self._lifecycle.set_protected(self._group, self._instance_id, wanted)
            self._protected = wanted

