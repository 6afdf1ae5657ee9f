"""The WebUI's output folded into the agent's log: cleaned, bounded and rate-limited."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger(__name__)

Clock = Callable[[], float]


# Output folded into the log. A WebUI prints a few lines per job, but a progress bar or an error in
# a loop prints thousands a second; journald rate-limits per unit (10,000 messages per 30 s by
# default) and would drop the agent's own events with them.
OUTPUT_LINES_PER_S = 20.0


OUTPUT_BURST_LINES = 200


OUTPUT_LINE_MAX_CHARS = 2000


OUTPUT_READ_LIMIT_BYTES = 64 * 1024  # a progress bar never ends its line: read it in bounded pieces


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class TokenBucket:
    """Allows ``rate`` events a second on average and bursts of ``burst``; thread-safe."""

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


def clean_output_line(raw: bytes) -> str:
    """One line of the child's output as a terminal would show it: no colours, last redraw only."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    text = text.rsplit("\r", 1)[-1]  # a progress bar redraws its line with \r: keep the last state
    return _ANSI_ESCAPE.sub("", text).rstrip()


class OutputLog:
    """Folds the child's lines into the structured log, rate-limited and truncated."""

    def __init__(self, clock: Clock) -> None:
        self._bucket = TokenBucket(OUTPUT_LINES_PER_S, OUTPUT_BURST_LINES, clock)
        self._dropped = 0
        self._lock = threading.Lock()

    def emit(self, line: str, stream: str, pid: int) -> None:
        if not self._bucket.allow():
            with self._lock:
                self._dropped += 1
            return
        self.flush_dropped()
        fields: dict[str, Any] = {}
        if len(line) > OUTPUT_LINE_MAX_CHARS:
            fields["truncated_chars"] = len(line) - OUTPUT_LINE_MAX_CHARS
            line = line[:OUTPUT_LINE_MAX_CHARS]
        log.info("webui.output", line=line, stream=stream, pid=pid, **fields)

    def flush_dropped(self) -> None:
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            log.warning("webui.output_dropped", lines=dropped, max_lines_per_s=OUTPUT_LINES_PER_S)
