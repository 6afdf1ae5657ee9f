"""The dev stack's child servers (Kafka, moto, AEMM): started in their own process group, waited
for until they answer, stopped with SIGTERM and, if they linger, SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable


def signal_group(process: subprocess.Popen, signum: int) -> None:
    """Signal the child's whole process group (a JVM or a Go server may have children of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def stop_group(process: subprocess.Popen, timeout_s: float) -> bool:
    """SIGTERM the group and wait; SIGKILL it after ``timeout_s``. True when it left in time."""
    if process.poll() is not None:
        return True
    signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout_s)
        return True
    except subprocess.TimeoutExpired:
        signal_group(process, signal.SIGKILL)
        process.wait()
        return False


def wait_until_answering(
    process: subprocess.Popen | None,
    answers: Callable[[], bool],
    *,
    name: str,
    address: str,
    timeout_s: float,
    interval_s: float = 0.1,
) -> str | None:
    """Poll ``answers`` until it says yes; None then, else why the server is not up."""
    if process is None:
        return f"{name} was not started"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"{name} exited with code {process.returncode} while starting"
        if answers():
            return None
        time.sleep(interval_s)
    return f"{name} did not answer on {address} within {timeout_s:.0f}s"


def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0, interval_s: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout_s`` passed (its last answer)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
