"""Release hand-off: how soon a job released by a draining agent starts on another agent.

Two `sdagent run` agents, A and B, on the simulated backend. A job of ~10 s starts on one of
them; the bench sends that agent SIGTERM with a drain budget shorter than the job, so it
releases the job (queues it again, answers ``released``) and leaves; the other, already running
and idle, takes it. Measured from the draining agent's ``job.released`` log line (written before
the job is queued again) to the ``started`` event of the other agent (same machine clock),
several rounds per intake mode, a fresh victim each round. CPU figures, no GPU.

Usage: ``.venv/bin/python bench/release_handoff.py [--rounds 5]``
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

from common import Services, bench_job, emit, say, setup, stop_agents, warm_up
from confluent_kafka import Consumer, TopicPartition

from sdagent.client import Client
from sdagent.devstack.stack import ensure_topics, settings_from, spawn_agent, stack_config
from sdagent.jobs import Status, StatusEvent

STEP_S = 0.1
JOB_STEPS = 100  # ~10 s (within the default max_steps, 150)


def events_of(settings, job_id: str, timeout_s: float, until=lambda events: any(e.status.is_terminal for e in events)):
    """The job's events, read from the start of the results topic until ``until`` holds (by
    default: a terminal one came) or ``timeout_s`` passes."""
    consumer = Consumer({"bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": "handoff-reader",
                         "enable.auto.commit": False})  # fmt: skip
    topic = settings.topics.results
    metadata = consumer.list_topics(topic, timeout=10)
    consumer.assign([TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions])
    found: list[StatusEvent] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not until(found):
            message = consumer.poll(0.2)
            if message is not None and message.error() is None and message.key() == job_id.encode():
                found.append(StatusEvent.from_bytes(message.value()))
    finally:
        consumer.close()
    return found


def wait_started(settings, job_id: str, timeout_s: float = 60) -> StatusEvent | None:
    events = events_of(settings, job_id, timeout_s, until=lambda found: any(e.status is Status.STARTED for e in found))
    return next((e for e in events if e.status is Status.STARTED), None)


def released_logged(workdir: Path, agent: str, job_id: str) -> float | None:
    """When ``agent`` logged that it gave ``job_id`` up (epoch seconds), from its JSON log."""
    for line in (workdir / f"{agent}.log").read_text(errors="replace").splitlines():
        if '"job.released"' in line and job_id in line:
            record = json.loads(line)
            return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
    return None


def run_mode(consumption: str, rounds: int, services: Services, workdir: Path) -> dict:
    config = stack_config(services.bootstrap, services.s3_endpoint, services.bucket, topic_prefix=f"h{consumption}.",
                          jobs_partitions=2, consumption=consumption, backend={"step_latency_s": STEP_S},
                          agent={"drain_timeout_s": 2.0, "drain_margin_s": 1.0})  # fmt: skip
    settings = settings_from(config)
    ensure_topics(settings)

    def spawn(name: str):
        return spawn_agent(config | {"agent": {**config["agent"], "instance_id": name}}, workdir, name)

    agents = {name: spawn(name) for name in ("a-0", "b-0")}
    handoffs, lost, twice = [], 0, 0
    try:
        with Client(settings.kafka, settings.topics) as client:
            warm_up(client, len(agents))
            for round_ in range(rounds):
                job = client.submit(bench_job(f"{consumption}-handoff-{round_}", steps=JOB_STEPS, width=64, height=64))
                first = wait_started(settings, job.job_id)
                if first is None or first.agent not in agents:
                    say(f"[{consumption}] round {round_}: job never started")
                    continue
                time.sleep(1.0)
                victim = agents.pop(first.agent)
                victim.send_signal(signal.SIGTERM)
                events = events_of(settings, job.job_id, timeout_s=120)
                released = [e for e in events if e.status is Status.RELEASED]
                restarted = [e for e in events if e.status is Status.STARTED and e.agent != first.agent]
                terminal = [e for e in events if e.status.is_terminal]
                lost += not terminal
                twice += len(terminal) > 1
                released_at = released_logged(workdir, first.agent, job.job_id)
                if released and restarted and released_at is not None:
                    handoff = restarted[0].at.timestamp() - released_at
                    handoffs.append(handoff)
                    say(f"[{consumption}] round {round_}: released by {first.agent}, started on "
                        f"{restarted[0].agent} {handoff:.2f} s later")  # fmt: skip
                victim.wait(60)
                replacement = f"{first.agent[0]}-{round_ + 1}"
                agents[replacement] = spawn(replacement)
                warm_up(client, len(agents))
    finally:
        stop_agents(list(agents.values()))
    return {
        "consumption": consumption, "rounds": rounds, "measured": len(handoffs), "lost": lost, "answered_twice": twice,
        "handoff_p50_s": round(statistics.median(handoffs), 3) if handoffs else None,
        "handoff_max_s": round(max(handoffs), 3) if handoffs else None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    setup()
    workdir = Path(tempfile.mkdtemp(prefix="sdagent-handoff-"))
    with Services(bucket="handoff") as services:
        results = [run_mode(mode, args.rounds, services, workdir) for mode in ("partition", "share")]
    for result in results:
        say(f"{result['consumption']}: released -> started elsewhere p50 {result['handoff_p50_s']} s, "
            f"max {result['handoff_max_s']} s over {result['measured']} rounds; lost {result['lost']}, "
            f"answered twice {result['answered_twice']}")  # fmt: skip
    emit({"modes": results, "workdir": str(workdir)})


if __name__ == "__main__":
    main()
