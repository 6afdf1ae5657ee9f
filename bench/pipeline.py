"""Agent overhead per job: one agent draining a backlog, against a plain confluent-kafka loop.

The backend is the simulated one with no latency and a warm encode cache (every job renders the
same 512x512 PNG), and S3 is moto on loopback, so what is left per job is the agent's own work:
fetch, parse, ledger checks, status events, upload, durable answer, commit.

The agent runs as a subprocess (``sdagent run``, as in production). In-process, it would share one
GIL with this script's results reader and with the librdkafka callbacks of both, and what we would
measure would partly be the benchmark. As its own process it has an interpreter to itself, like a
real deployment; the machine's two cores are still shared with the broker and moto, and so they
are for the raw baseline too.

Figures:
- per-job time: the gaps between consecutive ``succeeded`` events on the results topic, stamped
  by the broker (LogAppendTime) when each answer became durable. This includes what the agent's own
  ``timings_ms.total_ms`` leaves out: the durable answer, the commit and fetching the next job.
- ``jobs_per_s``: measured jobs / (last completion - the completion before the first measured one).
- the raw baseline: the same external work with none of the agent's logic (consume, one S3
  put_object of the same PNG bytes, one acks=all idempotent result produce with flush, async commit)
  measured the same way on fresh topics.

The first ``--warmup`` completions of each run are dropped (connections, the first render, JIT
of the broker's request path). Each run has a time limit (``AGENT_RUN_LIMIT_S``,
``RAW_RUN_LIMIT_S``); an agent run cut short reports on the jobs answered in time and says so.

The agent's idle time between two jobs (its answer built -> the next job's first event) is
reported too: it is where the intake's pause/resume fetch stalls show up.

Usage: ``.venv/bin/python bench/pipeline.py [--jobs 2000] [--warmup 50] [--client-config JSON]``
(``--client-config`` adds librdkafka settings to the agent only, to try a remedy without editing it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig
from common import (
    MODEL,
    CpuMeter,
    ResultsReader,
    Services,
    agent_log_tail,
    bench_job,
    cpu_line,
    create_plain_topics,
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
)
from confluent_kafka import Consumer, Producer, TopicPartition

from sdagent.backends.simulated import SimulatedBackend
from sdagent.devstack.stack import ensure_topics, settings_from, spawn_agent, stack_config
from sdagent.jobs import StatusEvent

BUCKET = "sdagent-bench"
JOBS_PARTITIONS = 4  # stack_config's default; one agent holds them all
# Time limits keep the whole benchmark under ~3 minutes even when the agent is slow; the agent's
# figures then cover the jobs answered in time (the output says so).
AGENT_RUN_LIMIT_S = 90.0
RAW_RUN_LIMIT_S = 60.0
STALL_MS = 100.0  # an idle gap between two jobs longer than this counts as a stall
GOAL_P99_MS = 20.0
GOAL_RATIO = 0.5
# Same client settings the agent's output store uses (sdagent.agent.build), so both sides make the
# same kind of request.
S3_CONFIG = BotoConfig(
    signature_version="s3v4", retries={"mode": "standard", "max_attempts": 2}, connect_timeout=5, read_timeout=60
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="measured jobs per run")
    parser.add_argument("--warmup", type=int, default=50, help="completions dropped at the start of each run")
    parser.add_argument(
        "--client-config", type=json.loads, default={},
        help='extra librdkafka settings for the agent only (kafka.client_config), e.g. \'{"fetch.wait.max.ms": 50}\'',
    )  # fmt: skip
    args = parser.parse_args()
    setup()

    png = reference_png()
    say(
        f"pipeline benchmark: {args.jobs} jobs (+{args.warmup} warm-up), 512x512 PNG of {len(png)} bytes, "
        f"zero-latency simulated backend, moto S3, one agent"
    )
    with Services(BUCKET) as services, tempfile.TemporaryDirectory(prefix="sdagent-bench-") as workdir:
        agent = run_agent(services, Path(workdir), args.jobs, args.warmup, args.client_config)
        raw = run_raw(services, png, args.jobs, args.warmup)

    ratio = agent["jobs_per_s"] / raw["jobs_per_s"]
    say("")
    say(
        f"agent: {agent['jobs_per_s']:.1f} jobs/s, per job (inter-completion) p50 {agent['p50_ms']:.2f} ms, "
        f"p99 {agent['p99_ms']:.2f} ms"
    )
    say(
        f"raw:   {raw['jobs_per_s']:.1f} jobs/s, per job (inter-completion) p50 {raw['p50_ms']:.2f} ms, "
        f"p99 {raw['p99_ms']:.2f} ms"
    )
    say(
        f"ratio agent/raw {ratio:.2f} (goal >= {GOAL_RATIO}: {'met' if ratio >= GOAL_RATIO else 'NOT met'}); "
        f"agent p99 {agent['p99_ms']:.2f} ms (goal < {GOAL_P99_MS:.0f}: "
        f"{'met' if agent['p99_ms'] < GOAL_P99_MS else 'NOT met'})"
    )
    emit(
        {
            "jobs": agent["jobs"],
            "jobs_planned": args.jobs,
            "agent_run_complete": agent["complete"],
            "warmup_jobs": args.warmup,
            "p50_ms": round(agent["p50_ms"], 3),
            "p99_ms": round(agent["p99_ms"], 3),
            "per_job_measure": "inter-completion interval of succeeded events (broker LogAppendTime)",
            "jobs_per_s": round(agent["jobs_per_s"], 2),
            "raw_jobs_per_s": round(raw["jobs_per_s"], 2),
            "raw_p50_ms": round(raw["p50_ms"], 3),
            "raw_p99_ms": round(raw["p99_ms"], 3),
            "ratio_vs_raw": round(ratio, 3),
            "total_ms_p50": round(agent["total_ms_p50"], 3),
            "total_ms_p99": round(agent["total_ms_p99"], 3),
            "outside_total_ms_mean": round(agent["outside_total_ms_mean"], 3),
            "idle_between_jobs_ms_p50": round(agent["idle_between_jobs_ms_p50"], 3),
            "stalls_over_100ms": agent["stalls_over_100ms"],
            "stall_share_of_time": round(agent["stall_share_of_time"], 3),
            "agent_cpu_ms_per_job": round(agent["agent_cpu_ms_per_job"], 2),
            "upload_bytes": len(png),
            "agent_mode": "subprocess",
            "agent_client_config": args.client_config,
        }
    )


def reference_png() -> bytes:
    """The bytes the agent's simulated backend produces for every benchmark job."""
    backend = SimulatedBackend([MODEL], initial_model=MODEL)
    generation = backend.generate(bench_job(), lambda _step, _steps: None, threading.Event())
    return generation.artifacts[0].data


# --- the agent ---------------------------------------------------------------------------------


def run_agent(services: Services, workdir: Path, jobs: int, warmup: int, client_config: dict) -> dict[str, float]:
    config = stack_config(
        services.bootstrap,
        services.s3_endpoint,
        BUCKET,
        topic_prefix="pipe.",
        jobs_partitions=JOBS_PARTITIONS,
        kafka={"client_config": client_config},
        logging={"format": "json", "level": "warning"},
    )
    if client_config:
        say(f"agent's extra librdkafka settings: {client_config}")
    settings = settings_from(config)
    ensure_topics(settings)
    use_log_append_time(services.bootstrap, settings.topics.results)
    job_ids = [f"pipe-{index:05d}" for index in range(warmup + jobs)]
    started = time.monotonic()
    preload_jobs(services.bootstrap, settings.topics.jobs, job_ids)
    say(
        f"\n[agent] preloaded {len(job_ids)} jobs into {settings.topics.jobs} "
        f"({JOBS_PARTITIONS} partitions) in {time.monotonic() - started:.1f} s; starting `sdagent run`"
    )

    reader = ResultsReader(services.bootstrap, settings.topics.results)
    process = spawn_agent(config, workdir, "agent")
    started = time.monotonic()
    meter = CpuMeter()
    try:
        # CPU is counted from the end of the warm-up, so the agent's start-up is left out.
        reader.wait_count(warmup, AGENT_RUN_LIMIT_S)
        meter.mark()
        marked_count = len(reader.completions)
        complete = wait_answered(reader, set(job_ids), [process], AGENT_RUN_LIMIT_S - (time.monotonic() - started))
        cpu_used, cpu_wall = meter.since_mark()
        cpu_jobs = len(reader.completions) - marked_count
    except Exception:
        say(agent_log_tail(workdir, "agent"))
        raise
    finally:
        codes = stop_agents([process])
        reader.close()
    answered = len(reader.completions)
    say(
        f"[agent] {answered}/{len(job_ids)} answered {time.monotonic() - started:.1f} s after spawn "
        f"(includes interpreter and group start-up); agent exit code {codes[0]}"
    )
    if not complete:
        say(
            f"[agent] TIME LIMIT ({AGENT_RUN_LIMIT_S:g} s) reached: the figures below cover the "
            f"{answered - warmup} measured jobs answered in time, not {jobs}"
        )

    completions = sorted(reader.completions.values(), key=lambda c: c.broker_ms)
    statuses = {c.status for c in completions}
    if statuses != {"succeeded"}:
        raise RuntimeError(f"not every job succeeded: {sorted(statuses)}; see {workdir}/agent.log")
    if len(completions) <= warmup + 1:
        raise RuntimeError(f"only {len(completions)} jobs answered: too few to measure")
    # Completion warmup-1 is the start line: the measured jobs are the answers after it.
    measured = completions[warmup - 1 :] if warmup else completions
    gaps = intervals([c.broker_ms for c in measured])
    span_ms = measured[-1].broker_ms - measured[0].broker_ms
    events = [c.event for c in (measured[1:] if warmup else measured) if c.event is not None]
    totals = [e.timings_ms["total_ms"] for e in events]
    micro_gaps = intervals([e.at.timestamp() * 1000 for e in events])
    idle = idle_between_jobs(events, reader.taken_ms)
    stalls = [gap for gap in idle if gap > STALL_MS]
    figures = {
        "jobs": len(gaps),
        "complete": complete,
        "p50_ms": percentile(gaps, 50),
        "p99_ms": percentile(gaps, 99),
        "jobs_per_s": len(gaps) / (span_ms / 1000),
        "total_ms_p50": percentile(totals, 50),
        "total_ms_p99": percentile(totals, 99),
        "outside_total_ms_mean": span_ms / len(gaps) - sum(totals) / len(totals),
        "idle_between_jobs_ms_p50": percentile(idle, 50),
        "stalls_over_100ms": len(stalls),
        "stall_share_of_time": sum(stalls) / span_ms,
    }
    say(f"[agent] per job, inter-completion (broker LogAppendTime, 1 ms resolution): {summary(gaps)}")
    say(f"[agent] per job, inter-completion (agent's event 'at', us resolution):     {summary(micro_gaps)}")
    say(f"[agent] per job, agent's own timings_ms.total_ms (start -> before answer): {summary(totals)}")
    for name in ("queue_wait_ms", "inference_ms", "upload_ms"):
        values = [e.timings_ms[name] for e in events if name in e.timings_ms]
        say(f"[agent]   {name:<14} p50 {percentile(values, 50):.2f} ms  p99 {percentile(values, 99):.2f} ms")
    say(
        f"[agent] mean per job outside total_ms (answer, commit, next fetch, scheduling): "
        f"{figures['outside_total_ms_mean']:.2f} ms; results topic records read: {reader.records} "
        f"({reader.records / answered:.1f} per job)"
    )
    say(f"[agent] idle between jobs (answer built -> next job's first event, agent clock): {summary(idle)}")
    say(
        f"[agent]   {len(stalls)} stalls over {STALL_MS:g} ms took {sum(stalls) / 1000:.1f} s, "
        f"{figures['stall_share_of_time']:.0%} of the measured {span_ms / 1000:.1f} s"
    )
    say(f"[agent] {cpu_line(cpu_used, cpu_wall, cpu_jobs)}")
    say(f"[agent] throughput {figures['jobs_per_s']:.1f} jobs/s over {len(gaps)} jobs in {span_ms / 1000:.2f} s")
    figures["agent_cpu_ms_per_job"] = cpu_used.get("agents", 0.0) * 1000 / max(cpu_jobs, 1)
    return figures


def idle_between_jobs(events: list[StatusEvent], taken_ms: dict[str, float]) -> list[float]:
    """For each job, the gap from the previous job's answer to this job's first event.

    Covers the durable answer, the commit, resuming the partitions and fetching the next record:
    the part of the intake loop no agent timing reports.
    """
    ordered = sorted(events, key=lambda e: e.at)
    gaps = []
    for previous, current in zip(ordered, ordered[1:]):
        if current.job_id in taken_ms:
            gaps.append(taken_ms[current.job_id] - previous.at.timestamp() * 1000)
    return gaps


# --- the raw baseline --------------------------------------------------------------------------


def run_raw(services: Services, png: bytes, jobs: int, warmup: int) -> dict[str, float]:
    """Consume, upload, produce durably, commit: the minimum any agent must do per job."""
    jobs_topic, results_topic = "raw.jobs", "raw.results"
    create_plain_topics(services.bootstrap, {jobs_topic: JOBS_PARTITIONS, results_topic: 2})
    use_log_append_time(services.bootstrap, results_topic)
    job_ids = [f"raw-{index:05d}" for index in range(warmup + jobs)]
    preload_jobs(services.bootstrap, jobs_topic, job_ids)
    say(f"\n[raw] preloaded {len(job_ids)} jobs into {jobs_topic}; running the plain confluent-kafka loop in-process")

    consumer = Consumer(
        {
            "bootstrap.servers": services.bootstrap,
            "group.id": f"raw-{uuid.uuid4().hex[:8]}",
            "group.protocol": "consumer",  # KIP-848, as the agent
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer(
        {"bootstrap.servers": services.bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 0}
    )
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=services.s3_endpoint, config=S3_CONFIG)
    consumer.subscribe([jobs_topic])
    meter = CpuMeter()
    meter.mark()  # again after the warm-up, below
    done = 0
    put_ms: list[float] = []
    produce_ms: list[float] = []
    started = time.monotonic()
    deadline = started + RAW_RUN_LIMIT_S
    try:
        while done < len(job_ids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"raw loop: only {done}/{len(job_ids)} done within {RAW_RUN_LIMIT_S} s")
            message = consumer.poll(1.0)
            if message is None or message.error() is not None:
                continue
            job_id = message.key().decode()
            key = f"raw/{job_id}/0.png"
            since = time.perf_counter()
            s3.put_object(
                Bucket=BUCKET, Key=key, Body=png, ContentType="image/png",
                CacheControl="public, max-age=31536000, immutable",
            )  # fmt: skip
            put_ms.append((time.perf_counter() - since) * 1000)
            since = time.perf_counter()
            result = {"job_id": job_id, "status": "succeeded", "bucket": BUCKET, "key": key, "bytes": len(png)}
            outcome: list = []
            producer.produce(
                results_topic, key=job_id.encode(), value=json.dumps(result).encode(),
                on_delivery=lambda err, _msg, outcome=outcome: outcome.append(err),
            )  # fmt: skip
            producer.flush(30)
            produce_ms.append((time.perf_counter() - since) * 1000)
            if not outcome or outcome[0] is not None:
                raise RuntimeError(f"raw loop: result of {job_id} not delivered: {outcome}")
            consumer.commit(
                offsets=[TopicPartition(message.topic(), message.partition(), message.offset() + 1)],
                asynchronous=True,
            )
            done += 1
            if done == warmup:
                meter.mark()
        cpu_used, cpu_wall = meter.since_mark()
    finally:
        consumer.close()
    say(f"[raw] {done} jobs done in {time.monotonic() - started:.1f} s (includes group join)")

    reader = ResultsReader(services.bootstrap, results_topic, decode=False)
    try:
        if not reader.wait_for(set(job_ids), 30):
            raise RuntimeError("raw results could not be read back")
    finally:
        reader.close()
    completions = sorted(reader.completions.values(), key=lambda c: c.broker_ms)
    measured = completions[warmup - 1 :] if warmup else completions
    gaps = intervals([c.broker_ms for c in measured])
    span_ms = measured[-1].broker_ms - measured[0].broker_ms
    figures = {
        "p50_ms": percentile(gaps, 50),
        "p99_ms": percentile(gaps, 99),
        "jobs_per_s": len(gaps) / (span_ms / 1000),
    }
    say(f"[raw] per job, inter-completion (broker LogAppendTime): {summary(gaps)}")
    say(f"[raw]   S3 put_object to moto:         {summary(put_ms[warmup:])}")
    say(f"[raw]   result produce + flush (acks=all): {summary(produce_ms[warmup:])}")
    say(f"[raw] {cpu_line(cpu_used, cpu_wall, done - warmup)} (bench = the raw loop)")
    say(f"[raw] throughput {figures['jobs_per_s']:.1f} jobs/s over {len(gaps)} jobs in {span_ms / 1000:.2f} s")
    return figures


if __name__ == "__main__":
    main()
