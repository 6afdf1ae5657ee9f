"""The WebUI supervisor against a real child process: tests/fixtures/fake_webui.py, probed over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from structlog.testing import capture_logs

from sdagent.backends.base import Health
from sdagent.webui.config import ProcessConfig
from sdagent.webui.supervisor import WebUISupervisor

FAKE_WEBUI = Path(__file__).parents[1] / "fixtures" / "fake_webui.py"
FAST = {"probe_interval_s": 0.05, "hang_grace_s": 0.2}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_probe(port: int) -> Callable[[], Health]:
    def probe() -> Health:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as answer:
                body = json.load(answer)
        except (OSError, ValueError) as exc:
            return Health(ready=False, detail=str(exc))
        return Health(ready=True, models=tuple(body["models"]))

    return probe


def post(port: int, path: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST")
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.load(answer)


def eventually(condition: Callable[[], object], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet (it holds no memory and runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def events(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def supervisors() -> Iterator[list[WebUISupervisor]]:
    made: list[WebUISupervisor] = []
    yield made
    for supervisor in made:
        supervisor.stop()


@pytest.fixture
def managed(port: int, supervisors: list[WebUISupervisor]) -> Callable[..., WebUISupervisor]:
    """A supervisor of fake_webui on ``port``: pass its flags, config fields and constructor seams."""

    def make(*flags: str, models: tuple[str, ...] = ("sd15",), config: dict | None = None, **seams) -> WebUISupervisor:
        command = [sys.executable, str(FAKE_WEBUI), "--port", str(port), "--models", ",".join(models), *flags]
        fields = {
            "ready_timeout_s": 10,
            "restart_backoff_initial_s": 0.02,
            "restart_backoff_max_s": 0.1,
            "stop_timeout_s": 1.0,
            **(config or {}),
        }
        process = ProcessConfig(command=command, **fields)
        options = {"interrupt": lambda: None, "job_timeout_s": 30.0, "stall_timeout_s": 30.0, **FAST, **seams}
        supervisor = WebUISupervisor(process, http_probe(port), list(models), **options)
        supervisors.append(supervisor)
        return supervisor

    return make


def test_launched_webui_is_ready_only_once_every_expected_model_is_listed(managed) -> None:
    supervisor = managed("--models-delay", "0.8", models=("sd15", "sdxl"))
    changes: list[tuple[bool, str]] = []
    supervisor.on_state_change(lambda ready, reason: changes.append((ready, reason)))
    supervisor.start()

    eventually(lambda: supervisor.ready_reason == "models_missing")  # it answers, without the models
    assert not supervisor.ready
    assert supervisor.wait_ready(5)
    assert changes == [(True, "ready")]
    assert supervisor.pid is not None

    supervisor.stop()
    assert changes[-1] == (False, "stopped")


def test_webui_output_is_folded_into_the_structured_log(managed) -> None:
    with capture_logs() as logs:
        supervisor = managed("--print-lines", "2", "--long-line", "5000")
        supervisor.start()
        eventually(lambda: len(events(logs, "webui.output")) >= 7)
        supervisor.stop()

    output = {(entry["stream"], entry["line"]) for entry in events(logs, "webui.output")}
    assert {("stdout", "stdout line 0"), ("stdout", "stdout line 1")} <= output
    assert {("stderr", "stderr line 0"), ("stderr", "stderr line 1")} <= output
    assert ("stdout", "sampling 100%") in output  # the progress bar's last redraw, no colours
    long_line = next(entry for entry in events(logs, "webui.output") if entry["line"].startswith("xxx"))
    assert len(long_line["line"]) == 2000 and long_line["truncated_chars"] == 3000
    assert {entry["pid"] for entry in events(logs, "webui.output")} == {events(logs, "webui.launched")[0]["pid"]}


def test_crashed_webui_is_restarted_after_the_initial_backoff(managed, tmp_path: Path) -> None:
    with capture_logs() as logs:
        supervisor = managed("--crash-after", "0.3", "--crash-once-file", str(tmp_path / "crashed"))
        supervisor.start()
        first_pid = supervisor.pid
        eventually(lambda: supervisor.restarts == 1)
        assert supervisor.wait_ready(5)

    assert supervisor.pid != first_pid and supervisor.crashes == 1
    exited = events(logs, "webui.exited")
    assert [(entry["pid"], entry["exit_code"]) for entry in exited] == [(first_pid, 3)]
    assert [entry["backoff_s"] for entry in events(logs, "webui.restarting")] == [0.02]
    assert supervisor.crash_loops == 0


def test_crash_loop_is_reported_loudly_and_backoff_stays_at_its_cap(managed) -> None:
    config = {"crash_loop_restarts": 3, "crash_loop_window_s": 60, "restart_backoff_max_s": 0.08}
    with capture_logs() as logs:
        supervisor = managed("--crash-after", "0.05", config=config)
        supervisor.start()
        eventually(lambda: supervisor.restarts >= 6, timeout_s=10)
        supervisor.stop()

    backoffs = [entry["backoff_s"] for entry in events(logs, "webui.restarting")][:6]
    assert backoffs == [0.02, 0.04, 0.08, 0.08, 0.08, 0.08]
    crash_loop = events(logs, "webui.crash_loop")
    assert len(crash_loop) == 1 and supervisor.crash_loops == 1
    assert crash_loop[0]["log_level"] == "error"
    assert crash_loop[0]["restarts"] == 4 and crash_loop[0]["window_s"] == 60
    in_loop = [entry for entry in events(logs, "webui.restarting") if entry["crash_loop"]]
    assert in_loop and all(entry["log_level"] == "error" for entry in in_loop)
    assert supervisor.in_crash_loop and not supervisor.ready


def test_attached_webui_is_only_probed_and_readiness_follows_it(port: int, supervisors) -> None:
    def serve() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(FAKE_WEBUI), "--port", str(port), "--models", "sd15"], stdout=subprocess.DEVNULL
        )

    server = serve()
    try:
        supervisor = WebUISupervisor(
            ProcessConfig(),
            http_probe(port),
            ["sd15"],
            interrupt=lambda: None,
            job_timeout_s=30,
            stall_timeout_s=30,
            **FAST,
        )
        supervisors.append(supervisor)
        changes: list[tuple[bool, str]] = []
        supervisor.on_state_change(lambda ready, reason: changes.append((ready, reason)))
        supervisor.start()
        assert supervisor.wait_ready(5)
        assert supervisor.pid is None and not supervisor.managed

        server.kill()
        server.wait()
        eventually(lambda: not supervisor.ready)
        assert changes == [(True, "ready"), (False, "probe")]
        assert not supervisor.restart_if_over_memory()

        server = serve()
        assert supervisor.wait_ready(5)
        eventually(lambda: changes[-1] == (True, "ready"))  # callbacks run just after the flag is set
        supervisor.stop()
        assert server.poll() is None  # an attached WebUI is not ours to stop
    finally:
        server.kill()
        server.wait()


def test_hung_job_is_interrupted_then_its_process_group_killed_and_restarted(managed, port, tmp_path: Path) -> None:
    grandchild_file = tmp_path / "grandchild.pid"
    interrupts: list[float] = []
    hangs: list[tuple[str, str]] = []
    supervisor = managed(
        "--spawn-grandchild",
        str(grandchild_file),
        stall_timeout_s=0.5,
        interrupt=lambda: interrupts.append(time.monotonic()),
    )
    supervisor.on_hang(lambda job_id, reason: hangs.append((job_id, reason)))
    supervisor.start()
    assert supervisor.wait_ready(5)
    eventually(grandchild_file.exists)
    first_pid, grandchild = supervisor.pid, int(grandchild_file.read_text())
    # The WebUI runs under its guard (sdagent.webui.guard): the grandchild is in the guard's tree.
    assert grandchild in {child.pid for child in psutil.Process(first_pid).children(recursive=True)}

    with supervisor.watch_job("job-1") as job:
        post(port, "/hang")  # the WebUI stops answering, and the job makes no progress
        assert job.hung.wait(5)
        assert hangs == [("job-1", "stalled")] and job.hang_reason == "stalled"
        eventually(lambda: supervisor.restarts == 1)
        assert len(interrupts) == 1

    # the grandchild ignored SIGTERM: the group's SIGKILL got it (delivered asynchronously)
    eventually(lambda: gone(first_pid) and gone(grandchild), timeout_s=2)
    assert supervisor.wait_ready(5)
    assert supervisor.pid not in (None, first_pid)
    assert supervisor.hangs == 1 and not supervisor.busy


def test_memory_ceiling_restarts_between_jobs_and_never_during_one(managed, port) -> None:
    supervisor = managed(config={"max_rss_bytes": 120 * 1024 * 1024})
    supervisor.start()
    assert supervisor.wait_ready(5)
    first_pid = supervisor.pid
    assert not supervisor.restart_if_over_memory()  # a fresh WebUI is under its ceiling
    post(port, "/allocate?mb=160")

    with capture_logs() as logs:
        with supervisor.watch_job("job-1"):
            assert supervisor.busy
            assert not supervisor.restart_if_over_memory()
            assert supervisor.pid == first_pid
        assert supervisor.restart_if_over_memory()

    assert not supervisor.ready  # until the new WebUI answers with its models
    assert supervisor.wait_ready(5)
    assert supervisor.pid not in (None, first_pid) and gone(first_pid)
    [restart] = events(logs, "webui.memory_restart")
    assert restart["over"] == ["rss"] and restart["rss_bytes"] > 160 * 1024 * 1024
    assert restart["log_level"] == "warning"
    assert supervisor.memory_restarts == 1 and supervisor.restarts == 1
    assert not supervisor.restart_if_over_memory()


def test_gpu_memory_ceiling_restarts_through_the_injected_probe(managed) -> None:
    used: list[int | None] = [500]
    supervisor = managed(config={"max_gpu_memory_bytes": 1000}, memory_probe=lambda: used[0])
    supervisor.start()
    assert supervisor.wait_ready(5)
    first_pid = supervisor.pid

    assert not supervisor.restart_if_over_memory()
    used[0] = None  # NVML cannot tell: never a reason to restart
    assert not supervisor.restart_if_over_memory()
    used[0] = 2000
    with capture_logs() as logs:
        assert supervisor.restart_if_over_memory()
    [restart] = events(logs, "webui.memory_restart")
    assert restart["over"] == ["gpu"] and restart["gpu_memory_bytes"] == 2000
    assert supervisor.wait_ready(5) and supervisor.pid != first_pid


def test_stop_kills_the_whole_group_even_when_it_ignores_sigterm(managed, tmp_path: Path) -> None:
    grandchild_file = tmp_path / "grandchild.pid"
    supervisor = managed("--ignore-sigterm", "--spawn-grandchild", str(grandchild_file), config={"stop_timeout_s": 0.5})
    supervisor.start()
    assert supervisor.wait_ready(5)
    eventually(grandchild_file.exists)
    leader, grandchild = supervisor.pid, int(grandchild_file.read_text())

    with capture_logs() as logs:
        started = time.monotonic()
        supervisor.stop()
        elapsed = time.monotonic() - started
        supervisor.stop()  # a second stop is a no-op

    eventually(lambda: gone(leader) and gone(grandchild), timeout_s=2)  # SIGKILL lands asynchronously
    assert 0.5 <= elapsed < 3
    assert [entry["timeout_s"] for entry in events(logs, "webui.stop_timeout")] == [0.5]
    assert len(events(logs, "webui.stopped")) == 1
    assert not supervisor.ready and supervisor.pid is None
    assert not any(thread.name.startswith("webui-") and thread.is_alive() for thread in threading.enumerate())
