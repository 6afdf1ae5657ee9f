"""The agent: one object that owns the loops, starts them in order and stops them in reverse.

Start: IMDS notices read -> models prewarmed (while the WebUI starts) and shown to the WebUI ->
backend ready -> ledger caught up on the window -> intake subscribed -> store watcher -> READY.
Stop: intake stops fetching -> the job in flight is released (or answered) -> offsets committed
and the group left -> ledger closed -> producer flushed -> backend closed. Every part arrives
built (:mod:`sdagent.agent.build`); ``cli.py`` installs the signal handlers; nothing here touches
process-global state.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import structlog

from sdagent.agent.chores import Chores
from sdagent.agent.config import AgentConfig
from sdagent.agent.controls import Controls
from sdagent.agent.intake import JobIntake
from sdagent.agent.runner import JobRunner
from sdagent.agent.startup import Startup
from sdagent.backends.base import Backend
from sdagent.cache.cache import ModelCache
from sdagent.cache.watch import ManifestWatcher
from sdagent.kafka.ledger import JobLedger
from sdagent.kafka.publisher import StatusPublisher
from sdagent.lifecycle.autoscaling import GroupMembership
from sdagent.lifecycle.interruptions import InterruptionWatch
from sdagent.lifecycle.systemd import Notifier
from sdagent.metrics.publisher import MetricsPublisher
from sdagent.webui.supervisor import WebUISupervisor

log = structlog.get_logger(__name__)

PRODUCER_FLUSH_S = 10.0


@dataclass
class AgentParts:
    """Everything an agent runs, built by :func:`sdagent.agent.build.build_agent`."""

    instance_id: str
    jobs_topic: str
    controls: Controls
    backend: Backend
    intake: JobIntake
    runner: JobRunner
    ledger: JobLedger
    publisher: StatusPublisher
    startup: Startup
    chores: Chores
    notifier: Notifier
    supervisor: WebUISupervisor | None = None
    metrics: MetricsPublisher | None = None
    model_cache: ModelCache | None = None
    cache_watcher: ManifestWatcher | None = None
    group: GroupMembership | None = None
    interruptions: InterruptionWatch | None = None


class Agent:
    """Runs jobs from the fleet's jobs topic on one backend until drained."""

    def __init__(self, parts: AgentParts, config: AgentConfig) -> None:
        self.parts = parts
        self._config = config
        self.controls = parts.controls
        self.intake = parts.intake
        self.ledger = parts.ledger
        self.publisher = parts.publisher

    def start(self) -> None:
        """Read IMDS's notices, get the backend ready, read the fleet's recent answers, then
        join the consumer group; a stop asked for meanwhile leaves without consuming."""
        parts = self.parts
        if parts.interruptions is not None:
            parts.interruptions.start()
        if parts.metrics is not None:
            parts.metrics.start()  # returns at once; NVML starts on the metrics thread
        prewarm_status = parts.startup.run()
        if parts.startup.loaded_model is not None:
            parts.runner.current_model = parts.startup.loaded_model
        if self.controls.stopping.is_set():
            log.warning("agent.not_consuming", reason=self.controls.reason)  # a notice came first
            return
        self.ledger.start()
        self.intake.start()
        self._start_cache_watcher()
        parts.notifier.ready(f"consuming {parts.jobs_topic}{prewarm_status}")
        if parts.metrics is not None:
            parts.metrics.jobs.time_to_ready(time.time() - psutil.boot_time())
        log.info("agent.started", instance_id=parts.instance_id, backend=parts.backend.name)
        if parts.group is not None:
            parts.group.serving()

    def run(self) -> None:
        """Run jobs until a stop is requested (:class:`Controls`)."""
        while not self.controls.stopping.is_set():
            self.intake.step()
            self.parts.chores.tick(self.intake.busy)

    def drain(self, reason: str | None = None, deadline: float | None = None) -> None:
        """Stop taking work; let the job in flight finish when its progress says it will, well
        before ``deadline`` (a ``time.monotonic()`` value; default: the one a notice asked for, or
        the configured drain timeout), else release it to the fleet.

        :meth:`Controls.force` (a second SIGTERM) cuts the wait short: the job is released at once.
        """
        reason = reason or self.controls.reason
        deadline = deadline or self.controls.deadline or time.monotonic() + self._config.drain_timeout_s
        log.info("agent.draining", reason=reason, busy=self.intake.busy, budget_s=round(deadline - time.monotonic(), 1))
        self.controls.hold("draining")
        self.parts.notifier.stopping(f"draining: {reason}")
        if self.parts.metrics is not None:
            self.parts.metrics.jobs.set_draining(True)
        by_group = self.controls.group_terminating.is_set()
        draining = self.parts.group.draining(by_group) if self.parts.group else contextlib.nullcontext()
        with draining:
            self._finish_or_release(deadline)
        log.info("agent.drained", reason=reason, forced=self.controls.forced.is_set())

    @property
    def prewarm_running(self) -> bool:
        """A prewarm was left running by a stop during start-up."""
        return self.parts.startup.prewarm_running

    def stop(self) -> None:
        """Leave the group, close the readers and send what is queued; reverse of :meth:`start`."""
        parts = self.parts
        by_group = self.controls.group_terminating.is_set()
        steps: list[tuple[str, Callable[[], object] | None]] = [
            ("notices", parts.interruptions.stop if parts.interruptions else None),
            ("cache watcher", parts.cache_watcher.stop if parts.cache_watcher else None),
            ("intake", self.intake.close),
            ("ledger", self.ledger.stop),
            ("webui", parts.supervisor.stop if parts.supervisor else None),
            ("beacon", parts.chores.leave),
            ("producer", lambda: self.publisher.flush(PRODUCER_FLUSH_S)),
            ("terminate hook", (lambda: group.left(by_group)) if (group := parts.group) else None),
            ("metrics", parts.metrics.stop if parts.metrics else None),  # last: sends the partial interval
            ("backend", parts.backend.close),
            ("model cache", parts.model_cache.close if parts.model_cache else None),
        ]
        for name, step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception:  # keep stopping the rest: a failing step must not strand the others
                log.exception("agent.stop_step_failed", step=name)
        log.info("agent.stopped")

    def _finish_or_release(self, deadline: float) -> None:
        margin = self._config.drain_margin_s
        while self.intake.busy and not self.controls.forced.is_set():
            remaining = self.intake.inflight_remaining_s()
            time_left = deadline - time.monotonic()
            if time_left <= margin or (remaining is not None and remaining > time_left - margin):
                break
            self.intake.step()  # keeps polling, so the group and the job's answer go on
        if self.intake.busy:
            self.intake.release_inflight("draining")

    def _start_cache_watcher(self) -> None:
        if self.parts.cache_watcher is None:
            return
        try:
            self.parts.cache_watcher.start()
        except Exception:  # without it, store changes are found on a job's miss: serve anyway
            log.exception("cache.watch_not_started")
