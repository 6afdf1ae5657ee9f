"""Sync round trip under load: Client.run() from submit to terminal answer in hand, open loop.

Jobs are offered at a fixed rate (100 jobs/s by default) whatever the answers do: a scheduler
thread launches each Client.run() at its planned time on a large thread pool, and each latency
is counted from the *planned* time, so a slow answer or a late launch shows up in the figures
instead of quietly lowering the load (coordinated omission). One Client is shared by every thread.

The agents run as ``sdagent run`` subprocesses on the zero-latency simulated backend, with moto's
S3 on loopback. One agent runs one job at a time, so first one agent's capacity is measured (the
rate at which it drains a backlog, from the broker timestamps of its answers); then enough agents
are started to keep each at about half of that (``--agents`` overrides), and the group is checked
to have spread the jobs partitions over all of them before any load is offered.

Usage: ``.venv/bin/python bench/sync_roundtrip.py [--rate 100] [--duration 20] [--agents N]
[--client-config JSON]`` (``--client-config`` adds librdkafka settings to the agents only).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common import (
    CpuMeter,
    ResultsReader,
    Services,
    agent_log_tail,
    bench_job,
    cpu_line,
    emit,
    intervals,
    percentile,
    preload_jobs,
    say,
    setup,
    stop_agents,
    summary,
    use_log_append_time,
    wait_answered,
    wait_for_group,
)

from sdagent.client import Client
from sdagent.devstack.stack import ensure_topics, settings_from, spawn_agent, stack_config
from sdagent.jobs import StatusEvent

BUCKET = "sdagent-bench"
# Divisible by 2, 3 and 4, so every fleet size the benchmark picks gets an even share.
JOBS_PARTITIONS = 12
CAPACITY_JOBS = 150  # bounded: at the few jobs/s measured before, this alone takes ~25 s
CAPACITY_WARMUP = 10
TARGET_UTILIZATION = 0.5  # per agent: jobs land on partitions by key, so load is uneven; keep slack
MAX_AGENTS = 4  # a 2-core machine also runs the broker, moto and this script
GROUP_SETTLE_TIMEOUT_S = 60.0
CAPACITY_LIMIT_S = 60.0  # the capacity is measured on what is answered by then
LEFTOVER_DRAIN_S = 30.0  # the whole fleet then finishes that backlog before any load is offered
POOL_SLACK_S = 2.0  # threads for rate * (timeout + this): even if every answer times out, no launch waits
GOAL_P99_MS = 50.0


class TimedClient(Client):
    """The shared Client, timing each submit (Client.run = submit + wait) on the calling thread."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_submit_ms = threading.local()

    def submit(self, job):
        started = time.perf_counter()
        try:
            return super().submit(job)
        finally:
            self.last_submit_ms.value = (time.perf_counter() - started) * 1000


@dataclass
class Sample:
    index: int
    planned: float  # perf_counter when it should start
    started: float  # perf_counter when Client.run() was called
    finished: float  # perf_counter when the terminal answer was in hand (or the timeout fired)
    submitted_wall: float  # time.time() at submit, for the agent-side split
    finished_wall: float
    submit_ms: float  # Client.submit inside Client.run: produce + flush until acks=all
    answer: StatusEvent | None  # None: timed out

    @property
    def latency_ms(self) -> float:
        return (self.finished - self.planned) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="offered jobs per second")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds of load")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    parser.add_argument("--agents", type=int, default=0, help="agents to run (default: from measured capacity)")
    parser.add_argument("--timeout", type=float, default=5.0, help="Client.run timeout per job, seconds")
    parser.add_argument(
        "--client-config", type=json.loads, default={},
        help='extra librdkafka settings for the agents only (kafka.client_config), e.g. \'{"fetch.wait.max.ms": 50}\'',
    )  # fmt: skip
    args = parser.parse_args()
    setup()

    say(
        f"sync round-trip benchmark: {args.rate:g} jobs/s offered open-loop for {args.duration:g} s "
        f"(+{args.warmup:g} s warm-up), zero-latency simulated backend, moto S3, agents as subprocesses"
    )
    with Services(BUCKET) as services, tempfile.TemporaryDirectory(prefix="sdagent-bench-") as tmp:
        samples, agents, capacity = run(services, Path(tmp), args)
    emit(report(samples, args, agents, capacity))


def run(services: Services, workdir: Path, args) -> tuple[list[Sample], int, float]:
    """Size the fleet from one agent's capacity, start it, offer the load; always stop the agents."""
    configs = [agent_config(services, index, args.client_config) for index in range(MAX_AGENTS)]
    if args.client_config:
        say(f"agents' extra librdkafka settings: {args.client_config}")
    # The client gets the stack's plain settings: only the agents are under test.
    settings = settings_from(agent_config(services, 0, {}))
    ensure_topics(settings)
    use_log_append_time(services.bootstrap, settings.topics.results)
    group = settings.kafka.group_id
    processes = []
    reader = ResultsReader(services.bootstrap, settings.topics.results)
    try:
        processes.append(spawn_agent(configs[0], workdir, "agent-0"))
        wait_for_group(services.bootstrap, group, 1, JOBS_PARTITIONS, GROUP_SETTLE_TIMEOUT_S, settings.topics.jobs)
        capacity_jobs = {f"capacity-{index:05d}" for index in range(CAPACITY_JOBS)}
        capacity = measure_capacity(services, settings.topics.jobs, reader, capacity_jobs, processes)
        needed = math.ceil(args.rate / (capacity * TARGET_UTILIZATION))
        agents = args.agents or min(MAX_AGENTS, max(1, needed))
        capped = " (capped: 2-core machine)" if agents < needed and not args.agents else ""
        say(
            f"\none agent drains a backlog at {capacity:.1f} jobs/s; {args.rate:g} jobs/s at "
            f"<= {TARGET_UTILIZATION:.0%} per agent needs {needed} agents; running {agents}{capped}"
        )
        for index in range(1, agents):
            processes.append(spawn_agent(configs[index], workdir, f"agent-{index}"))
        shares = wait_for_group(services.bootstrap, group, agents, JOBS_PARTITIONS, GROUP_SETTLE_TIMEOUT_S,
                                settings.topics.jobs)  # fmt: skip
        say(f"group settled: {dict(sorted(shares.items()))} (jobs partitions per agent)")
        if not wait_answered(reader, capacity_jobs, processes, LEFTOVER_DRAIN_S):
            raise RuntimeError("the fleet did not finish the capacity backlog; no load offered")
        reader.close()

        meter = CpuMeter()
        with TimedClient(settings.kafka, settings.topics) as client:
            meter.mark()
            samples = offer_load(client, args.rate, args.warmup + args.duration, args.timeout)
            cpu_used, cpu_wall = meter.since_mark()
        dead = [p.pid for p in processes if p.poll() is not None]
    except Exception:
        for index in range(len(processes)):
            say(f"--- agent-{index} log tail ---\n{agent_log_tail(workdir, f'agent-{index}')}")
        raise
    finally:
        codes = stop_agents(processes)
        reader.close()
    say(f"agents stopped, exit codes {codes}" + (f"; DIED during the run: {dead}" if dead else ""))
    say(f"[load] {cpu_line(cpu_used, cpu_wall, len(samples))} (bench = the client side; whole load incl. warm-up)")
    return samples, agents, capacity


def agent_config(services: Services, index: int, client_config: dict) -> dict:
    return stack_config(
        services.bootstrap,
        services.s3_endpoint,
        BUCKET,
        topic_prefix="sync.",
        jobs_partitions=JOBS_PARTITIONS,
        agent={"instance_id": f"bench-agent-{index}"},
        kafka={"client_config": client_config},
        logging={"format": "json", "level": "warning"},
    )


def measure_capacity(services: Services, jobs_topic: str, reader: ResultsReader, job_ids: set[str], processes) -> float:
    """One agent's drain rate: jobs/s between broker-stamped answers to a preloaded backlog."""
    say(
        f"\n[capacity] one agent, backlog of {len(job_ids)} jobs on {JOBS_PARTITIONS} partitions "
        f"(time limit {CAPACITY_LIMIT_S:g} s)"
    )
    preload_jobs(services.bootstrap, jobs_topic, sorted(job_ids))
    wait_answered(reader, job_ids, processes, CAPACITY_LIMIT_S)
    completions = sorted(
        (reader.completions[job_id] for job_id in job_ids if job_id in reader.completions), key=lambda c: c.broker_ms
    )
    measured = completions[CAPACITY_WARMUP - 1 :]
    if len(measured) < 10:
        raise RuntimeError(f"only {len(completions)} capacity jobs answered: too few to measure")
    gaps = intervals([c.broker_ms for c in measured])
    rate = len(gaps) / ((measured[-1].broker_ms - measured[0].broker_ms) / 1000)
    say(f"[capacity] inter-completion: {summary(gaps)}; {rate:.1f} jobs/s")
    return rate


def offer_load(client: TimedClient, rate: float, seconds: float, timeout_s: float) -> list[Sample]:
    """Launch ``rate * seconds`` Client.run() calls at their planned times; collect every outcome."""
    count = int(rate * seconds)
    samples: list[Sample] = []
    lock = threading.Lock()

    def one(index: int, planned: float) -> None:
        started = time.perf_counter()
        submitted_wall = time.time()
        job = bench_job(f"sync-{index:05d}")
        try:
            answer: StatusEvent | None = client.run(job, timeout_s=timeout_s)
        except TimeoutError:
            answer = None
        finished, finished_wall = time.perf_counter(), time.time()
        submit_ms = getattr(client.last_submit_ms, "value", math.nan)
        sample = Sample(index, planned, started, finished, submitted_wall, finished_wall, submit_ms, answer)
        with lock:
            samples.append(sample)

    say(f"\n[load] offering {count} jobs at {rate:g}/s ...")
    threads = math.ceil(rate * (timeout_s + POOL_SLACK_S))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-run")
    futures = []
    origin = time.perf_counter() + 0.1
    for index in range(count):
        planned = origin + index / rate
        delay = planned - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        futures.append(pool.submit(one, index, planned))
    say(f"[load] all {count} launched; waiting for the last answers (at most {timeout_s:g} s)")
    concurrent.futures.wait(futures, timeout=timeout_s + 10)
    pool.shutdown(wait=False, cancel_futures=True)
    for future in futures:
        if future.done() and future.exception() is not None:
            raise future.exception()
    return sorted(samples, key=lambda s: s.index)


def report(samples: list[Sample], args, agents: int, capacity: float) -> dict:
    warmup_count = int(args.rate * args.warmup)
    measured = [s for s in samples if s.index >= warmup_count]
    answered = [s for s in measured if s.answer is not None]
    timeouts = [s for s in measured if s.answer is None]
    statuses = Counter(s.answer.status.value for s in answered)
    # A timed-out job counts with the timeout as its latency: a lower bound, never left out.
    latencies = [s.latency_ms for s in measured]
    starts = sorted(s.started for s in measured)
    offered = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 else 0.0
    lateness = [(s.started - s.planned) * 1000 for s in measured]
    agent_side = [(s.answer.at.timestamp() - s.submitted_wall) * 1000 for s in answered]
    reply_side = [(s.finished_wall - s.answer.at.timestamp()) * 1000 for s in answered]
    queue_wait = [s.answer.timings_ms.get("queue_wait_ms", math.nan) for s in answered if s.answer.timings_ms]
    total = [s.answer.timings_ms["total_ms"] for s in answered if "total_ms" in s.answer.timings_ms]
    per_agent = Counter(s.answer.agent for s in answered)
    submit = [s.submit_ms for s in measured]

    say("")
    say(
        f"[load] measured {len(measured)} jobs offered at {offered:.1f}/s (launch lateness p99 "
        f"{percentile(lateness, 99):.2f} ms); answers: {dict(statuses)}; timeouts: {len(timeouts)}"
    )
    say(f"[load] round trip, planned launch -> terminal answer in hand: {summary(latencies)}")
    say(f"[load]   Client.submit inside run (produce + flush until acked): {summary(submit)}")
    say(f"[load]   submit -> agent built the answer (wall clock): {summary(agent_side)}")
    say(f"[load]     of which queue wait in Kafka + intake (queue_wait_ms): {summary(queue_wait)}")
    say(f"[load]     of which run on the agent (timings_ms.total_ms):         {summary(total)}")
    say(
        f"[load]   answer built -> in the caller's hand (durable produce, reply fetch, caller still in submit): "
        f"{summary(reply_side)}"
    )
    say(f"[load] jobs per agent: {dict(sorted(per_agent.items()))}")
    p99 = percentile(latencies, 99)
    say(
        f"p50 {percentile(latencies, 50):.2f} ms, p99 {p99:.2f} ms at {offered:.1f} jobs/s offered with {agents} "
        f"agents (goal p99 < {GOAL_P99_MS:.0f} ms: {'met' if p99 < GOAL_P99_MS else 'NOT met'})"
    )
    return {
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(p99, 3),
        "p90_ms": round(percentile(latencies, 90), 3),
        "max_ms": round(max(latencies), 3),
        "offered_per_s": round(offered, 2),
        "jobs": len(measured),
        "answered": len(answered),
        "timeouts": len(timeouts),
        "agents": agents,
        "agent_capacity_jobs_per_s": round(capacity, 2),
        "jobs_partitions": JOBS_PARTITIONS,
        "queue_wait_ms_p99": round(percentile(queue_wait, 99), 3),
        "reply_path_ms_p50": round(percentile(reply_side, 50), 3),
        "submit_ms_p50": round(percentile(submit, 50), 3),
        "submit_ms_p99": round(percentile(submit, 99), 3),
    }


if __name__ == "__main__":
    main()
