"""The HTTP gateway under load: async submissions per second and their latency, then the sync round
trip at a fixed offered rate.

1. Async: ``sdagent gateway`` (a subprocess, its logs to a file) in front of fresh topics with no
   agent; a load generator in a second process (aiohttp, keep-alive, ``--concurrency`` requests in
   flight) posts ``--jobs`` jobs. Each 202 means the job and its queued event are on the broker
   (acks=all). Baseline in the same run: a plain confluent-kafka producer in its own process
   putting the same job bytes on a topic with acks=all, as fast as it can.
2. Sync: a second gateway on other fresh topics with ``--agents`` agents (``sdagent run``
   subprocesses, zero-latency simulated backend, moto S3); the generator offers ``--sync-rate``
   jobs/s with ``?wait=`` for ``--sync-duration`` s, each latency counted from its planned start.

Usage: ``.venv/bin/python bench/gateway_load.py [--jobs 10000] [--concurrency 16]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import CpuMeter, Services, cpu_line, emit, percentile, say, setup, stop_agents, summary, wait_for_group

from sdagent.devstack.kafka import die_with_parent, free_loopback_port
from sdagent.devstack.stack import (
    ensure_topics,
    local_aws_environment,
    settings_from,
    spawn_agent,
    stack_config,
    write_config,
)
from sdagent.gateway.auth import hash_key

BUCKET = "sdagent-bench-gateway"
KEY = "sdk_bench-gateway-load"
JOB = {"model": "sd15.safetensors", "prompt": "a lighthouse at dusk, volumetric light", "width": 64, "height": 64,
       "steps": 2}  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sync-rate", type=float, default=100.0)
    parser.add_argument("--sync-duration", type=float, default=15.0)
    parser.add_argument("--agents", type=int, default=2)
    # Internal: the load generator and the raw baseline run in their own processes.
    parser.add_argument("--worker", choices=["async", "sync", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    return parser.parse_args()


# --- the load generator (second process) -----------------------------------------------------------


async def async_load(url: str, jobs: int, concurrency: int) -> dict:
    import aiohttp

    body = json.dumps(JOB).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    remaining = iter(range(jobs))

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in remaining:
            started = time.perf_counter()
            async with session.post(f"{url}/v1/jobs", data=body, headers=headers) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
            latencies.append((time.perf_counter() - started) * 1000)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"latencies_ms": latencies, "elapsed_s": elapsed, "statuses": statuses}


async def sync_load(url: str, rate: float, duration_s: float) -> dict:
    import aiohttp

    body = json.dumps(JOB).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    async def one(session: aiohttp.ClientSession, planned: float) -> None:
        await asyncio.sleep(max(0.0, planned - time.perf_counter()))
        async with session.post(f"{url}/v1/jobs?wait=30", data=body, headers=headers) as response:
            answer = await response.json()
        statuses[f"{response.status} {answer.get('status')}"] = (
            statuses.get(f"{response.status} {answer.get('status')}", 0) + 1
        )
        latencies.append((time.perf_counter() - planned) * 1000)  # from the planned start

    count = int(rate * duration_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter() + 0.5
        await asyncio.gather(*(one(session, start + index / rate) for index in range(count)))
    return {"latencies_ms": latencies, "statuses": statuses}


def raw_baseline(bootstrap: str, topic: str, jobs: int) -> dict:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 2})
    body = json.dumps({**JOB, "job_id": "x"}).encode()
    delivered = [0]

    def on_delivery(error, _message) -> None:
        delivered[0] += error is None

    started = time.perf_counter()
    for index in range(jobs):
        while True:
            try:
                producer.produce(topic, key=str(index).encode(), value=body, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(60)
    return {"elapsed_s": time.perf_counter() - started, "delivered": delivered[0]}


def run_worker(args: argparse.Namespace) -> None:
    if args.worker == "async":
        result = asyncio.run(async_load(args.url, args.jobs, args.concurrency))
    elif args.worker == "sync":
        result = asyncio.run(sync_load(args.url, args.sync_rate, args.sync_duration))
    else:
        result = raw_baseline(args.bootstrap, args.topic, args.jobs)
    print(json.dumps(result))


def in_second_process(*flags: str) -> dict:
    output = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, check=True,
                            preexec_fn=die_with_parent)  # fmt: skip
    return json.loads(output.stdout.strip().splitlines()[-1])


# --- the benchmark -----------------------------------------------------------------------------------


def start_gateway(config: dict, workdir: Path, name: str) -> tuple[subprocess.Popen, str]:
    port = free_loopback_port()
    config = {**config, "gateway": {"api_keys": [{"name": "bench", "sha256": hash_key(KEY), "rate_per_s": 100_000}],
                                    "port": port}}  # fmt: skip
    path = write_config(config, workdir / f"{name}.toml")
    log_file = (workdir / f"{name}.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "sdagent", "gateway", "--config", str(path)],
                               stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                               env={**local_aws_environment(), **_environ()})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process)
    return process, url


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 30) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the gateway exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise SystemExit("the gateway did not get ready")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(30)


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    setup()
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    with Services(BUCKET) as services:
        base = stack_config(services.bootstrap, services.s3_endpoint, BUCKET, jobs_partitions=12,
                            logging={"format": "json", "level": "info"}, metrics={"enabled": False})  # fmt: skip
        async_config = {**base, "topics": {**base["topics"], **_prefixed(base, f"gwa-{uuid.uuid4().hex[:6]}.")}}
        ensure_topics(settings_from(async_config))
        gateway, url = start_gateway(async_config, workdir, "gateway-async")
        try:
            say(f"async: {args.jobs} submissions, {args.concurrency} in flight, from a second process")
            meter = CpuMeter()
            meter.mark()
            load = in_second_process("--worker", "async", "--url", url, "--jobs", str(args.jobs),
                                     "--concurrency", str(args.concurrency))  # fmt: skip
            async_cpu = meter.since_mark()
        finally:
            stop(gateway)
        submits_per_s = args.jobs / load["elapsed_s"]
        say(f"async: {cpu_line(*async_cpu, args.jobs)}")
        say(
            f"async: {submits_per_s:.0f} submissions/s, statuses {load['statuses']}; latency {summary(load['latencies_ms'])}"
        )
        raw = in_second_process("--worker", "raw", "--bootstrap", services.bootstrap,
                                "--topic", async_config["topics"]["jobs"], "--jobs", str(args.jobs))  # fmt: skip
        raw_per_s = raw["delivered"] / raw["elapsed_s"]
        say(f"raw confluent-kafka producer (acks=all, same bytes, one process): {raw_per_s:.0f} records/s")

        sync_config = {**base, "topics": {**base["topics"], **_prefixed(base, f"gws-{uuid.uuid4().hex[:6]}.")}}
        settings = settings_from(sync_config)
        ensure_topics(settings)
        agents = [spawn_agent({**sync_config, "agent": {**sync_config["agent"], "instance_id": f"gw-agent-{i}"},
                               "logging": {"format": "json", "level": "warning"}}, workdir, name=f"agent-{i}")
                  for i in range(args.agents)]  # fmt: skip
        gateway, url = start_gateway(sync_config, workdir, "gateway-sync")
        try:
            wait_for_group(services.bootstrap, settings.kafka.group_id, args.agents, 12, timeout_s=60,
                           topic=settings.topics.jobs)  # fmt: skip
            say(f"sync: {args.sync_rate:.0f} jobs/s offered for {args.sync_duration:.0f} s with ?wait=30, "
                f"{args.agents} agents (zero-latency simulated backend)")  # fmt: skip
            meter.mark()
            sync = in_second_process("--worker", "sync", "--url", url, "--sync-rate", str(args.sync_rate),
                                     "--sync-duration", str(args.sync_duration))  # fmt: skip
            sync_cpu = meter.since_mark()
        finally:
            stop(gateway)
            stop_agents(agents)
        say(f"sync: {cpu_line(*sync_cpu, int(args.sync_rate * args.sync_duration))}")
        say(f"sync: answers {sync['statuses']}; round trip {summary(sync['latencies_ms'])}")
    p99 = percentile(load["latencies_ms"], 99)
    say(f"submits_per_s {submits_per_s:.0f} (goal >= 1000: {'met' if submits_per_s >= 1000 else 'NOT met'}), "
        f"p99 {p99:.1f} ms (goal < 50: {'met' if p99 < 50 else 'NOT met'}), ratio to raw {submits_per_s / raw_per_s:.2f}")  # fmt: skip
    emit({
        "submits_per_s": round(submits_per_s, 1), "p50_ms": round(percentile(load["latencies_ms"], 50), 2),
        "p99_ms": round(p99, 2), "raw_per_s": round(raw_per_s, 1), "ratio_vs_raw": round(submits_per_s / raw_per_s, 3),
        "concurrency": args.concurrency, "jobs": args.jobs, "sync_offered_per_s": args.sync_rate,
        "sync_p50_ms": round(percentile(sync["latencies_ms"], 50), 1),
        "sync_p99_ms": round(percentile(sync["latencies_ms"], 99), 1), "sync_answers": sync["statuses"],
        "agents": args.agents,
    })  # fmt: skip


def _prefixed(config: dict, prefix: str) -> dict[str, str]:
    names = ("jobs", "results", "dead_letters", "control", "replies", "agents")
    return {name: prefix + config["topics"][name] for name in names}


if __name__ == "__main__":
    main()
