"""The supervisor's arithmetic and decisions with a fake clock: no child process, no threads."""

from __future__ import annotations

import threading

import pytest
from structlog.testing import capture_logs

from sdagent.backends.base import Health
from sdagent.webui.config import ProcessConfig
from sdagent.webui.output import OUTPUT_BURST_LINES, OUTPUT_LINE_MAX_CHARS, OutputLog, TokenBucket, clean_output_line
from sdagent.webui.restart import RestartPolicy
from sdagent.webui.supervisor import WatchedJob, WebUISupervisor, hang_reason


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def no_wait(event: threading.Event, timeout: float) -> bool:
    return event.is_set()


# --- backoff and crash loops -------------------------------------------------------------------


def test_backoff_doubles_per_failure_in_the_window_up_to_its_cap() -> None:
    policy = RestartPolicy(initial_s=1, max_s=10, loop_restarts=10, window_s=300)
    backoffs = [policy.record(1000 + n).backoff_s for n in range(6)]
    assert backoffs == [1, 2, 4, 8, 10, 10]
    assert not policy.in_crash_loop


def test_failures_spaced_wider_than_the_window_start_again_from_the_initial_backoff() -> None:
    policy = RestartPolicy(initial_s=1, max_s=60, loop_restarts=5, window_s=300)
    assert [policy.record(t).backoff_s for t in (0, 10, 20)] == [1, 2, 4]
    assert policy.record(20 + 301).backoff_s == 1


def test_crash_loop_is_entered_once_and_holds_the_backoff_at_its_cap_until_the_window_clears() -> None:
    policy = RestartPolicy(initial_s=1, max_s=60, loop_restarts=3, window_s=100)
    decisions = [policy.record(t) for t in (0, 1, 2, 3, 4)]
    assert [d.backoff_s for d in decisions] == [1, 2, 4, 60, 60]
    assert [d.crash_loop for d in decisions] == [False, False, False, True, True]
    assert [d.entered_crash_loop for d in decisions] == [False, False, False, True, False]
    assert decisions[3].recent_restarts == 4

    assert not policy.settle(50) and policy.in_crash_loop
    assert policy.settle(103)  # failures at 0, 1 and 2 have left the window: 3 remain
    assert not policy.in_crash_loop


def test_huge_failure_counts_do_not_overflow_the_backoff() -> None:
    policy = RestartPolicy(initial_s=1, max_s=60, loop_restarts=10_000, window_s=1e9)
    assert [policy.record(t) for t in range(2000)][-1].backoff_s == 60


# --- hangs -----------------------------------------------------------------------------------


def test_a_job_is_hung_when_it_stalls_or_runs_past_its_time_limit() -> None:
    job = WatchedJob("job-1", started_at=0, last_progress_at=0)
    assert hang_reason(job, 119, job_timeout_s=900, stall_timeout_s=120) is None
    assert hang_reason(job, 120, job_timeout_s=900, stall_timeout_s=120) == "stalled"
    job.last_progress_at = 880
    assert hang_reason(job, 899, job_timeout_s=900, stall_timeout_s=120) is None
    assert hang_reason(job, 900, job_timeout_s=900, stall_timeout_s=120) == "job_timeout"


# --- output ----------------------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]
    clock.advance(1)
    assert [bucket.allow() for _ in range(3)] == [True, True, False]


def test_output_lines_are_cleaned_as_a_terminal_would_show_them() -> None:
    assert clean_output_line(b"plain line\n") == "plain line"
    assert clean_output_line(b"\x1b[31merror\x1b[0m\r\n") == "error"
    assert clean_output_line(b" 10%|#   \r 50%|#####  \r100%|##########\n") == "100%|##########"
    assert clean_output_line(b"caf\xc3\xa9 \xff\n") == "caf\u00e9 \ufffd"
    assert clean_output_line(b"   \n") == ""


def test_output_flood_is_rate_limited_and_the_dropped_lines_counted() -> None:
    clock = FakeClock()
    output = OutputLog(clock)
    with capture_logs() as logs:
        for number in range(OUTPUT_BURST_LINES + 50):
            output.emit(f"line {number}", "stdout", 42)
        clock.advance(1)
        output.emit("y" * (OUTPUT_LINE_MAX_CHARS + 10), "stderr", 42)

    lines = [entry for entry in logs if entry["event"] == "webui.output"]
    assert len(lines) == OUTPUT_BURST_LINES + 1
    dropped = [entry for entry in logs if entry["event"] == "webui.output_dropped"]
    assert [entry["lines"] for entry in dropped] == [50]
    assert len(lines[-1]["line"]) == OUTPUT_LINE_MAX_CHARS and lines[-1]["truncated_chars"] == 10


# --- the supervisor, attached, one monitor round at a time ---------------------------------------


class FakeProbe:
    def __init__(self, health: Health) -> None:
        self.health = health

    def __call__(self) -> Health:
        if isinstance(self.health, Exception):
            raise self.health
        return self.health


def attached(probe: FakeProbe, clock: FakeClock, expected=("sd15",), **options) -> WebUISupervisor:
    defaults = {"interrupt": lambda: None, "job_timeout_s": 900, "stall_timeout_s": 120}
    return WebUISupervisor(ProcessConfig(), probe, list(expected), clock=clock, wait=no_wait, **{**defaults, **options})


def test_an_expected_model_named_without_its_extension_is_found_in_the_webuis_list() -> None:
    probe = FakeProbe(Health(ready=True, models=("tiny-a.safetensors", "styles/b.ckpt")))
    supervisor = attached(probe, FakeClock(), expected=("tiny-a", "styles/b"))
    supervisor.check()
    assert supervisor.ready, supervisor.ready_reason


def test_ready_needs_every_expected_model_and_one_failed_probe_does_not_flap() -> None:
    clock = FakeClock()
    probe = FakeProbe(Health(ready=True, models=("sd15",)))
    supervisor = attached(probe, clock, expected=("sd15", "sdxl"))
    changes: list[tuple[bool, str]] = []
    supervisor.on_state_change(lambda ready, reason: changes.append((ready, reason)))

    supervisor.check()
    assert not supervisor.ready and supervisor.ready_reason == "models_missing"
    probe.health = Health(ready=True, models=("sd15", "sdxl", "other"))
    supervisor.check()
    assert supervisor.ready and supervisor.wait_ready(0)

    probe.health = RuntimeError("connection reset")  # a probe that raises is a failed probe
    supervisor.check()
    assert supervisor.ready  # one slow or failed answer is not enough
    supervisor.check()
    assert not supervisor.ready and supervisor.ready_reason == "probe"
    assert changes == [(True, "ready"), (False, "probe")]


def test_hung_job_is_reported_before_the_interrupt_and_only_once() -> None:
    clock = FakeClock()
    calls: list[str] = []
    supervisor = attached(
        FakeProbe(Health(ready=True, models=("sd15",))), clock, interrupt=lambda: calls.append("interrupt")
    )
    supervisor.on_hang(lambda job_id, reason: calls.append(f"hang {job_id} {reason}"))

    job = supervisor.job_started("job-1")
    assert supervisor.busy
    clock.advance(100)
    supervisor.job_progress()
    clock.advance(100)
    supervisor.check()
    assert calls == [] and not job.hung.is_set()  # progress 100 s ago: not stalled yet

    clock.advance(20)
    with capture_logs() as logs:
        supervisor.check()
        supervisor.check()
    assert calls == ["hang job-1 stalled", "interrupt"]
    assert job.hung.is_set() and job.hang_reason == "stalled" and supervisor.hangs == 1
    [hung] = [entry for entry in logs if entry["event"] == "webui.hung"]
    assert hung["log_level"] == "error" and hung["since_progress_s"] == 120 and hung["managed"] is False

    supervisor.job_finished()
    assert not supervisor.busy


def test_watch_job_times_the_block_and_ends_the_job_even_on_error() -> None:
    clock = FakeClock()
    hangs: list[tuple[str, str]] = []
    supervisor = attached(FakeProbe(Health(ready=True, models=("sd15",))), clock, job_timeout_s=10, stall_timeout_s=60)
    supervisor.on_hang(lambda job_id, reason: hangs.append((job_id, reason)))
    with pytest.raises(RuntimeError), supervisor.watch_job("job-2"):
        clock.advance(10)
        supervisor.check()
        raise RuntimeError("backend failed")
    assert hangs == [("job-2", "job_timeout")]
    assert not supervisor.busy


def test_a_failing_callback_does_not_stop_the_others() -> None:
    clock = FakeClock()
    supervisor = attached(FakeProbe(Health(ready=True, models=("sd15",))), clock)
    seen: list[bool] = []

    def broken(ready: bool, reason: str) -> None:
        raise ValueError("bug in a callback")

    supervisor.on_state_change(broken)
    supervisor.on_state_change(lambda ready, reason: seen.append(ready))
    with capture_logs() as logs:
        supervisor.check()
    assert seen == [True]
    assert any(entry["event"] == "webui.callback_failed" for entry in logs)


def test_attached_webui_is_never_restarted_for_memory() -> None:
    config = ProcessConfig(max_rss_bytes=1, max_gpu_memory_bytes=1)
    supervisor = WebUISupervisor(
        config,
        FakeProbe(Health(ready=True)),
        [],
        interrupt=lambda: None,
        job_timeout_s=900,
        stall_timeout_s=120,
        memory_probe=lambda: 10**12,
    )
    assert not supervisor.restart_if_over_memory()


def test_stop_before_start_and_twice_is_harmless() -> None:
    supervisor = attached(FakeProbe(Health(ready=True)), FakeClock())
    supervisor.stop()
    supervisor.stop()
    assert not supervisor.ready and supervisor.ready_reason == "stopped"


# --- launching -------------------------------------------------------------------------------


def test_launch_uses_a_new_session_and_the_configured_environment(tmp_path) -> None:
    launched: list[dict] = []

    def launcher(command, **kwargs):
        launched.append({"command": command, **kwargs})
        raise FileNotFoundError(2, "No such file or directory", command[0])

    missing_library = str(tmp_path / "libtcmalloc_minimal.so.4")
    config = ProcessConfig(command=["./webui.sh", "--nowebui"], cwd=tmp_path, env={"LD_PRELOAD": missing_library})
    supervisor = WebUISupervisor(
        config,
        FakeProbe(Health(ready=False)),
        [],
        interrupt=lambda: None,
        job_timeout_s=900,
        stall_timeout_s=120,
        launcher=launcher,
    )
    with capture_logs() as logs, pytest.raises(FileNotFoundError):
        supervisor.start()  # a command that cannot run is a start-up error

    [call] = launched
    assert call["command"] == ["./webui.sh", "--nowebui"] and call["cwd"] == tmp_path
    assert call["start_new_session"] is True
    assert call["env"]["LD_PRELOAD"] == missing_library
    assert [entry["path"] for entry in logs if entry["event"] == "webui.ld_preload_missing"] == [missing_library]


def test_without_configured_variables_the_child_inherits_the_environment() -> None:
    launched: list[dict] = []

    def launcher(command, **kwargs):
        launched.append(kwargs)
        raise PermissionError(13, "Permission denied", command[0])

    supervisor = WebUISupervisor(
        ProcessConfig(command=["webui"]),
        FakeProbe(Health(ready=False)),
        [],
        interrupt=lambda: None,
        job_timeout_s=900,
        stall_timeout_s=120,
        launcher=launcher,
    )
    with pytest.raises(PermissionError):
        supervisor.start()
    assert launched[0]["env"] is None  # no LD_PRELOAD invented
