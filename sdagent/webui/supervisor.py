"""Keeps the WebUI process alive and healthy: launch, readiness, crash restarts, hangs, memory ceilings.

Two modes. *Managed* (``process.command`` set): the WebUI is the agent's child, in its own process
group so that a stop or a hang kill reaches every process it spawned, and its output is folded into
the agent's log. *Attached* (no command): the WebUI has its own systemd unit; the supervisor only
probes it and interrupts hung jobs.

One monitor thread, every ``probe_interval_s``: restarts an exited child with capped exponential
backoff (a crash loop is logged as an error and counted), watches the job in flight for hangs
(interrupt, grace, kill the group, restart), and probes readiness. The job loop tells it when a job
starts, progresses and ends (:meth:`WebUISupervisor.watch_job`) and asks it between jobs to restart
a WebUI above its memory ceiling (:meth:`WebUISupervisor.restart_if_over_memory`).

The WebUI runs in its own session under :mod:`sdagent.webui.guard`, which ends its whole process
group when the agent dies (a SIGKILL or a crash included), so no WebUI outlives its agent holding
the GPU and the port, with or without systemd (whose ``KillMode=control-group`` cleans up too).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import psutil
import structlog

from sdagent.backends.base import Backend, Health
from sdagent.backends.config import WebUIBackendConfig
from sdagent.gpu.memory import GpuMemoryProbe
from sdagent.modelnames import is_listed
from sdagent.webui.config import ProcessConfig
from sdagent.webui.output import OUTPUT_READ_LIMIT_BYTES, OutputLog, clean_output_line
from sdagent.webui.process import descendants, launch_guarded, signal_group, signal_name, tree_rss_bytes
from sdagent.webui.restart import RestartPolicy

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
Wait = Callable[[threading.Event, float], bool]
"""Block on an event for at most ``timeout`` seconds, True if it was set; ``threading.Event.wait``."""
Launcher = Callable[..., subprocess.Popen]
StateCallback = Callable[[bool, str], None]
"""Called with (ready, reason) when readiness changes; reason is a short code (see :attr:`ready_reason`)."""
HangCallback = Callable[[str, str], None]
"""Called with (job_id, reason) when the job in flight is found hung; reason is stalled or job_timeout."""

PROBE_INTERVAL_S = 2.0  # how often the monitor looks: bounds how late a crash, hang or recovery is seen
# One slow answer (a model loading, a busy event loop) must not pause intake: a WebUI that was ready
# is declared unready after this many failed probes in a row. An exited child is unready at once.
UNREADY_AFTER_FAILED_PROBES = 2
# Between the interrupt and the kill of a hung WebUI. A1111 and ComfyUI check the interrupt flag
# between sampling steps, and a step takes about a second at most; the rest is for the HTTP answer.
HANG_INTERRUPT_GRACE_S = 10.0
KILL_WAIT_S = 5.0  # after SIGKILL: a process stuck in the GPU driver (D state) may never be reaped
THREAD_JOIN_S = 10.0  # stop() waits this long per thread; the probe's own timeout bounds the monitor
MONITOR_ERROR_BACKOFF_S = 1.0  # after an unexpected error in a monitor round


# --- restart arithmetic ----------------------------------------------------------------------


# --- the job in flight -----------------------------------------------------------------------


@dataclass
class WatchedJob:
    """The job the WebUI runs now, as the hang detector sees it.

    ``hung`` is set when the supervisor found the job hung (``hang_reason`` says why); the job loop
    should then give the job up (retry or release it), whatever the backend returned.
    """

    job_id: str
    started_at: float
    last_progress_at: float
    hung: threading.Event = field(default_factory=threading.Event)
    hang_reason: str | None = None


def hang_reason(job: WatchedJob, now: float, job_timeout_s: float, stall_timeout_s: float) -> str | None:
    """``job_timeout`` past the job's time limit, ``stalled`` without progress too long, else None."""
    if now - job.started_at >= job_timeout_s:
        return "job_timeout"
    if now - job.last_progress_at >= stall_timeout_s:
        return "stalled"
    return None


# --- the child's output ----------------------------------------------------------------------


# --- the process group -----------------------------------------------------------------------


# --- the supervisor --------------------------------------------------------------------------


class WebUISupervisor:
    """Launches (or attaches to) the WebUI and keeps it ready; see the module docstring.

    Threads: callbacks run on the monitor thread, or on the thread that called
    :meth:`restart_if_over_memory` or :meth:`stop`; keep them short (set a flag, pause intake).
    """

    def __init__(
        self,
        process: ProcessConfig,
        probe: Callable[[], Health],
        expected_models: list[str],
        *,
        interrupt: Callable[[], None],
        job_timeout_s: float,
        stall_timeout_s: float,
        launcher: Launcher = launch_guarded,
        clock: Clock = time.monotonic,
        wait: Wait = threading.Event.wait,
        memory_probe: Callable[[], int | None] | None = None,
        probe_interval_s: float = PROBE_INTERVAL_S,
        hang_grace_s: float = HANG_INTERRUPT_GRACE_S,
    ) -> None:
        """``memory_probe`` returns the GPU memory in use in bytes (None when unknown); it defaults to
        :class:`~sdagent.gpu.memory.GpuMemoryProbe` when ``process.max_gpu_memory_bytes`` is set."""
        self._process = process
        self._probe = probe
        self._expected_models = list(expected_models)
        self._interrupt = interrupt
        self._job_timeout_s = job_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._launcher = launcher
        self._clock = clock
        self._wait = wait
        if memory_probe is None and process.max_gpu_memory_bytes is not None:
            memory_probe = GpuMemoryProbe().used_bytes
        self._memory_probe = memory_probe
        self._probe_interval_s = probe_interval_s
        self._hang_grace_s = hang_grace_s
        self._policy = RestartPolicy(
            process.restart_backoff_initial_s,
            process.restart_backoff_max_s,
            process.crash_loop_restarts,
            process.crash_loop_window_s,
        )
        self._output = OutputLog(clock)

        # The child: replaced only under _lock; _generation counts launches so that a restart
        # decided before a wait does not replace a child someone else launched meanwhile.
        self._lock = threading.RLock()
        self._child: subprocess.Popen | None = None
        self._generation = 0
        self._launched_at = clock()
        self._pumps: list[threading.Thread] = []
        self._monitor: threading.Thread | None = None
        self._stopping = threading.Event()

        # Readiness and the job in flight, under _state_lock.
        self._state_lock = threading.Lock()
        self._ready = False
        self._ready_reason = "starting"
        self._ready_event = threading.Event()
        self._unready_since = clock()
        self._failed_probes = 0
        # A probe's verdict counts only if nothing happened to the child between the probe's start
        # and its end: an answer from a WebUI being replaced must not make it, or its successor, look
        # ready. _replacing counts restarts under way; _epoch moves on at every event and launch.
        self._replacing = 0
        self._epoch = 0
        self._job: WatchedJob | None = None
        self._stopped = False
        self._state_callbacks: list[StateCallback] = []
        self._hang_callbacks: list[HangCallback] = []

        # Counters for metrics; written by one thread at a time, read from any.
        self.restarts = 0  # launches after the first, whatever the reason
        self.crashes = 0  # the child exited on its own
        self.crash_loops = 0  # times the restarts became a crash loop
        self.hangs = 0
        self.memory_restarts = 0

    @classmethod
    def for_backend(cls, config: WebUIBackendConfig, backend: Backend, **seams: Any) -> WebUISupervisor:
        """The supervisor of ``backend``'s WebUI as ``[backend]`` configures it."""
        return cls(
            config.process,
            backend.health,
            config.models,
            interrupt=backend.interrupt,
            job_timeout_s=config.job_timeout_s,
            stall_timeout_s=config.stall_timeout_s,
            **seams,
        )

    # --- properties ----------------------------------------------------------------------------

    @property
    def managed(self) -> bool:
        """True when the supervisor launches the WebUI; False when it attaches to one."""
        return bool(self._process.command)

    @property
    def ready(self) -> bool:
        """The probe answered ready and lists every expected model."""
        return self._ready

    @property
    def ready_reason(self) -> str:
        """Why readiness is what it is: ready, starting, probe, models_missing, exited,
        launch_failed, hung, memory, ready_timeout, stopped."""
        return self._ready_reason

    @property
    def busy(self) -> bool:
        """A job is in flight (between :meth:`job_started` and :meth:`job_finished`)."""
        return self._job is not None

    @property
    def pid(self) -> int | None:
        """The WebUI child's pid, also its process group id; None when attached or not running."""
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    @property
    def in_crash_loop(self) -> bool:
        return self._policy.in_crash_loop

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Launch the WebUI (managed mode) and the monitor; returns at once, see :meth:`wait_ready`.

        Raises OSError when the command cannot be started at all (no such file, not executable).
        """
        if self._monitor is not None:
            raise RuntimeError("the supervisor is already started")
        if self.managed:
            self._warn_missing_preload()
            with self._lock:
                self._launch()
        self._monitor = threading.Thread(target=self._monitor_loop, name="webui-monitor", daemon=True)
        self._monitor.start()
        log.info("webui.supervising", managed=self.managed, expected_models=self._expected_models)

    def wait_ready(self, timeout: float) -> bool:
        """Block until the WebUI is ready, at most ``timeout`` seconds; True when it is."""
        return self._wait(self._ready_event, timeout)

    def stop(self) -> None:
        """Stop the monitor, then SIGTERM the WebUI's group, SIGKILL it after ``stop_timeout_s``.

        Safe to call twice; an attached WebUI is left running.
        """
        with self._state_lock:
            if self._stopped:
                return
            self._stopped = True
        self._stopping.set()
        with self._lock:
            if self._child is not None:
                self._terminate(self._child)
        for thread in [self._monitor, *self._pumps]:
            if thread is not None and thread is not threading.current_thread():
                thread.join(THREAD_JOIN_S)
                if thread.is_alive():
                    log.warning("webui.thread_still_running", thread=thread.name)
        self._set_ready(False, "stopped")
        log.info("webui.stopped", restarts=self.restarts, crash_loops=self.crash_loops, hangs=self.hangs)

    # --- callbacks -----------------------------------------------------------------------------

    def on_state_change(self, callback: StateCallback) -> None:
        """Call ``callback(ready, reason)`` on every change of readiness (pause and resume intake)."""
        with self._state_lock:
            self._state_callbacks.append(callback)

    def on_hang(self, callback: HangCallback) -> None:
        """Call ``callback(job_id, reason)`` when the job in flight is found hung, before the
        backend's interrupt: the job loop takes the job back (e.g. aborts it as ``hung``)."""
        with self._state_lock:
            self._hang_callbacks.append(callback)

    # --- the job in flight ---------------------------------------------------------------------

    @contextlib.contextmanager
    def watch_job(self, job_id: str) -> Iterator[WatchedJob]:
        """Watch a job for hangs while the block runs; call :meth:`job_progress` on each step."""
        job = self.job_started(job_id)
        try:
            yield job
        finally:
            self.job_finished()

    def job_started(self, job_id: str) -> WatchedJob:
        now = self._clock()
        job = WatchedJob(job_id, started_at=now, last_progress_at=now)
        with self._state_lock:
            if self._job is not None:
                log.warning("webui.job_not_finished", job_id=self._job.job_id, next_job_id=job_id)
            self._job = job
        return job

    def job_progress(self) -> None:
        """The job in flight made progress (a step, a node): resets the stall timer."""
        now = self._clock()
        with self._state_lock:
            if self._job is not None:
                self._job.last_progress_at = now

    def job_finished(self) -> None:
        with self._state_lock:
            self._job = None

    # --- memory ceiling ------------------------------------------------------------------------

    def restart_if_over_memory(self) -> bool:
        """Between jobs: restart the WebUI gracefully when it is above a memory ceiling.

        True when it restarted; readiness then goes False until the new WebUI is ready. Never acts
        while a job is in flight, in attached mode, or when no ceiling is configured.
        """
        if not self.managed or self.busy or self._stopping.is_set():
            return False
        with self._lock:
            child, generation = self._child, self._generation
        if child is None or child.poll() is not None:
            return False  # exited: the monitor restarts it
        over = self._memory_over_ceiling(child.pid)
        if over is None:
            return False
        log.warning("webui.memory_restart", pid=child.pid, **over)
        with self._replacing_child("memory"), self._lock:
            if self._stopping.is_set() or generation != self._generation:
                return False  # stopped, or the monitor replaced the child meanwhile
            self._terminate(child)
            self.memory_restarts += 1
            self._relaunch("memory")
        return True

    def _memory_over_ceiling(self, pid: int) -> dict[str, Any] | None:
        fields: dict[str, Any] = {}
        over = []
        max_rss = self._process.max_rss_bytes
        if max_rss is not None:
            fields.update(rss_bytes=tree_rss_bytes(pid), max_rss_bytes=max_rss)
            if fields["rss_bytes"] > max_rss:
                over.append("rss")
        max_gpu = self._process.max_gpu_memory_bytes
        if max_gpu is not None and self._memory_probe is not None:
            fields.update(gpu_memory_bytes=self._gpu_memory_used(), max_gpu_memory_bytes=max_gpu)
            if fields["gpu_memory_bytes"] is not None and fields["gpu_memory_bytes"] > max_gpu:
                over.append("gpu")
        return {"over": over, **fields} if over else None

    def _gpu_memory_used(self) -> int | None:
        try:
            return self._memory_probe() if self._memory_probe is not None else None
        except Exception as exc:  # a metrics seam must never take the job loop down
            log.warning("webui.gpu_memory_probe_failed", error=str(exc))
            return None

    # --- the monitor ---------------------------------------------------------------------------

    def check(self) -> None:
        """One round of the monitor: exited child, hung job, readiness. Tests may call it directly."""
        if self.managed and self._check_child():
            return
        if self._check_hang():
            return
        self._check_readiness()

    def _monitor_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.check()
            except Exception:
                log.exception("webui.monitor_error", backoff_s=MONITOR_ERROR_BACKOFF_S)
                self._wait(self._stopping, MONITOR_ERROR_BACKOFF_S)
                continue
            self._wait(self._stopping, self._probe_interval_s)

    def _check_child(self) -> bool:
        """Restart a child that exited (or could not be launched); True when it did."""
        with self._lock:
            if self._stopping.is_set():
                return True
            child, generation = self._child, self._generation
            exit_code = child.poll() if child is not None else None
            if child is not None and exit_code is None:
                return False
        if child is not None:
            self.crashes += 1
            log.warning(
                "webui.exited",
                pid=child.pid,
                exit_code=exit_code,
                signal=signal_name(exit_code),
                uptime_s=round(self._clock() - self._launched_at, 3),
            )
        self._restart_after_failure("exited" if child is not None else "launch_failed", generation)
        return True

    def _check_hang(self) -> bool:
        """Interrupt, then kill and restart, the WebUI running a hung job; True when it found one."""
        now = self._clock()
        with self._state_lock:
            job = self._job
            if job is None or job.hang_reason is not None:
                return False
            reason = hang_reason(job, now, self._job_timeout_s, self._stall_timeout_s)
            if reason is None:
                return False
            job.hang_reason = reason
            callbacks = list(self._hang_callbacks)
        self.hangs += 1
        log.error(
            "webui.hung",
            job_id=job.job_id,
            reason=reason,
            running_s=round(now - job.started_at, 3),
            since_progress_s=round(now - job.last_progress_at, 3),
            managed=self.managed,
        )
        # The job loop hears first: an interrupted A1111 returns the partial images as a success,
        # which must not be published as the job's result.
        for callback in callbacks:
            self._call_safely("on_hang", callback, job.job_id, reason)
        job.hung.set()
        self._call_safely("interrupt", self._interrupt)
        generation = self._generation
        if self._wait(self._stopping, self._hang_grace_s) or not self.managed:
            return True  # attached: interrupting is all the agent can do
        self._restart_after_failure("hung", generation)
        return True

    def _check_readiness(self) -> None:
        epoch = self._epoch
        health = self._probe_safely()
        now = self._clock()
        if not health.ready:
            self._probe_failed("probe", health.detail, now, epoch)
            return
        missing = [model for model in self._expected_models if not is_listed(model, health.models)]
        if missing:
            self._probe_failed("models_missing", f"missing {', '.join(missing)}", now, epoch)
            return
        with self._state_lock:
            self._failed_probes = 0
        ready_fields: dict[str, Any] = {"models": len(health.models), "loaded_model": health.loaded_model}
        if self.managed:
            ready_fields["since_launch_s"] = round(now - self._launched_at, 3)
        if self._set_ready(True, "ready", epoch=epoch, **ready_fields) and self._policy.settle(now):
            log.info("webui.crash_loop_ended", restarts=self.restarts)

    def _probe_failed(self, reason: str, detail: str, now: float, epoch: int) -> None:
        with self._state_lock:
            self._failed_probes += 1
            failed = self._failed_probes
        if not self._ready or failed >= UNREADY_AFTER_FAILED_PROBES:
            self._set_ready(False, reason, epoch=epoch, detail=detail)
        # Never ready, or unready for as long as a start may take: restart it. Not during a job,
        # where the hang detector decides.
        unready_for = now - self._unready_since
        if self.managed and not self._ready and not self.busy and unready_for >= self._process.ready_timeout_s:
            log.error("webui.ready_timeout", timeout_s=self._process.ready_timeout_s, reason=reason, detail=detail)
            self._restart_after_failure("ready_timeout", self._generation)

    def _probe_safely(self) -> Health:
        try:
            return self._probe()
        except Exception as exc:  # Backend.health() should not raise; a probe that does is "down"
            return Health(ready=False, detail=f"probe raised {type(exc).__name__}: {exc}")

    # --- launching and stopping ----------------------------------------------------------------

    def _restart_after_failure(self, reason: str, generation: int) -> None:
        """Kill what is left of a failed WebUI, back off, launch it again (monitor thread only)."""
        with self._replacing_child(reason):
            self._restart_with_backoff(reason, generation)

    def _restart_with_backoff(self, reason: str, generation: int) -> None:
        with self._lock:
            if self._stopping.is_set() or generation != self._generation:
                return
            if self._child is not None:
                self._terminate(self._child)  # also kills what the WebUI left behind in its group
            decision = self._policy.record(self._clock())
        if decision.entered_crash_loop:
            self.crash_loops += 1
            log.error(
                "webui.crash_loop",
                restarts=decision.recent_restarts,
                window_s=self._process.crash_loop_window_s,
                backoff_s=decision.backoff_s,
                crash_loops=self.crash_loops,
            )
        # Loud while in a crash loop: every restart is an error until the window clears.
        emit = log.error if decision.crash_loop else log.warning
        emit(
            "webui.restarting",
            reason=reason,
            backoff_s=decision.backoff_s,
            crash_loop=decision.crash_loop,
            recent_restarts=decision.recent_restarts,
        )
        if self._wait(self._stopping, decision.backoff_s):
            return
        with self._lock:
            if self._stopping.is_set() or generation != self._generation:
                return
            self._relaunch(reason)

    def _relaunch(self, reason: str) -> None:
        """Launch again after a restart (caller holds _lock); a failed launch is retried by the monitor."""
        try:
            self._launch()
        except OSError as exc:
            log.error("webui.launch_failed", reason=reason, error=str(exc))
            return
        self.restarts += 1
        log.info("webui.restarted", reason=reason, pid=self.pid, restarts=self.restarts)

    def _launch(self) -> None:
        """Start the WebUI in a new session, its own process group (caller holds _lock)."""
        command = self._process.command
        assert command  # managed mode only
        self._generation += 1
        self._child = None
        child = self._launcher(
            command,
            cwd=self._process.cwd,
            env=self._child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._child = child
        self._launched_at = self._clock()
        with self._state_lock:
            self._epoch += 1
            self._unready_since = self._launched_at
            self._failed_probes = 0
        self._start_pumps(child)
        # argv[0] only: the arguments may hold credentials (--api-auth user:password).
        log.info("webui.launched", pid=child.pid, program=command[0], generation=self._generation)

    def _child_env(self) -> dict[str, str] | None:
        if not self._process.env:
            return None  # inherit the agent's environment unchanged
        # The configured variables (LD_PRELOAD for tcmalloc among them) on top of the inherited ones.
        return {**os.environ, **self._process.env}

    def _warn_missing_preload(self) -> None:
        # The dynamic loader only warns about a missing LD_PRELOAD library, in the child's output
        # at every exec; say it once, plainly. Bare names are searched in the library path: not checked.
        for path in re.split(r"[:\s]+", self._process.env.get("LD_PRELOAD", "")):
            if "/" in path and not os.path.exists(path):
                log.warning("webui.ld_preload_missing", path=path)

    def _terminate(self, child: subprocess.Popen) -> None:
        """SIGTERM the child's process group, SIGKILL it after ``stop_timeout_s``, reap the child.

        Caller holds _lock. The group gets SIGKILL even when the leader exited in time: a worker
        it left behind would keep GPU memory from the next WebUI.
        """
        pgid = child.pid  # start_new_session: the child leads its own group
        # Taken first: a descendant that left the group (setsid) is still the WebUI's.
        members = descendants(child.pid)
        timeout = self._process.stop_timeout_s
        if child.poll() is None:
            signal_group(pgid, signal.SIGTERM)
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("webui.stop_timeout", pid=child.pid, timeout_s=timeout)
        signal_group(pgid, signal.SIGKILL)
        for process in members:
            with contextlib.suppress(psutil.Error):
                process.kill()  # psutil checks the pid was not reused
        try:
            child.wait(KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            log.error("webui.unkillable", pid=child.pid, waited_s=KILL_WAIT_S)
            return
        log.info("webui.terminated", pid=child.pid, exit_code=child.returncode, signal=signal_name(child.returncode))

    def _start_pumps(self, child: subprocess.Popen) -> None:
        self._pumps = [thread for thread in self._pumps if thread.is_alive()]
        for name, stream in (("stdout", child.stdout), ("stderr", child.stderr)):
            if stream is None:
                continue
            thread = threading.Thread(
                target=self._pump, args=(stream, name, child.pid), name=f"webui-{name}-{child.pid}", daemon=True
            )
            thread.start()
            self._pumps.append(thread)

    def _pump(self, stream: IO[bytes], name: str, pid: int) -> None:
        try:
            with stream:
                for raw in iter(lambda: stream.readline(OUTPUT_READ_LIMIT_BYTES), b""):
                    line = clean_output_line(raw)
                    if line:
                        self._output.emit(line, name, pid)
        except (OSError, ValueError) as exc:  # the pipe closed under the reader
            log.warning("webui.output_failed", stream=name, pid=pid, error=str(exc))
        self._output.flush_dropped()

    # --- readiness state -----------------------------------------------------------------------

    def _set_ready(self, ready: bool, reason: str, *, epoch: int | None = None, **fields: Any) -> bool:
        """Record readiness; ``epoch`` marks a probe's verdict, dropped (False) when an event came since."""
        with self._state_lock:
            if epoch is not None and (self._replacing > 0 or epoch != self._epoch):
                return False
            if epoch is None and not ready:
                self._epoch += 1
            changed = ready != self._ready
            reason_changed = reason != self._ready_reason
            self._ready = ready
            self._ready_reason = reason
            if changed and not ready:
                self._ready_event.clear()
                self._unready_since = self._clock()
            callbacks = list(self._state_callbacks) if changed else []
        if changed and ready:
            log.info("webui.ready", **fields)
        elif changed:
            log.warning("webui.unready", reason=reason, **fields)
        elif reason_changed and not ready:
            log.info("webui.not_ready", reason=reason, **fields)
        for callback in callbacks:
            self._call_safely("on_state_change", callback, ready, reason)
        if ready:
            # After the callbacks: whoever wait_ready() wakes finds intake already resumed.
            with self._state_lock:
                if self._ready:
                    self._ready_event.set()
        return True

    @contextlib.contextmanager
    def _replacing_child(self, reason: str) -> Iterator[None]:
        """The child is going away: unready now, and no probe verdict counts until the block ends."""
        with self._state_lock:
            self._replacing += 1
        self._set_ready(False, reason)
        try:
            yield
        finally:
            with self._state_lock:
                self._replacing -= 1
                self._epoch += 1

    def _call_safely(self, what: str, function: Callable[..., None], *args: Any) -> None:
        try:
            function(*args)
        except Exception:  # someone else's bug must not stop the supervision
            log.exception("webui.callback_failed", callback=what)
