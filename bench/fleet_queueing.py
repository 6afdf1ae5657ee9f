"""Fleet queueing: how long jobs wait for a GPU with partition-bound consumption vs a share group.

Six agents (`sdagent run` subprocesses) on the simulated backend, scaled to this machine: image
jobs of ~300 ms (lognormal, CV 0.25) and 5 % long jobs of ~6 s. One open-loop Poisson trace,
offered at 70 % of the fleet's capacity, is replayed once per case on fresh topics:

- ``partition``: a consumer group on a 12-partition jobs topic, jobs keyed by job id (plain keying);
- ``partition-routed``: the same, jobs sent to the less loaded of two agents drawn at random
  (``jobs_routing = "least_loaded"``, from the agents' beacons);
- ``partition-routed-all``: the same, to the least loaded of all agents (``routing_choices = 0``);
- ``share``: a share group on a 1-partition jobs topic (what `sdagent topics create` makes);
- ``share-2p-8agents``: a share group of 8 agents on a 2-partition topic (partitions < agents).

For each case it also computes the queue wait an ideal shared queue (FCFS, one queue, the same
number of servers) would give the same arrivals with the service times measured in that case, and
prints queue wait and end-to-end p50/p99, the ratio of the p99 waits, lost and duplicated answers,
and how many jobs each agent ran. CPU figures from the simulator, no GPU.

Usage: ``.venv/bin/python bench/fleet_queueing.py [--duration-s 120] [--load 0.7] [--seed 7]``
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import Services, bench_job, emit, say, setup, stop_agents, warm_up
from confluent_kafka import Consumer, TopicPartition

from sdagent.client import Client
from sdagent.devstack.stack import ensure_topics, settings_from, spawn_agent, stack_config
from sdagent.jobs import Status, StatusEvent

STEP_S = 0.01  # the simulated backend's time per step
IMAGE_STEPS = 30  # ~300 ms
LONG_STEPS = 600  # ~6 s
LONG_SHARE = 0.05
CV = 0.25


@dataclass(frozen=True)
class Case:
    name: str
    consumption: str
    agents: int
    partitions: int
    routing: str = "key"
    choices: int = 2


CASES = (
    Case("partition", "partition", 6, 12),
    Case("partition-routed", "partition", 6, 12, routing="least_loaded"),
    Case("partition-routed-all", "partition", 6, 12, routing="least_loaded", choices=0),
    Case("share", "share", 6, 1),
    Case("share-2p-8agents", "share", 8, 2),
)


@dataclass(frozen=True)
class Arrival:
    at_s: float  # offset from the trace's start
    steps: int


def trace(duration_s: float, rate: float, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    sigma = math.sqrt(math.log(1 + CV**2))
    arrivals, now = [], 0.0
    while True:
        now += rng.expovariate(rate)
        if now >= duration_s:
            return arrivals
        mean = LONG_STEPS if rng.random() < LONG_SHARE else IMAGE_STEPS
        steps = min(1000, max(1, round(mean * rng.lognormvariate(-(sigma**2) / 2, sigma))))
        arrivals.append(Arrival(now, steps))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def ideal_waits(arrivals: list[float], services: list[float], servers: int) -> list[float]:
    """Queue waits of one FCFS queue served by ``servers`` identical servers."""
    free = [0.0] * servers
    waits = []
    for arrival, service in sorted(zip(arrivals, services, strict=True)):
        start = max(arrival, heapq.heappop(free))
        waits.append(start - arrival)
        heapq.heappush(free, start + service)
    return waits


def read_events(settings, job_ids: set[str], timeout_s: float) -> dict[str, list[StatusEvent]]:
    """Every event of the wanted jobs, read until each has a terminal one and 5 s pass quietly."""
    consumer = Consumer({"bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": "queueing-reader",
                         "enable.auto.commit": False})  # fmt: skip
    topic = settings.topics.results
    metadata = consumer.list_topics(topic, timeout=10)
    consumer.assign([TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions])
    events: dict[str, list[StatusEvent]] = {job_id: [] for job_id in job_ids}
    answered: set[str] = set()
    deadline, quiet_since = time.monotonic() + timeout_s, time.monotonic()
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                if answered >= job_ids and time.monotonic() - quiet_since > 5:
                    break
                continue
            quiet_since = time.monotonic()
            event = StatusEvent.from_bytes(message.value())
            if event.job_id in events:
                events[event.job_id].append(event)
                if event.status.is_terminal:
                    answered.add(event.job_id)
    finally:
        consumer.close()
    return events


def run_case(case: Case, arrivals: list[Arrival], services: Services, workdir: Path) -> dict:
    prefix = f"q{case.name}."
    config = stack_config(
        services.bootstrap, services.s3_endpoint, services.bucket, topic_prefix=prefix,
        jobs_partitions=case.partitions, consumption=case.consumption,
        backend={"step_latency_s": STEP_S}, limits={"max_steps": 1000}, agent={"progress_interval_s": 5.0},
    )  # fmt: skip
    if case.consumption == "share":
        config["topics"]["jobs_partitions"] = case.partitions
    config["topics"] |= {"jobs_routing": case.routing, "routing_choices": case.choices}
    settings = settings_from(config)
    ensure_topics(settings)
    names = [f"{case.name}-{i}" for i in range(case.agents)]
    agents = [spawn_agent(config | {"agent": {**config["agent"], "instance_id": n}}, workdir, n) for n in names]
    submitted: dict[str, float] = {}
    try:
        with Client(settings.kafka, settings.topics) as client:
            warm_up(client, case.agents)
            say(f"[{case.name}] {case.agents} agents ready; replaying {len(arrivals)} jobs")
            start = time.time()
            for index, arrival in enumerate(arrivals):
                delay = start + arrival.at_s - time.time()
                if delay > 0:
                    time.sleep(delay)
                job = bench_job(f"{case.name}-{index}", steps=arrival.steps, width=64, height=64)
                submitted[job.job_id] = time.time()
                client.submit(job)
        events = read_events(settings, set(submitted), timeout_s=300)
    finally:
        stop_agents(agents)
    return figures(case, submitted, events)


def figures(case: Case, submitted: dict[str, float], events: dict[str, list[StatusEvent]]) -> dict:
    waits, ends, services, arrivals, per_agent = [], [], [], [], {}
    lost = twice = 0
    for job_id, at in submitted.items():
        terminal = [e for e in events[job_id] if e.status.is_terminal]
        started = [e for e in events[job_id] if e.status is Status.STARTED]
        if not terminal:
            lost += 1
            continue
        twice += len(terminal) > 1
        end = terminal[0]
        begin = started[-1].at.timestamp() if started else end.at.timestamp()
        first_start = started[0].at.timestamp() if started else begin
        waits.append(max(0.0, first_start - at))
        ends.append(end.at.timestamp() - at)
        services.append(end.at.timestamp() - begin)
        arrivals.append(at)
        per_agent[end.agent] = per_agent.get(end.agent, 0) + 1
    ideal = ideal_waits(arrivals, services, case.agents)
    p99, ideal_p99 = percentile(waits, 0.99), percentile(ideal, 0.99)
    result = {
        "case": case.name, "consumption": case.consumption, "routing": case.routing,
        "routing_choices": case.choices, "agents": case.agents,
        "partitions": case.partitions,
        "jobs": len(submitted), "lost": lost, "answered_twice": twice,
        "wait_p50_s": round(percentile(waits, 0.5), 3), "wait_p99_s": round(p99, 3),
        "end_to_end_p50_s": round(percentile(ends, 0.5), 3), "end_to_end_p99_s": round(percentile(ends, 0.99), 3),
        "ideal_wait_p50_s": round(percentile(ideal, 0.5), 3), "ideal_wait_p99_s": round(ideal_p99, 3),
        "p99_wait_ratio_to_ideal": round(p99 / ideal_p99, 2) if ideal_p99 > 0 else None,
        "share_goal_p99_s": round(1.5 * ideal_p99 + 0.1, 3),
        "mean_service_s": round(sum(services) / len(services), 3) if services else None,
        "jobs_per_agent": dict(sorted(per_agent.items())),
    }  # fmt: skip
    say(f"[{case.name}] wait p50 {result['wait_p50_s']} s p99 {result['wait_p99_s']} s "
        f"(ideal p99 {result['ideal_wait_p99_s']} s, ratio {result['p99_wait_ratio_to_ideal']}); "
        f"end-to-end p50 {result['end_to_end_p50_s']} s p99 {result['end_to_end_p99_s']} s; "
        f"lost {lost}, answered twice {twice}; per agent {result['jobs_per_agent']}")  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--load", type=float, default=0.7, help="offered load, as a share of the fleet's capacity")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    parser.add_argument(
        "--overhead-s",
        type=float,
        default=0.12,
        help="per-job time besides the steps (encode, upload, answer: ~0.12 s measured here)",
    )
    args = parser.parse_args()
    setup()
    mean_service = STEP_S * ((1 - LONG_SHARE) * IMAGE_STEPS + LONG_SHARE * LONG_STEPS) + args.overhead_s
    workdir = Path(tempfile.mkdtemp(prefix="sdagent-queueing-"))
    results = []
    with Services(bucket="queueing") as services:
        for case in (c for c in CASES if c.name in args.cases.split(",")):
            rate = args.load * case.agents / mean_service
            arrivals = trace(args.duration_s, rate, args.seed)
            say(f"[{case.name}] offered {rate:.1f} jobs/s ({args.load:.0%} of {case.agents} agents x "
                f"{1 / mean_service:.2f} jobs/s) for {args.duration_s:.0f} s")  # fmt: skip
            results.append(run_case(case, arrivals, services, workdir))
    emit({"load": args.load, "duration_s": args.duration_s, "seed": args.seed, "cases": results,
          "workdir": str(workdir)})  # fmt: skip


if __name__ == "__main__":
    main()
