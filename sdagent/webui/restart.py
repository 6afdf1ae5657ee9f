"""When to launch a crashed WebUI again: capped exponential backoff, and a crash loop counted."""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartDecision:
    """How long to wait before the next launch, and whether restarts have become a crash loop."""

    backoff_s: float
    recent_restarts: int  # within the crash-loop window, this one included
    crash_loop: bool
    entered_crash_loop: bool  # this restart is the one that made it a crash loop


class RestartPolicy:
    """Capped exponential backoff over the failures within the crash-loop window.

    The n-th failure within ``window_s`` waits ``initial_s * 2**(n-1)``, capped at ``max_s``; failures
    spaced wider than the window start again from ``initial_s``. More than ``loop_restarts`` within the
    window is a crash loop: the backoff stays at its cap until the window holds no more than that.
    """

    def __init__(self, initial_s: float, max_s: float, loop_restarts: int, window_s: float) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._loop_restarts = loop_restarts
        self._window_s = window_s
        self._failures: collections.deque[float] = collections.deque()
        self.in_crash_loop = False

    def record(self, now: float) -> RestartDecision:
        """Count a failure at ``now`` and decide the backoff before the next launch."""
        self._expire(now)
        self._failures.append(now)
        recent = len(self._failures)
        crash_loop = recent > self._loop_restarts
        entered = crash_loop and not self.in_crash_loop
        self.in_crash_loop = crash_loop
        if crash_loop:
            backoff = self._max_s
        else:
            backoff = min(self._max_s, self._initial_s * 2 ** min(recent - 1, 62))
        return RestartDecision(backoff, recent, crash_loop, entered)

    def settle(self, now: float) -> bool:
        """Forget failures older than the window; True when that ends a crash loop."""
        self._expire(now)
        if self.in_crash_loop and len(self._failures) <= self._loop_restarts:
            self.in_crash_loop = False
            return True
        return False

    def _expire(self, now: float) -> None:
        while self._failures and now - self._failures[0] > self._window_s:
            self._failures.popleft()
