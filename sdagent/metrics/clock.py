"""The publisher's sense of time, a seam: the system clock, or a faster one for the benchmark."""

from __future__ import annotations

import threading
import time


class Clock:
    """Wall time for timestamps, monotonic time for scheduling, and an interruptible wait."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Wait up to ``seconds`` of this clock's time; True when ``event`` was set."""
        return event.wait(max(0.0, seconds))


class ScaledClock(Clock):
    """Time that runs ``factor`` times faster than real time (a minute in a second at 60).

    The work done per tick does not depend on how fast time runs, so CPU seconds divided by the
    scaled seconds elapsed is the CPU fraction the same work costs in real time.
    """

    def __init__(self, factor: float) -> None:
        if factor <= 0:
            raise ValueError("factor must be positive")
        self.factor = factor
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def time(self) -> float:
        return self._wall0 + (time.monotonic() - self._mono0) * self.factor

    def monotonic(self) -> float:
        return self._mono0 + (time.monotonic() - self._mono0) * self.factor

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(max(0.0, seconds) / self.factor)
