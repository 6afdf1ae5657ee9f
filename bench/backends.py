"""WebUI adapters against the simulator: supervised start-up time and per-job adapter overhead.

For each backend kind (``a1111``, ``comfyui``) the WebUI is the simulator (``sdagent sim``),
launched as a child by :class:`~sdagent.webui.supervisor.WebUISupervisor` exactly as the agent builds it
(``build_backend`` + ``WebUISupervisor.for_backend``) from a ``[backend]`` section shaped like the
integration tests' (``tests/integration/test_webui_e2e.py``). Everything is on loopback.

1. Start-up (``ready_s``): ``supervisor.start()`` -> ``supervisor.wait_ready()`` returns. This is
   the SIMULATOR's start (a Python interpreter importing the package and aiohttp, binding a port),
   not a real WebUI's: a real A1111 or ComfyUI loads torch and a checkpoint first, which takes tens
   of seconds, and nothing here says how long. Both kinds launch the same simulator program; only
   the adapter's readiness probe differs.
   - ``--starts`` launches per kind with a 50 ms probe interval (a constructor seam): when the
     simulator is ready, to within 50 ms. ``ready_s`` is the largest of these over both kinds. The
     simulator's own ``sim.started`` log line (it is listening) is read as well.
   - one more launch with the supervisor's default probe interval (2 s), as the agent runs it, on
     which the jobs then run. Its first probe goes out at launch, before the child listens, so that
     figure is the probe interval rounded up: 2 s, or 4 s when the start takes longer than 2 s.
2. Adapter overhead: ``--jobs`` txt2img jobs (64x64, ``--steps`` steps, one distinct seed each, the
   model already loaded) run one at a time through ``backend.generate()`` inside
   ``supervisor.watch_job()``, as the job loop runs them, against a simulator sleeping
   ``--step-latency-s`` per step. Each call is timed end to end, and the simulator's own time for
   that job is subtracted: the ``ms`` of its per-job log line (``sim.a1111_generated`` /
   ``sim.comfy_executed``: engine clock from the generation's start, after the request was parsed
   and the queue lock taken, to the images encoded; matched to the job by seed or prompt id). What
   is left is the adapter's overhead: building the request, HTTP on loopback, the simulator's
   request parsing and answer encoding, progress polling or websocket following, result checks,
   image decoding. The floor ``steps * step_latency`` is reported too, and how far the
   simulator's own time sits above it. The first ``--warmup`` jobs per kind are not measured.

The simulator's output goes to a file (a launcher seam) so its per-job lines can be read; the agent
would fold it into its log instead, through a rate-limited reader thread that this leaves out. The
simulator runs with no model load or switch latency: start-up then never waits for a simulated
model, and neither does the first job.

The simulator, this script and whatever else runs share the machine's CPUs: the p99s move with
its load, so the 1-minute load average before and after is printed with the figures.

Usage: ``.venv/bin/python bench/backends.py [--jobs 200] [--warmup 10] [--steps 10]
[--step-latency-s 0.01] [--starts 2]``. Prints readable lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import emit, percentile, say, setup, summary

from sdagent.backends.config import WebUIBackendConfig
from sdagent.backends.registry import build_backend, parse_config
from sdagent.devstack.kafka import free_loopback_port
from sdagent.jobs import Job
from sdagent.webui.supervisor import PROBE_INTERVAL_S, WebUISupervisor

KINDS = ("a1111", "comfyui")
MODEL = "sd15.safetensors"
PROMPT = "a lighthouse at dusk, benchmark"
FINE_PROBE_INTERVAL_S = 0.05
READY_LIMIT_S = 30.0  # per start; the simulator is ready in about a second
RUN_LIMIT_S = 60.0  # per kind's measured jobs; the figures then cover the jobs done in time
SIM_EVENTS = {"a1111": "sim.a1111_generated", "comfyui": "sim.comfy_executed"}
SEED_BASE = 1_000_000  # measured job i has seed SEED_BASE + i; warm-up jobs count down from it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="measured jobs per backend kind")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured jobs per kind first")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-latency-s", type=float, default=0.01, help="the simulator's sleep per step")
    parser.add_argument("--starts", type=int, default=2, help="start-up measurements per kind (50 ms probe)")
    args = parser.parse_args()
    setup()
    load_before = os.getloadavg()[0]
    floor_ms = args.steps * args.step_latency_s * 1000
    say(
        f"backends benchmark: a1111 and comfyui adapters against the WebUI SIMULATOR (`sdagent sim`), "
        f"supervised as the agent does; {args.jobs} txt2img jobs per kind (+{args.warmup} warm-up), 64x64, "
        f"{args.steps} steps x {args.step_latency_s * 1000:g} ms = {floor_ms:g} ms of simulated sampling per job"
    )

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sdagent-bench-backends-") as workdir:
        for kind in KINDS:
            results[kind] = run_kind(kind, Path(workdir), args, floor_ms)

    load_after = os.getloadavg()[0]
    say("")
    say(
        f"machine: {os.cpu_count()} CPUs, 1-minute load average {load_before:.2f} before, {load_after:.2f} after "
        "(the simulator, this script and anything else running share them; a loaded machine shows in the p99s)"
    )
    say(
        "start-up is the simulator's (an interpreter and an HTTP server), NOT a real WebUI's, which "
        "loads torch and a checkpoint first (tens of seconds)"
    )
    for kind in KINDS:
        r = results[kind]
        say(
            f"{kind:>8}: ready {r['ready_s']:.2f} s ({FINE_PROBE_INTERVAL_S * 1000:g} ms probe, max of "
            f"{args.starts}), {r['ready_default_probe_s']:.2f} s (default {PROBE_INTERVAL_S:g} s probe); "
            f"overhead over the simulator's own time p50 {r['overhead_p50_ms']:.2f} ms, "
            f"p99 {r['overhead_p99_ms']:.2f} ms; "
            f"generate() p50 {r['total_p50_ms']:.2f} ms, p99 {r['total_p99_ms']:.2f} ms"
        )

    figures: dict[str, Any] = {
        "ready_s": round(max(results[kind]["ready_s"] for kind in KINDS), 3),
        "ready_measure": f"supervisor.start() -> wait_ready(), probe every {FINE_PROBE_INTERVAL_S * 1000:g} ms, "
        "max over kinds and starts; the SIMULATOR's start (sdagent sim), not a real WebUI's",
        "ready_default_probe_s": round(max(results[kind]["ready_default_probe_s"] for kind in KINDS), 3),
        "ready_starts_per_kind": args.starts,
        "overhead_measure": "generate() wall time minus the simulator's own per-job ms "
        "(its sim.a1111_generated / sim.comfy_executed log line)",
        "jobs_per_kind": args.jobs,
        "warmup_jobs": args.warmup,
        "steps": args.steps,
        "step_latency_ms": args.step_latency_s * 1000,
        "simulated_floor_ms": round(floor_ms, 3),
        "size": "64x64",
        "cpus": os.cpu_count(),
        "load_avg_1m_before": round(load_before, 2),
        "load_avg_1m_after": round(load_after, 2),
    }
    for kind in KINDS:
        r = results[kind]
        figures |= {
            f"{kind}_ready_s": round(r["ready_s"], 3),
            f"{kind}_ready_default_probe_s": round(r["ready_default_probe_s"], 3),
            f"{kind}_ready_starts_s": [round(value, 3) for value in r["ready_starts_s"]],
            f"{kind}_sim_listening_s": round(r["sim_listening_s"], 3) if r["sim_listening_s"] is not None else None,
            f"{kind}_jobs": r["jobs"],
            f"{kind}_complete": r["complete"],
            f"{kind}_p50_ms": round(r["overhead_p50_ms"], 3),
            f"{kind}_p99_ms": round(r["overhead_p99_ms"], 3),
            f"{kind}_total_p50_ms": round(r["total_p50_ms"], 3),
            f"{kind}_total_p99_ms": round(r["total_p99_ms"], 3),
            f"{kind}_sim_p50_ms": round(r["sim_p50_ms"], 3),
            f"{kind}_sim_p99_ms": round(r["sim_p99_ms"], 3),
            f"{kind}_over_floor_p50_ms": round(r["over_floor_p50_ms"], 3),
            f"{kind}_over_floor_p99_ms": round(r["over_floor_p99_ms"], 3),
            f"{kind}_requests_per_job": round(r["requests_per_job"], 2),
        }
    emit(figures)


# --- one backend kind --------------------------------------------------------------------------


def backend_config(kind: str, port: int, step_latency_s: float) -> WebUIBackendConfig:
    """A supervised simulator, as tests/integration/test_webui_e2e.py configures one."""
    command = [
        sys.executable, "-m", "sdagent", "sim", "--port", str(port), "--step-latency-s", str(step_latency_s),
        "--load-latency-s", "0", "--switch-latency-s", "0", "--models", MODEL,
        "--log-format", "json", "--log-level", "info",
    ]  # fmt: skip
    config = parse_config(
        {
            "kind": kind,
            "url": f"http://127.0.0.1:{port}",
            "models": [MODEL],
            # Bounds a job that hangs: the supervisor interrupts it (the job then fails the run).
            "job_timeout_s": 30,
            "stall_timeout_s": 10,
            "process": {
                "command": command,
                "ready_timeout_s": READY_LIMIT_S,
                "stop_timeout_s": 10,
                "env": {"PYTHONUNBUFFERED": "1"},
            },
        }
    )
    assert isinstance(config, WebUIBackendConfig)
    return config


def file_launcher(path: Path) -> Callable[..., subprocess.Popen]:
    """Popen with the child's stdout and stderr appended to ``path`` (the supervisor then reads none)."""

    def launch(command: list[str], **kwargs: Any) -> subprocess.Popen:
        with path.open("ab") as handle:
            return subprocess.Popen(command, **{**kwargs, "stdout": handle, "stderr": subprocess.STDOUT})

    return launch


def start_supervised(kind: str, log_path: Path, step_latency_s: float, **seams: Any):
    """(backend, supervisor, config, seconds from start() to ready, wall-clock time of start())."""
    config = backend_config(kind, free_loopback_port(), step_latency_s)
    backend = build_backend(config)
    supervisor = WebUISupervisor.for_backend(config, backend, launcher=file_launcher(log_path), **seams)
    started_wall = time.time()
    started = time.monotonic()
    supervisor.start()
    ready = supervisor.wait_ready(READY_LIMIT_S)
    ready_s = time.monotonic() - started
    if not ready:
        supervisor.stop()
        backend.close()
        raise RuntimeError(
            f"{kind}: simulator not ready within {READY_LIMIT_S} s ({supervisor.ready_reason}); "
            f"its output:\n{tail(log_path)}"
        )
    return backend, supervisor, config, ready_s, started_wall


def run_kind(kind: str, workdir: Path, args: argparse.Namespace, floor_ms: float) -> dict[str, Any]:
    say(f"\n[{kind}]")
    # 1. The simulator's own start, probed every 50 ms.
    fine: list[float] = []
    listening: list[float] = []
    for start in range(args.starts):
        start_log = workdir / f"{kind}-start-{start}.log"
        backend, supervisor, _, ready_after_s, started_wall = start_supervised(
            kind, start_log, args.step_latency_s, probe_interval_s=FINE_PROBE_INTERVAL_S
        )
        supervisor.stop()
        backend.close()
        fine.append(ready_after_s)
        listening_s = sim_started_after(start_log, started_wall)
        if listening_s is not None:
            listening.append(listening_s)
        said = f"{listening_s:.2f} s" if listening_s is not None else "(no sim.started line)"
        say(
            f"[{kind}] start {start + 1}: ready {ready_after_s:.2f} s after supervisor.start() with a "
            f"{FINE_PROBE_INTERVAL_S * 1000:g} ms probe interval; the simulator logged sim.started {said} after it"
        )

    # 2. As the agent runs it: default probe interval; the jobs run on this one.
    log_path = workdir / f"{kind}.log"
    backend, supervisor, config, default_ready_s, _ = start_supervised(kind, log_path, args.step_latency_s)
    say(
        f"[{kind}] start for the jobs: ready {default_ready_s:.2f} s after supervisor.start() with the default "
        f"{PROBE_INTERVAL_S:g} s probe interval (its first probe goes out before the child listens)"
    )
    try:
        if backend.loaded_model() != MODEL:
            backend.switch_model(MODEL)  # as the job loop does before a model's first job
        for index in range(args.warmup):
            generate(backend, supervisor, make_job(f"{kind}-warm-{index:03d}", SEED_BASE - 1 - index, args.steps))
        sim_request(config, "DELETE", "/sim/stats")
        timed: list[tuple[Job, float, Any]] = []
        started = time.monotonic()
        complete = True
        for index in range(args.jobs):
            if time.monotonic() - started > RUN_LIMIT_S:
                complete = False
                say(f"[{kind}] TIME LIMIT ({RUN_LIMIT_S:g} s) reached after {index} jobs: the figures cover those")
                break
            job = make_job(f"{kind}-{index:04d}", SEED_BASE + index, args.steps)
            total_ms, generation = generate(backend, supervisor, job)
            timed.append((job, total_ms, generation))
        run_s = time.monotonic() - started
        stats = sim_request(config, "GET", "/sim/stats")
    finally:
        supervisor.stop()
        backend.close()
    say(
        f"[{kind}] {len(timed)} jobs in {run_s:.1f} s ({len(timed) / run_s:.1f} jobs/s); "
        f"supervisor restarts {supervisor.restarts}, hangs {supervisor.hangs}"
    )

    sim_ms = sim_times(kind, log_path)
    totals, overheads, sims, inferences = [], [], [], []
    for job, total_ms, generation in timed:
        key = generation.info.get("prompt_id") if kind == "comfyui" else job.seed
        if key not in sim_ms:
            raise RuntimeError(f"{kind}: no {SIM_EVENTS[kind]} line for job {job.job_id} ({key}) in {log_path}")
        totals.append(total_ms)
        sims.append(sim_ms[key])
        overheads.append(total_ms - sim_ms[key])
        inferences.append(generation.inference_ms)
    over_floor = [total - floor_ms for total in totals]
    local = [total - inference for total, inference in zip(totals, inferences)]
    requests = {route: count for route, count in stats.get("requests", {}).items() if not route.endswith("/sim/stats")}
    generations = stats.get("events", {}).get(f"generations_{kind}", 0)
    say(f"[{kind}] generate() end to end:                    {summary(totals)}")
    say(f"[{kind}] simulator's own time per job (its log):   {summary(sims)}")
    say(
        f"[{kind}]   of which above the {floor_ms:g} ms floor:          "
        f"p50 {percentile(sims, 50) - floor_ms:.2f}  p99 {percentile(sims, 99) - floor_ms:.2f} ms"
    )
    say(f"[{kind}] adapter overhead (generate() - simulator): {summary(overheads)}")
    say(f"[{kind}] generate() - floor:                       {summary(over_floor)}")
    say(f"[{kind}] outside the adapter's inference_ms (request building, result decoding): {summary(local)}")
    say(
        f"[{kind}] simulator saw {generations} generations and {sum(requests.values())} requests for "
        f"{len(timed)} jobs: " + ", ".join(f"{route} {count}" for route, count in sorted(requests.items()))
    )
    if generations != len(timed):
        raise RuntimeError(f"{kind}: the simulator ran {generations} generations for {len(timed)} jobs")
    return {
        "ready_s": max(fine),
        "ready_starts_s": fine,
        "ready_default_probe_s": default_ready_s,
        "sim_listening_s": max(listening) if listening else None,
        "jobs": len(timed),
        "complete": complete,
        "overhead_p50_ms": percentile(overheads, 50),
        "overhead_p99_ms": percentile(overheads, 99),
        "total_p50_ms": percentile(totals, 50),
        "total_p99_ms": percentile(totals, 99),
        "sim_p50_ms": percentile(sims, 50),
        "sim_p99_ms": percentile(sims, 99),
        "over_floor_p50_ms": percentile(over_floor, 50),
        "over_floor_p99_ms": percentile(over_floor, 99),
        "requests_per_job": sum(requests.values()) / max(len(timed), 1),
    }


def make_job(job_id: str, seed: int, steps: int) -> Job:
    # A distinct seed per job: ComfyUI (and its simulator) caches node outputs by their inputs, so a
    # repeated seed would skip the sampler.
    return Job.model_validate(
        {
            "job_id": job_id,
            "model": MODEL,
            "prompt": PROMPT,
            "seed": seed,
            "steps": steps,
            "width": 64,
            "height": 64,
            "output": {"format": "png"},
            "submitted_at": datetime.now(UTC),
        }
    )


def generate(backend, supervisor: WebUISupervisor, job: Job) -> tuple[float, Any]:
    """One job as the job loop runs it (watched for hangs, progress resets the stall timer); the
    generate() call alone is timed."""
    abort = threading.Event()

    def progress(_step: int, _steps: int) -> None:
        supervisor.job_progress()

    with supervisor.watch_job(job.job_id) as watched:
        since = time.perf_counter()
        generation = backend.generate(job, progress, abort)
        total_ms = (time.perf_counter() - since) * 1000
    if watched.hung.is_set():
        raise RuntimeError(f"job {job.job_id} was found hung ({watched.hang_reason})")
    if not generation.artifacts:
        raise RuntimeError(f"job {job.job_id} produced no image")
    return total_ms, generation


# --- the simulator's side ----------------------------------------------------------------------


def sim_request(config: WebUIBackendConfig, method: str, path: str) -> dict[str, Any]:
    request = urllib.request.Request(f"{config.url}{path}", method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else {}


def sim_log_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue  # not a structlog line (a traceback, an interpreter warning)
        if isinstance(line, dict):
            lines.append(line)
    return lines


def sim_times(kind: str, path: Path) -> dict[Any, float]:
    """The simulator's own ms per job, keyed by seed (A1111) or prompt id (ComfyUI)."""
    key = "prompt_id" if kind == "comfyui" else "seed"
    return {line[key]: float(line["ms"]) for line in sim_log_lines(path) if line.get("event") == SIM_EVENTS[kind]}


def sim_started_after(path: Path, started_wall: float) -> float | None:
    """Seconds from supervisor.start() to the simulator's ``sim.started`` line (its clock, same host)."""
    for line in sim_log_lines(path):
        if line.get("event") == "sim.started" and "timestamp" in line:
            stamp = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
            return stamp.timestamp() - started_wall
    return None


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


if __name__ == "__main__":
    main()
