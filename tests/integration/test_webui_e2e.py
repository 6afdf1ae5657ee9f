"""The agent with a real WebUI process: the supervisor launches the simulator as a child, the
adapters drive it over HTTP, and a crash of the WebUI mid-job costs a restart, not the job."""

from __future__ import annotations

import json
import signal
import sys
import urllib.request

import psutil
import pytest
from test_failures import terminal_statuses
from test_pipeline import job, wait_until

from sdagent.devstack.kafka import free_loopback_port
from sdagent.devstack.stack import spawn_agent
from sdagent.jobs import Status


def webui_backend(kind: str, port: int, step_latency_s: float = 0.02) -> dict:
    command = [
        sys.executable,
        "-m",
        "sdagent",
        "sim",
        "--port",
        str(port),
        "--step-latency-s",
        str(step_latency_s),
        "--models",
        "sd15.safetensors",
        "sdxl_base.safetensors",
    ]
    return {
        "kind": kind,
        "url": f"http://127.0.0.1:{port}",
        "models": ["sd15.safetensors", "sdxl_base.safetensors"],
        "process": {
            "command": command,
            "ready_timeout_s": 60,
            "restart_backoff_initial_s": 0.2,
            "env": {"PYTHONUNBUFFERED": "1"},
        },
    }


def arm_fault(port: int, fault: dict) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/sim/faults",
        data=json.dumps(fault).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).close()


@pytest.mark.parametrize("kind", ["a1111", "comfyui"])
def test_jobs_run_through_a_supervised_webui_and_survive_its_crash(pipeline, tmp_path, kind):
    port = free_loopback_port()
    # Production-like backoff: the supervisor notices a dead WebUI within its probe interval (2 s)
    # and the retries then wait for the restart instead of spending their attempts.
    retry = {"initial_backoff_s": 0.5, "max_backoff_s": 5, "max_attempts": 5}
    config = pipeline.config | {"backend": webui_backend(kind, port), "retry": retry}
    agent = spawn_agent(config, tmp_path, f"agent-{kind}")
    try:
        first = pipeline.client.run(job(job_id=f"{kind}-first", seed=11), timeout_s=90)
        assert first.status is Status.SUCCEEDED, first.message
        assert first.info["seed"] == 11 and first.outputs

        arm_fault(port, {"kind": "crash", "count": 1})
        survivor = pipeline.client.run(job(job_id=f"{kind}-through-a-crash", steps=10), timeout_s=120)
        assert survivor.status is Status.SUCCEEDED, survivor.message
        assert terminal_statuses(pipeline.events(f"{kind}-through-a-crash")) == [Status.SUCCEEDED]
        log = (tmp_path / f"agent-{kind}.log").read_text()
        assert "webui.exited" in log and "webui.restarted" in log
    finally:
        agent.terminate()
        agent.wait(60)
    assert wait_until(lambda: agent.poll() is not None, timeout_s=5)


def _webui_processes(port: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "sim" in cmdline and str(port) in cmdline:
            found.append(process)
    return found


def test_the_webui_dies_with_its_agent_even_when_the_agent_is_sigkilled(pipeline, tmp_path):
    port = free_loopback_port()
    # A shell launcher that starts the WebUI without exec, as A1111's webui.sh does: the Python
    # process it starts must go too, not only the shell.
    launcher = tmp_path / "webui.sh"
    sim = " ".join(webui_backend("a1111", port)["process"]["command"])
    launcher.write_text(f'#!/bin/sh\n{sim} "$@"\necho webui exited\n')  # passes its flags on, as webui.sh does
    launcher.chmod(0o755)
    backend = webui_backend("a1111", port)
    backend["process"]["command"] = [str(launcher), "--server-name", "127.0.0.1"]
    agent = spawn_agent(pipeline.config | {"backend": backend}, tmp_path, "agent")
    try:
        assert wait_until(lambda: _webui_processes(port), timeout_s=60)
        assert pipeline.client.run(job(), timeout_s=60).status is Status.SUCCEEDED
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        assert wait_until(lambda: not _webui_processes(port), timeout_s=20), "the WebUI outlived its agent"
    finally:
        agent.kill()
        for leftover in _webui_processes(port):
            leftover.kill()
