"""The WebUI's guard: it exits as the WebUI did, and ends the WebUI's whole group when the agent dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

from sdagent.webui.process import guarded_command


def run_guarded(shell: str) -> int:
    return subprocess.run(guarded_command(["sh", "-c", shell]), start_new_session=True, timeout=30).returncode


def test_the_guard_exits_with_the_webui_s_own_status():
    assert run_guarded("exit 3") == 3
    assert run_guarded("kill -TERM $$") == -signal.SIGTERM  # a signal death reads as one


def test_a_signal_to_the_group_reaches_the_webui_and_the_guard_reports_it():
    guard = subprocess.Popen(guarded_command(["sleep", "30"]), start_new_session=True)
    time.sleep(1.0)
    os.killpg(guard.pid, signal.SIGTERM)  # what the supervisor's stop does
    assert guard.wait(10) == -signal.SIGTERM


def test_the_whole_group_dies_when_the_agent_is_killed(tmp_path):
    pids = tmp_path / "pids"
    # The "agent": starts the guard from a thread that lives on, as the supervisor does, then waits.
    agent_script = textwrap.dedent(f"""
        import subprocess, sys, time
        from sdagent.webui.process import guarded_command
        # A shell that starts a child without exec, as webui.sh starts Python.
        guard = subprocess.Popen(guarded_command(["sh", "-c", "sleep 60 & echo $! > {pids}; wait"]),
                                 start_new_session=True)
        time.sleep(60)
    """)
    agent = subprocess.Popen([sys.executable, "-c", agent_script])
    deadline = time.monotonic() + 20
    while not (pids.exists() and pids.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    grandchild = psutil.Process(int(pids.read_text()))
    guard = next(p for p in psutil.Process(agent.pid).children() if "sdagent.webui.guard" in " ".join(p.cmdline()))
    agent.kill()
    agent.wait(10)
    gone, alive = psutil.wait_procs([guard, grandchild], timeout=15)
    assert alive == [], f"outlived the agent: {alive}"
