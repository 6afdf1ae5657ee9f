"""``python -m sdagent.webui.guard --parent PID -- COMMAND...``: runs the WebUI so that it dies
with its agent, in every setup (systemd, the devstack, tests, other supervisors).

The agent starts the guard as the leader of a new session, and the guard starts COMMAND in that
same process group. The kernel sends the guard SIGUSR1 when the agent's thread that started it
dies (``PR_SET_PDEATHSIG``: a SIGKILL or a crash of the agent included); the guard then ends the
whole group, SIGTERM first and SIGKILL after a grace, so a shell launcher's children (``webui.sh``
starts Python without ``exec``) go too. Signals the supervisor sends to the group reach the WebUI
directly: the guard only waits, and exits as the WebUI did, so the supervisor sees its status.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from types import FrameType

from sdagent.webui.process import set_parent_death_signal

PARENT_DIED = signal.SIGUSR1
GRACE_S = 10.0  # between SIGTERM and SIGKILL of the group: a WebUI frees the GPU on SIGTERM


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdagent.webui.guard")
    parser.add_argument("--parent", type=int, required=True, help="the agent's pid")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run")
    signal.signal(PARENT_DIED, _end_group)
    # The group's own SIGTERM/SIGINT/SIGHUP are for the WebUI; the guard waits for it to leave.
    for ignored in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(ignored, signal.SIG_IGN)
    set_parent_death_signal(PARENT_DIED)
    if os.getppid() != args.parent:  # the agent died before the kernel was asked to tell us
        _end_group(PARENT_DIED, None)
    try:
        # Default dispositions for the WebUI: ignored signals would otherwise be inherited.
        child = subprocess.Popen(command, restore_signals=True, preexec_fn=_default_signals)
    except OSError as exc:
        print(f"sdagent.webui.guard: cannot run {command[0]}: {exc}", file=sys.stderr)
        return 127
    code = child.wait()
    if code < 0:  # killed by a signal: die by it too, so the supervisor reads the same status
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _default_signals() -> None:
    for name in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, PARENT_DIED):
        signal.signal(name, signal.SIG_DFL)


def _end_group(_signum: int, _frame: FrameType | None) -> None:
    """The agent is gone: nobody will stop the WebUI but us."""
    os.killpg(0, signal.SIGTERM)  # the guard ignores it; every other member gets it
    threading.Timer(GRACE_S, os.killpg, args=(0, signal.SIGKILL)).start()


if __name__ == "__main__":
    sys.exit(main())
