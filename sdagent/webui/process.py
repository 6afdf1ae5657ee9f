"""The WebUI's process group: signals to all of it, and its resident memory."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import psutil
import structlog

log = structlog.get_logger(__name__)

# Resolved up front: a hook between fork and exec must not load a library (it could deadlock on
# a lock another thread, e.g. librdkafka's, held at fork time).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: signal.Signals) -> None:
    """Have the kernel send ``sig`` to this process when the thread that started it dies (Linux)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(sig))


def guarded_command(command: Sequence[str]) -> list[str]:
    """``command`` run under :mod:`sdagent.webui.guard`, which ends it when this agent dies."""
    return [sys.executable, "-m", "sdagent.webui.guard", "--parent", str(os.getpid()), "--", *command]


def launch_guarded(command: Sequence[str], **popen: Any) -> subprocess.Popen:
    """The supervisor's launcher: the WebUI under its guard, the guard leading a new session."""
    return subprocess.Popen(guarded_command(command), **popen)


def signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # nothing left in the group
    except PermissionError as exc:  # a member changed its user id
        log.warning("webui.signal_denied", pgid=pgid, signal=sig.name, error=str(exc))


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants.

    A sum of RSS counts shared pages once per process, so it overstates a forking WebUI a little;
    PSS would be exact but reads every process's smaps, too slow to run between every two jobs.
    """
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue  # exited between the listing and the reading
    return total


def signal_name(exit_code: int | None) -> str | None:
    if exit_code is None or exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return None
