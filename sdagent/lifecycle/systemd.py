"""Tell systemd how the agent is doing: sd_notify(3) in a few lines, no dependencies.

The unit (``systemd/rootfs/etc/systemd/system/sdagent.service``) is ``Type=notify`` with
``WatchdogSec=``: the agent says ``READY=1`` once the backend answers and the cache is prewarmed,
pings the watchdog from its main loop, says ``STOPPING=1`` when it starts to drain, and asks for
more time (``EXTEND_TIMEOUT_USEC``) while a slow start or drain is still making progress.

The caller passes the environment in (:func:`from_environment`); nothing here reads it. Without
``NOTIFY_SOCKET`` (a terminal, a test, another supervisor) every method does nothing. A failed send
is logged and dropped: a notification is advice to the service manager, never a reason to stop.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger(__name__)

# sd_watchdog_enabled(3) asks for a ping at least every half period; a quarter leaves room for one
# slow turn of the main loop without a missed deadline.
WATCHDOG_PING_FRACTION = 4


class Notifier:
    """Sends sd_notify(3) messages to one datagram socket; a no-op when ``address`` is None.

    ``address`` is ``NOTIFY_SOCKET``: a path, or ``@name`` for Linux's abstract namespace.
    ``watchdog_usec``/``watchdog_pid`` are ``WATCHDOG_USEC``/``WATCHDOG_PID``: the watchdog applies
    to this process only when the pid matches (or is unset).
    """

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
        pid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._address = _socket_address(address)
        self._period = _watchdog_period(watchdog_usec, watchdog_pid, os.getpid() if pid is None else pid)
        self._clock = clock
        self._last_ping: float | None = None
        self._socket: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when there is a service manager listening."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (``notify(READY=1, STATUS="up")``); True when sent."""
        if self._address is None or not fields:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message, self._address)
        except OSError as exc:
            # The manager restarted or the socket went away: nothing to do but say so once.
            if not self._warned:
                log.warning("systemd.notify_failed", error=str(exc), fields=sorted(fields))
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete: the unit becomes active and units ordered after it start."""
        return self.notify(READY=1, **_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """The agent is draining; systemd shows the unit as deactivating."""
        return self.notify(STOPPING=1, **_status(status))

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(**_status(text))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start or stop timeout fires (counted from now)."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(0, int(seconds * 1_000_000)))

    def watchdog_period(self) -> float | None:
        """Seconds systemd waits for a ping before it kills the agent; None without a watchdog."""
        return self._period

    def watchdog_ping(self) -> bool:
        """Ping the watchdog, at most every period/``WATCHDOG_PING_FRACTION``; True when sent.

        Cheap enough to call on every turn of the main loop.
        """
        if self._period is None or self._address is None:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self._period / WATCHDOG_PING_FRACTION:
            return False
        self._last_ping = now
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def from_environment(environ: Mapping[str, str], *, pid: int | None = None) -> Notifier:
    """A notifier for the variables systemd sets on a ``Type=notify`` service (``os.environ``)."""
    return Notifier(
        environ.get("NOTIFY_SOCKET"),
        watchdog_usec=environ.get("WATCHDOG_USEC"),
        watchdog_pid=environ.get("WATCHDOG_PID"),
        pid=pid,
    )


def _socket_address(address: str | None) -> str | None:
    if not address or address[0] not in "/@" or len(address) < 2:
        # sd_notify(3) also accepts vsock:, which a service on the host itself never gets.
        return None
    return "\0" + address[1:] if address[0] == "@" else address


def _watchdog_period(usec: str | None, watchdog_pid: str | None, pid: int) -> float | None:
    try:
        period = int(usec) / 1_000_000 if usec else None
        owner = int(watchdog_pid) if watchdog_pid else pid
    except ValueError:
        return None
    if period is None or period <= 0 or owner != pid:
        return None
    return period


def _status(text: str | None) -> dict[str, str]:
    # One message is KEY=value lines: a newline in the text would start a bogus key.
    return {} if text is None else {"STATUS": " ".join(text.splitlines())}
