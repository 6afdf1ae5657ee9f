"""What other threads ask of the agent: hold intake for a reason, drain by a deadline, force the
drain short. Built first, so every part that asks (signal handlers, the notice policy, a lost GPU,
the WebUI supervisor) and every part that obeys (the intake, the agent's loop) share one object.
"""

from __future__ import annotations

import threading

import structlog

log = structlog.get_logger(__name__)

DEFAULT_STOP_REASON = "stop requested"


class Controls:
    """Thread-safe holds and stop request; implements the notice policy's ``DrainTarget``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Why intake is held (draining, backend down, warm pool...): no new job while any is set.
        self._holds: set[str] = set()
        self.stopping = threading.Event()
        self.forced = threading.Event()  # a second SIGTERM: release the job in flight now
        self.group_terminating = threading.Event()  # the group's terminate hook waits for us
        self._reason = DEFAULT_STOP_REASON
        self._deadline: float | None = None  # time.monotonic() value set by a notice

    # --- holds -----------------------------------------------------------------------------------

    def hold(self, reason: str) -> None:
        """Take no new job until :meth:`unhold` with the same reason; the job in flight goes on.
        The intake applies it (pauses its partitions) on its next turn."""
        with self._lock:
            if reason in self._holds:
                return
            self._holds.add(reason)
            holds = sorted(self._holds)
        log.info("intake.held", reason=reason, holds=holds)

    def unhold(self, reason: str) -> None:
        with self._lock:
            if reason not in self._holds:
                return
            self._holds.discard(reason)
            holds = sorted(self._holds)
        log.info("intake.unheld", reason=reason, holds=holds)

    @property
    def holds(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._holds)

    @property
    def held(self) -> bool:
        return bool(self._holds)  # a read of a set's truth is atomic; the loop asks every turn

    # --- stop and drain --------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ask the loop to leave; safe from a signal handler or another thread."""
        self.request_drain(reason, None)

    def request_drain(self, reason: str, deadline: float | None) -> None:
        """Ask the loop to leave and drain by ``deadline`` (a ``time.monotonic()`` value, or the
        configured drain timeout); the earliest deadline asked for wins."""
        with self._lock:
            if not self.stopping.is_set():
                self._reason = reason
                log.info("agent.stop_requested", reason=reason)
            if deadline is not None and (self._deadline is None or deadline < self._deadline):
                self._deadline = deadline
            self.stopping.set()

    def force(self) -> None:
        """Make a drain in progress release the job in flight now."""
        self.forced.set()

    def terminating_by_group(self) -> None:
        """The group is terminating this instance: heartbeat its hook while draining, complete it after."""
        self.group_terminating.set()

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def deadline(self) -> float | None:
        return self._deadline
