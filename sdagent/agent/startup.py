"""Getting ready to serve: the models staged at boot (the prewarm, beside the WebUI's own start),
shown to the WebUI, then the wait for the backend to be ready.

Order: the prewarm and the WebUI start together; once the models are local, the WebUI rescans its
folders (and loads one when it has none loaded: a fresh instance whose only checkpoints come from
the store), then the agent waits for the WebUI to be ready. A stop requested meanwhile (a notice
during boot) is seen within :data:`READY_POLL_S`.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import structlog

from sdagent.agent.controls import Controls
from sdagent.backends.base import Backend
from sdagent.cache.cache import ModelCache, PrewarmReport
from sdagent.cache.config import CacheConfig
from sdagent.cache.serving import CachedModels
from sdagent.errors import BackendError, BackendUnavailable
from sdagent.webui.supervisor import WebUISupervisor

log = structlog.get_logger(__name__)

READY_POLL_S = 0.5


class Startup:
    """Prewarm and readiness of one agent's backend; :meth:`run` returns once it can serve."""

    def __init__(
        self,
        backend: Backend,
        controls: Controls,
        ready_timeout_s: float,
        *,
        supervisor: WebUISupervisor | None = None,
        cache: ModelCache | None = None,
        models: CachedModels | None = None,
        cache_config: CacheConfig | None = None,
    ) -> None:
        self._backend = backend
        self._controls = controls
        self._ready_timeout_s = ready_timeout_s
        self._supervisor = supervisor
        self._cache = cache
        self._models = models
        self._cache_config = cache_config or CacheConfig()
        self._prewarm: Future[PrewarmReport] | None = None
        self.loaded_model: str | None = None  # a prewarmed checkpoint this start loaded

    @property
    def prewarm_running(self) -> bool:
        """A prewarm was left running by a stop during start-up."""
        return self._prewarm is not None and not self._prewarm.done()

    def run(self) -> str:
        """Prewarm, start the WebUI, wait until the backend is ready (or a stop is asked for).
        Returns what the prewarm left undone, for the systemd status ("" when nothing)."""
        prewarm = self._prewarm = self._start_prewarm()  # overlaps the WebUI's start-up
        if self._supervisor is not None:
            self._supervisor.start()
        # The WebUI's time starts once the models are local: a long prewarm must not eat it.
        prewarm_status = self._finish_prewarm(prewarm)
        deadline = time.monotonic() + self._ready_timeout_s
        if self._supervisor is not None:
            self._wait_supervised_ready(deadline)
        else:
            self._wait_backend_ready(deadline)
        return prewarm_status

    # --- prewarm ---------------------------------------------------------------------------------

    def _start_prewarm(self) -> Future[PrewarmReport] | None:
        cache = self._cache
        if cache is None:
            return None
        config = self._cache_config
        future: Future[PrewarmReport] = Future()

        def prewarm() -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(cache.prewarm(config.prewarm, most_used=config.prewarm_most_used,
                                                concurrency=config.prewarm_concurrency))  # fmt: skip
            except BaseException as exc:
                future.set_exception(exc)

        # Its own thread: run() waits for it in slices, so a stop during a long prewarm is seen.
        threading.Thread(target=prewarm, name="cache-prewarm", daemon=True).start()
        log.info("agent.prewarm_started", models=config.prewarm, most_used=config.prewarm_most_used)
        return future

    def _finish_prewarm(self, prewarm: Future[PrewarmReport] | None) -> str:
        """Wait for the models staged at boot and show them to the WebUI: the agent takes work
        only once they are local and listed. A model that failed is logged and reported in the
        systemd status (returned), not fatal: its jobs try again (and fail with a reason)."""
        if prewarm is None or self._models is None:
            return ""
        try:
            report = self._wait_for(prewarm)
            if report is None:
                log.warning("agent.prewarm_abandoned", reason=self._controls.reason)  # stopping
                return ""
        except Exception:  # a bug in prewarm must not keep a healthy instance from serving
            log.exception("cache.prewarm_crashed")
            self._models.request_rescan()
            return "; prewarm crashed"
        local = [result.name for result in report.results if result.error is None]
        log.info("agent.prewarmed", models=local, failed=len(report.failed), ms=round(report.total_ms))
        if local:
            self._show_prewarmed(local, self._models, time.monotonic() + self._ready_timeout_s)
        if not report.failed:
            return ""
        failed = [result.name for result in report.failed]
        log.warning("agent.prewarm_incomplete", failed=failed, errors=[result.error for result in report.failed])
        return f"; prewarm failed for {len(failed)} of {len(report.results)} models: {', '.join(failed)}"

    def _wait_for(self, prewarm: Future[PrewarmReport]) -> PrewarmReport | None:
        """The prewarm's report, or None once a stop is requested (a notice during boot)."""
        while True:
            try:
                return prewarm.result(timeout=READY_POLL_S)
            except FutureTimeout:
                if self._controls.stopping.is_set():
                    return None

    def _show_prewarmed(self, prewarmed: list[str], models: CachedModels, deadline: float) -> None:
        """Once the WebUI answers, have it rescan its folders; if it has no model loaded (its only
        checkpoints come from the cache), load the first prewarmed checkpoint, or it never gets
        ready. On this thread: no job runs yet. A failure here leaves the rescan to the first job."""
        while True:
            try:
                listed = self._backend.refresh_models()
                break
            except BackendUnavailable as exc:  # still starting
                if time.monotonic() >= deadline or self._controls.stopping.wait(READY_POLL_S):
                    log.warning("agent.prewarm_rescan_skipped", error=str(exc))
                    models.request_rescan()
                    return
            except BackendError as exc:
                log.warning("agent.prewarm_rescan_failed", error=str(exc))
                models.request_rescan()
                return
        log.info("backend.models_refreshed", models=len(listed))
        if self._backend.loaded_model() is not None or self._cache is None:
            return
        kinds = {entry.name: entry.kind for entry in self._cache.ls()}
        checkpoint = next((name for name in prewarmed if kinds.get(name) == "checkpoint" and name in listed), None)
        if checkpoint is None:
            return
        since = time.perf_counter()
        try:
            self._backend.switch_model(checkpoint)
        except BackendError as exc:  # the readiness wait reports what is wrong with the WebUI
            log.warning("agent.prewarmed_model_not_loaded", model=checkpoint, error=str(exc))
            return
        self.loaded_model = checkpoint
        log.info("agent.prewarmed_model_loaded", model=checkpoint, ms=round((time.perf_counter() - since) * 1000, 1))

    # --- readiness -------------------------------------------------------------------------------

    def _wait_supervised_ready(self, deadline: float) -> None:
        assert self._supervisor is not None
        while not self._supervisor.wait_ready(min(READY_POLL_S, max(0.0, deadline - time.monotonic()))):
            if self._controls.stopping.is_set():
                return  # the agent sees the stop and does not consume
            if time.monotonic() >= deadline:
                raise BackendUnavailable(
                    f"WebUI not ready after {self._ready_timeout_s} s: {self._supervisor.ready_reason}"
                )
        log.info("backend.ready", backend=self._backend.name, supervised=True)

    def _wait_backend_ready(self, deadline: float) -> None:
        while True:
            health = self._backend.health()
            if health.ready:
                log.info("backend.ready", backend=self._backend.name, models=len(health.models))
                return
            if time.monotonic() >= deadline:
                raise BackendUnavailable(
                    f"backend {self._backend.name} not ready after {self._ready_timeout_s} s: {health.detail}"
                )
            if self._controls.stopping.wait(READY_POLL_S):
                return  # the agent sees the stop and does not consume
