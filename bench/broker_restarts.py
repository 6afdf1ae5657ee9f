"""Broker restarts under load, many times over, looking for a crash of librdkafka in the agents.

Three agents (`sdagent run` subprocesses, core dumps on, Python's faulthandler on) run jobs on the
simulated backend while a client keeps submitting; the broker is restarted every cycle (a clean
stop, or a SIGKILL every third cycle). After each cycle it checks every agent: one that died is
recorded with its exit status (-11 is SIGSEGV), its log tail and core file, and started again, as
systemd's Restart=on-failure would. At the end every submitted job must have exactly one terminal
answer: a crash may cost time, never a job.

Usage: ``.venv/bin/python bench/broker_restarts.py [--cycles 30] [--agents 3] [--rate 20]``
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import Services, agent_log_tail, bench_job, emit, say, setup
from confluent_kafka import Consumer, TopicPartition

from sdagent.client import Client
from sdagent.devstack.stack import ensure_topics, settings_from, spawn_agent, stack_config
from sdagent.jobs import StatusEvent


def enable_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--rate", type=float, default=20.0, help="jobs submitted per second")
    parser.add_argument("--cycle-s", type=float, default=8.0, help="load between two restarts")
    args = parser.parse_args()
    setup()
    enable_core_dumps()  # inherited by the agents
    workdir = Path(tempfile.mkdtemp(prefix="sdagent-restarts-"))
    os.chdir(workdir)  # core files land in the crashed agent's working directory (core_pattern "core")
    with Services(bucket="restarts") as services:
        config = stack_config(services.broker.bootstrap, services.moto.endpoint, "restarts", topic_prefix="restarts.",
                              jobs_partitions=6, backend={"step_latency_s": 0.01})  # fmt: skip
        settings = settings_from(config)
        ensure_topics(settings)

        def start_agent(name: str) -> subprocess.Popen:
            agent_config = config | {"agent": {**config["agent"], "instance_id": name}}
            return spawn_agent(agent_config, workdir, name, {"PYTHONFAULTHANDLER": "1"})

        agents = {name: start_agent(name) for name in (f"agent-{i}" for i in range(args.agents))}
        submitted: list[str] = []
        stop = threading.Event()

        def submit_forever() -> None:
            with Client(settings.kafka, settings.topics) as client:
                while not stop.is_set():
                    try:
                        submitted.append(client.submit(bench_job(steps=2, width=64, height=64)).job_id)
                    except Exception as exc:  # the broker is restarting: try again
                        say(f"submit failed while the broker restarts: {type(exc).__name__}")
                        time.sleep(0.5)
                    time.sleep(1 / args.rate)

        submitter = threading.Thread(target=submit_forever, daemon=True)
        submitter.start()
        crashes: list[dict] = []
        for cycle in range(args.cycles):
            time.sleep(args.cycle_s)
            hard = cycle % 3 == 2
            if hard:
                services.broker.kill()
                services.broker.start()
            else:
                services.broker.restart()
            for name, process in agents.items():
                code = process.poll()
                if code is None:
                    continue
                core = sorted(str(p) for p in Path(workdir).glob("core*"))
                crashes.append({"cycle": cycle, "agent": name, "exit": code, "cores": core})
                say(f"cycle {cycle}: {name} exited {code}; log tail:\n{agent_log_tail(workdir, name, 30)}")
                agents[name] = start_agent(name)  # as systemd's Restart=on-failure would
            say(f"cycle {cycle + 1}/{args.cycles}: broker {'killed' if hard else 'restarted'}, "
                f"{len(submitted)} jobs submitted, {len(crashes)} agent exits")  # fmt: skip
        stop.set()
        submitter.join(10)
        seen: dict[str, list[str]] = {}
        answers = count_answers(settings, set(submitted), timeout_s=180, seen=seen)
        for process in agents.values():
            process.send_signal(signal.SIGTERM)
        for process in agents.values():
            process.wait(120)
    lost = sorted(job_id for job_id in submitted if answers.get(job_id, 0) == 0)
    twice = sorted(job_id for job_id, count in answers.items() if count > 1)
    segfaults = [crash for crash in crashes if crash["exit"] == -signal.SIGSEGV]
    for job_id in twice[:5]:
        say(f"answered twice: {job_id}: " + "; ".join(seen[job_id]))
    say(f"{args.cycles} restarts, {len(submitted)} jobs: {len(lost)} lost, {len(twice)} answered twice, "
        f"{len(crashes)} agent exits ({len(segfaults)} SIGSEGV); logs in {workdir}")  # fmt: skip
    emit({"cycles": args.cycles, "agents": args.agents, "jobs": len(submitted), "lost": len(lost),
          "answered_twice": len(twice), "agent_exits": len(crashes), "segfaults": len(segfaults),
          "crashes": crashes, "librdkafka": librdkafka_version(), "workdir": str(workdir)})  # fmt: skip


def count_answers(
    settings, wanted: set[str], timeout_s: float, seen: dict[str, list[str]] | None = None
) -> dict[str, int]:
    """Terminal answers per job id on the results topic, read until every wanted job has one;
    ``seen`` collects a line per terminal answer (agent, status, attempt, where) per job id."""
    consumer = Consumer({"bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": "restarts-reader",
                         "enable.auto.commit": False})  # fmt: skip
    topic = settings.topics.results
    metadata = consumer.list_topics(topic, timeout=10)
    consumer.assign([TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions])
    answers: dict[str, int] = {}
    deadline = time.monotonic() + timeout_s
    idle_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                if wanted <= answers.keys() and time.monotonic() - idle_since > 5:
                    break
                continue
            idle_since = time.monotonic()
            event = StatusEvent.from_bytes(message.value())
            if event.status.is_terminal:
                answers[event.job_id] = answers.get(event.job_id, 0) + 1
                if seen is not None:
                    seen.setdefault(event.job_id, []).append(
                        f"{event.status.value} by {event.agent} attempt {event.attempt} reason {event.reason} "
                        f"at {message.partition()}@{message.offset()} ts {message.timestamp()[1]}"
                    )
    finally:
        consumer.close()
    return answers


def librdkafka_version() -> str:
    import confluent_kafka

    return f"confluent-kafka {confluent_kafka.version()[0]}, librdkafka {confluent_kafka.libversion()[0]}"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    main()
