"""Lock files with flock(2), always on the LOCAL cache disk.

flock can silently succeed on some network file systems (Hugging Face's hub cache learned it), so
lock files live next to the cache on local NVMe, never on the store's mount. A lock belongs to
the open file, so every holder opens its own: two holders in one process exclude each other like
two processes do, which is what lets an in-process pin stop an eviction.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

POLL_INITIAL_S = 0.02
POLL_MAX_S = 0.5


class FileLock:
    """One holder's flock on ``path``: shared (a model in use) or exclusive (staging, evicting)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, shared: bool = False, timeout: float | None = None) -> bool:
        """Take the lock; ``timeout=0`` tries once, None waits for ever. False when not taken."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this holder")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            if timeout is None:
                fcntl.flock(fd, mode)  # blocks without holding the GIL
            elif not _poll(fd, mode, timeout):
                os.close(fd)
                return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor of the open file releases the lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _poll(fd: int, mode: int, timeout: float) -> bool:
    # flock has no timeout: try without blocking and back off, up to the deadline.
    deadline = time.monotonic() + timeout
    pause = POLL_INITIAL_S
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, POLL_MAX_S)
