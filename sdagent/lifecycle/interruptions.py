"""What the agent does about each IMDS notice: drain, hold intake, or resume it.

- Spot interruption (terminate, stop, hibernate): drain now, with the notice's deadline.
- Auto Scaling target state ``Terminated``: drain, heartbeating and then completing the terminate
  hook; ``Warmed:*``: hold intake (prewarm only) until the state is ``InService``.
- Rebalance recommendation: ``drain`` early, or ``hold`` intake for ``rebalance_hold_s`` and
  resume if no interruption follows (configurable).
- Scheduled maintenance: hold intake while an event is active; resume when it is canceled or
  completed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import structlog

from sdagent.lifecycle.imds import ImdsError
from sdagent.lifecycle.notices import (
    LIFECYCLE_IN_SERVICE,
    LIFECYCLE_TERMINATED,
    LIFECYCLE_WARMED_PREFIX,
    Notice,
    NoticeKind,
    NoticeWatcher,
)

log = structlog.get_logger(__name__)


class DrainTarget(Protocol):
    """The part of the agent a notice can act on; every method is safe from any thread."""

    def request_drain(self, reason: str, deadline: float | None) -> None: ...

    def hold(self, reason: str) -> None: ...

    def unhold(self, reason: str) -> None: ...

    def terminating_by_group(self) -> None: ...


class InterruptionPolicy:
    """Turns notices into agent actions (runs on the notice watcher's thread)."""

    def __init__(
        self,
        agent: DrainTarget,
        *,
        rebalance: str = "hold",
        rebalance_hold_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        utc_now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._agent = agent
        self._rebalance = rebalance
        self._rebalance_hold_s = rebalance_hold_s
        self._clock = clock
        self._utc_now = utc_now
        self._rebalance_timer: threading.Timer | None = None

    def __call__(self, notice: Notice) -> None:
        log.info(
            "notice.received",
            kind=notice.kind.value,
            action=notice.action,
            state=notice.state,
            deadline=notice.deadline.isoformat() if notice.deadline else None,
        )
        handler = {
            NoticeKind.SPOT_INTERRUPTION: self._spot,
            NoticeKind.LIFECYCLE: self._lifecycle,
            NoticeKind.REBALANCE: self._rebalance_recommended,
            NoticeKind.MAINTENANCE: self._maintenance,
        }[notice.kind]
        handler(notice)

    def close(self) -> None:
        if self._rebalance_timer is not None:
            self._rebalance_timer.cancel()

    def _spot(self, notice: Notice) -> None:
        self._agent.request_drain(f"spot {notice.action}", self._monotonic(notice.deadline))

    def _lifecycle(self, notice: Notice) -> None:
        state = notice.state or ""
        if state == LIFECYCLE_TERMINATED:
            self._agent.terminating_by_group()
            self._agent.request_drain("autoscaling terminate", None)
        elif state.startswith(LIFECYCLE_WARMED_PREFIX):
            self._agent.hold("warm_pool")  # prewarm only; an InService state lets work in
        elif state == LIFECYCLE_IN_SERVICE:
            self._agent.unhold("warm_pool")

    def _rebalance_recommended(self, _notice: Notice) -> None:
        if self._rebalance == "drain":
            self._agent.request_drain("rebalance recommendation", None)
            return
        self._agent.hold("rebalance")
        # A recommendation may never be followed by an interruption: take work again after a while.
        if self._rebalance_timer is not None:
            self._rebalance_timer.cancel()
        self._rebalance_timer = threading.Timer(self._rebalance_hold_s, self._agent.unhold, args=("rebalance",))
        self._rebalance_timer.daemon = True
        self._rebalance_timer.start()

    def _maintenance(self, notice: Notice) -> None:
        reason = f"maintenance:{notice.event_id or notice.action}"
        if notice.cleared:
            self._agent.unhold(reason)
        else:
            self._agent.hold(reason)

    def _monotonic(self, deadline: datetime | None) -> float | None:
        if deadline is None:
            return None
        return self._clock() + max(0.0, (deadline - self._utc_now()).total_seconds())


class InterruptionWatch:
    """The notice watcher and the policy it feeds, started and stopped as one."""

    def __init__(self, watcher: NoticeWatcher, policy: InterruptionPolicy) -> None:
        self._watcher = watcher
        self._policy = policy

    def start(self) -> None:
        """Act on what IMDS says already (a restart mid-drain must not take work), then keep watching."""
        try:
            for notice in self._watcher.check_now():
                self._policy(notice)
        except ImdsError as exc:
            log.warning("imds.unavailable_at_start", error=str(exc))
        self._watcher.start()

    def stop(self) -> None:
        self._watcher.stop()
        self._policy.close()
