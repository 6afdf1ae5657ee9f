"""Model affinity: model switches per 1,000 jobs and the queue wait, affinity off vs on.

Two runs on one broker, each with fresh topics and its own agents (``sdagent run`` subprocesses on
the simulated backend, with a model switch that costs ``--switch-s`` against a generation of
``--steps`` x ``--step-s``): jobs over ``--models`` models with Zipf(``--zipf``) popularity are
offered at a fixed rate, the same sequence in both runs. Off: jobs keyed by job id (spread
evenly); on, partition mode: keyed by model over ``--lanes`` lanes, and each agent prefers held
jobs for its loaded model (sdagent/agent/affinity.py); on, ``--consumption share``: jobs sent to
their model's topic (``--model-topics``) while an agent holding the model is idle, else to the
shared jobs topic (sdagent/agent/model_lanes.py, sdagent/kafka/routing.py). A switch is a job whose answer reports ``switch_ms`` (the
first load on each agent counts too); the wait is the answer's ``queue_wait_ms`` (produce ->
start on the agent).

Usage: ``.venv/bin/python bench/affinity.py [--jobs 1000] [--agents 6] [--models 8] [--rate 4]
[--consumption share]``
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid
from pathlib import Path

from common import (
    ResultsReader,
    Services,
    agent_log_tail,
    emit,
    percentile,
    say,
    setup,
    stop_agents,
    summary,
    wait_answered,
    wait_for_beacons,
    wait_for_group,
)

from sdagent.client import Client
from sdagent.devstack.stack import ensure_topics, settings_from, spawn_agent, stack_config

BUCKET = "sdagent-bench-affinity"
JOBS_PARTITIONS = 12


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    # More agents than models, as in a fleet serving a handful of checkpoints; the agents sleep
    # through the simulated generations, so six fit on two cores at this rate.
    parser.add_argument("--agents", type=int, default=6)
    parser.add_argument("--rate", type=float, default=4.0, help="offered jobs per second")
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity exponent s")
    parser.add_argument("--lanes", type=int, default=1, help="keys per model with affinity on")
    parser.add_argument("--switch-s", type=float, default=0.5, help="simulated model switch")
    parser.add_argument("--step-s", type=float, default=0.025, help="simulated time per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--consumption", choices=("partition", "share"), default="partition")
    parser.add_argument("--model-topics", type=int, default=32, help="share mode, affinity on: model topics")
    return parser.parse_args()


def zipf_models(count: int, models: list[str], s: float, seed: int = 42) -> list[str]:
    weights = [1 / (rank**s) for rank in range(1, len(models) + 1)]
    return random.Random(seed).choices(models, weights=weights, k=count)


def run_mode(services: Services, args: argparse.Namespace, affinity: bool, sequence: list[str]) -> dict:
    label = "on" if affinity else "off"
    models = sorted(set(sequence))
    share = args.consumption == "share"
    topics: dict = {"jobs_key": "model" if affinity else "job_id"}
    topics |= {"model_topics": args.model_topics} if share and affinity else {"model_lanes": args.lanes}
    config = stack_config(
        services.bootstrap, services.s3_endpoint, BUCKET, topic_prefix=f"aff-{label}-{uuid.uuid4().hex[:6]}.",
        jobs_partitions=JOBS_PARTITIONS, topics=topics, consumption=args.consumption,
        backend={"models": models, "switch_latency_s": args.switch_s, "step_latency_s": args.step_s},
        metrics={"enabled": False},
    )  # fmt: skip
    settings = settings_from(config)
    ensure_topics(settings)
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-affinity-{label}-"))
    agents = []
    for index in range(args.agents):
        agent_config = {**config, "agent": {**config["agent"], "instance_id": f"affinity-{label}-{index}"}}
        agents.append(spawn_agent(agent_config, workdir, name=f"agent-{index}"))
    try:
        if share:  # every member reads every partition: ready once its loop runs (its beacon)
            wait_for_beacons(services.bootstrap, settings.topics.agents, args.agents, timeout_s=60)
        else:
            wait_for_group(services.bootstrap, settings.kafka.group_id, args.agents, JOBS_PARTITIONS, timeout_s=60,
                           topic=settings.topics.jobs)  # fmt: skip
        reader = ResultsReader(services.bootstrap, settings.topics.results)
        job_ids = offer(settings, sequence, args)
        if not wait_answered(reader, job_ids, agents, timeout_s=max(120.0, len(sequence) / args.rate * 3)):
            say(agent_log_tail(workdir, "agent-0"))
            raise SystemExit(f"[{label}] not every job was answered")
        events = [reader.completions[job_id].event for job_id in job_ids]
        reader.close()
    finally:
        stop_agents(agents)
    switches = sum("switch_ms" in event.timings_ms for event in events)
    waits = [event.timings_ms["queue_wait_ms"] for event in events if "queue_wait_ms" in event.timings_ms]
    per_agent: dict[str, int] = {}
    for event in events:
        per_agent[event.agent] = per_agent.get(event.agent, 0) + 1
    say(f"[{label}] {len(events)} jobs, {switches} switches ({switches * 1000 / len(events):.0f} per 1000 jobs)")
    say(f"[{label}] queue wait: {summary(waits)}")
    say(f"[{label}] jobs per agent: {dict(sorted(per_agent.items()))}")
    return {"switches_per_1000": switches * 1000 / len(events), "p99_wait_ms": percentile(waits, 99),
            "p50_wait_ms": percentile(waits, 50)}  # fmt: skip


def offer(settings, sequence: list[str], args: argparse.Namespace) -> set[str]:
    """Submit the jobs at the fixed rate (async); returns their ids."""
    job_ids: set[str] = set()
    started = time.monotonic()
    with Client(settings.kafka, settings.topics) as client:
        for index, model in enumerate(sequence):
            planned = started + index / args.rate
            time.sleep(max(0.0, planned - time.monotonic()))
            job = client.submit({"model": model, "prompt": "affinity", "width": 64, "height": 64, "steps": args.steps})
            job_ids.add(job.job_id)
    return job_ids


def main() -> None:
    args = parse_args()
    setup()
    models = [f"model-{rank:02d}.safetensors" for rank in range(1, args.models + 1)]
    sequence = zipf_models(args.jobs, models, args.zipf)
    top_share = sequence.count(models[0]) / len(sequence)
    say(f"{args.jobs} jobs over {args.models} models, Zipf s={args.zipf} (top model {top_share:.0%}), "
        f"{args.rate}/s offered to {args.agents} agents; switch {args.switch_s} s, "
        f"generation {args.steps} x {args.step_s} s")  # fmt: skip
    with Services(BUCKET) as services:
        off = run_mode(services, args, affinity=False, sequence=sequence)
        on = run_mode(services, args, affinity=True, sequence=sequence)
    reduction = off["switches_per_1000"] / max(on["switches_per_1000"], 1e-9)
    wait_ratio = on["p99_wait_ms"] / max(off["p99_wait_ms"], 1e-9)
    say(f"switches per 1000 jobs: off {off['switches_per_1000']:.0f}, on {on['switches_per_1000']:.0f}: "
        f"reduction x{reduction:.1f} (goal >= 3: {'met' if reduction >= 3 else 'NOT met'})")  # fmt: skip
    say(f"p99 queue wait: off {off['p99_wait_ms']:.0f} ms, on {on['p99_wait_ms']:.0f} ms: ratio {wait_ratio:.2f} "
        f"(goal <= 1.5: {'met' if wait_ratio <= 1.5 else 'NOT met'})")  # fmt: skip
    emit({
        "consumption": args.consumption, "model_topics": args.model_topics if args.consumption == "share" else None,
        "jobs": args.jobs, "agents": args.agents, "offered_per_s": args.rate, "models": args.models,
        "zipf_s": args.zipf, "lanes": args.lanes, "switch_s": args.switch_s,
        "switches_off": round(off["switches_per_1000"], 1), "switches_on": round(on["switches_per_1000"], 1),
        "switch_reduction": round(reduction, 2),
        "p99_wait_off_ms": round(off["p99_wait_ms"], 1), "p99_wait_on_ms": round(on["p99_wait_ms"], 1),
        "p50_wait_off_ms": round(off["p50_wait_ms"], 1), "p50_wait_on_ms": round(on["p50_wait_ms"], 1),
        "p99_wait_ratio": round(wait_ratio, 3),
    })  # fmt: skip


if __name__ == "__main__":
    main()
