"""What the agent's loop does between its intake's turns: cheap checks, each on its own clock."""

from __future__ import annotations

import time
from collections.abc import Callable

from sdagent.agent.beacon import AgentBeacon, AgentState
from sdagent.lifecycle.autoscaling import GroupMembership
from sdagent.lifecycle.systemd import Notifier
from sdagent.metrics.jobs import JobMetrics
from sdagent.webui.supervisor import WebUISupervisor

MEMORY_CHECK_INTERVAL_S = 5.0  # psutil walks the WebUI's process tree: not on every loop turn


class Chores:
    """Watchdog pings, scale-in protection, the beacon, the in-flight gauge and the WebUI's
    memory ceiling; :meth:`tick` runs once per turn of the loop, from the loop's own thread."""

    def __init__(
        self,
        notifier: Notifier,
        beacon: AgentBeacon,
        *,
        state: Callable[[], AgentState],
        group: GroupMembership | None = None,
        supervisor: WebUISupervisor | None = None,
        job_metrics: JobMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._notifier = notifier
        self._beacon = beacon
        self._state = state
        self._group = group
        self._supervisor = supervisor
        self._job_metrics = job_metrics
        self._clock = clock
        self._watchdog_s = notifier.watchdog_period()
        self._next_ping = 0.0
        self._next_memory_check = 0.0

    def tick(self, busy: bool) -> None:
        now = self._clock()
        if self._job_metrics is not None:
            self._job_metrics.set_in_flight(1 if busy else 0)
        if self._watchdog_s is not None and now >= self._next_ping:
            # From the loop itself: a stuck loop stops the pings and systemd restarts us.
            self._notifier.watchdog_ping()
            self._next_ping = now + self._watchdog_s / 2
        if self._group is not None:
            self._group.follow_busy(busy)
        self._beacon.follow(self._state())
        if self._supervisor is not None and not busy and now >= self._next_memory_check:
            # Between jobs only: a restart for memory never cuts a job short.
            self._supervisor.restart_if_over_memory()
            self._next_memory_check = self._clock() + MEMORY_CHECK_INTERVAL_S

    def leave(self) -> None:
        self._beacon.leave()  # the tombstone: the agents topic forgets this agent
