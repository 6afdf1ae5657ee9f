"""What both benchmarks share: the local stack, benchmark jobs, a results reader, figures.

Everything runs on loopback: a real Kafka broker (``KafkaBroker``), moto's S3 server, and agents
on the zero-latency simulated backend. Each benchmark prints readable lines as it goes and one JSON
object of its figures as the last line of stdout (:func:`emit`).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

from sdagent.client import Client
from sdagent.devstack.kafka import KafkaBroker, broker_from_env
from sdagent.devstack.moto import MotoServer, aws_client
from sdagent.devstack.stack import local_aws_environment
from sdagent.jobs import Job, StatusEvent
from sdagent.kafka.records import STATUS_HEADER
from sdagent.logs import configure_logging

MODEL = "sd15.safetensors"  # the simulated backend's first model: loaded once, never switched
# One prompt and one seed for every job: the simulated backend's encode cache then hands back the
# same PNG bytes each time, so the backend costs ~0.1 ms and the benchmark measures the agent.
PROMPT = "a lighthouse at dusk, benchmark"
SEED = 42
AGENT_STOP_TIMEOUT_S = 30.0


def setup() -> None:
    """Warning-level logs on the console, dummy AWS credentials for moto (never real ones)."""
    configure_logging("console", "warning")
    for key, value in local_aws_environment().items():
        os.environ.setdefault(key, value)


def say(text: str) -> None:
    print(text, flush=True)


def emit(figures: dict[str, Any]) -> None:
    """The benchmark's figures, as the last line of stdout."""
    print(json.dumps(figures, sort_keys=True), flush=True)


# --- services ----------------------------------------------------------------------------------


class Services:
    """A Kafka broker and a moto S3 server on loopback, with one fresh bucket."""

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.broker = broker_from_env() or KafkaBroker()
        self.moto = MotoServer()

    def __enter__(self) -> Services:
        try:
            started = time.monotonic()
            self.broker.start()
            say(f"kafka up at {self.broker.bootstrap} ({time.monotonic() - started:.1f} s)")
            started = time.monotonic()
            self.moto.start()
            aws_client("s3", self.moto.endpoint).create_bucket(Bucket=self.bucket)
            say(f"moto S3 up at {self.moto.endpoint}, bucket {self.bucket} ({time.monotonic() - started:.1f} s)")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.moto.stop()
        self.broker.cleanup()

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    @property
    def s3_endpoint(self) -> str:
        return self.moto.endpoint


def use_log_append_time(bootstrap: str, topic: str) -> None:
    """Stamp records of ``topic`` with the broker's append time, not the producer's clock.

    The inter-completion intervals are then measured by the broker at the moment each answer
    became durable (millisecond resolution, Kafka's timestamp unit).
    """
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry("message.timestamp.type", "LogAppendTime", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    admin = AdminClient(admin_config(bootstrap))  # kept alive until the futures resolve
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)


def admin_config(bootstrap: str) -> dict[str, Any]:
    # Warnings and worse only: a short-lived admin client logs a notice to stderr as it is destroyed.
    return {"bootstrap.servers": bootstrap, "log_level": 4}


def create_plain_topics(bootstrap: str, partitions: dict[str, int]) -> None:
    admin = AdminClient(admin_config(bootstrap))
    topics = [NewTopic(name, num_partitions=count, replication_factor=1) for name, count in partitions.items()]
    for future in admin.create_topics(topics, request_timeout=30).values():
        future.result(timeout=30)


# --- jobs --------------------------------------------------------------------------------------


def bench_job(job_id: str | None = None, **fields: Any) -> Job:
    """A 512x512 PNG txt2img job that every run renders to the same bytes (see ``SEED``)."""
    values: dict[str, Any] = {
        "model": MODEL,
        "prompt": PROMPT,
        "seed": SEED,
        "steps": 20,
        "width": 512,
        "height": 512,
        "output": {"format": "png"},
        "submitted_at": datetime.now(UTC),
        **fields,
    }
    if job_id is not None:
        values["job_id"] = job_id
    return Job.model_validate(values)


def preload_jobs(bootstrap: str, topic: str, job_ids: Iterable[str]) -> int:
    """Queue one benchmark job per id, keyed by job id as the Client does; returns the count."""
    # Batched (linger) and acks=all: this is loading a backlog, not part of what is measured.
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 20})
    failures: list[Any] = []
    count = 0
    for job_id in job_ids:
        job = bench_job(job_id)
        producer.produce(
            topic,
            key=job_id.encode(),
            value=job.to_bytes(),
            on_delivery=lambda err, _msg: err is not None and failures.append(err),
        )
        producer.poll(0)
        count += 1
    remaining = producer.flush(60)
    if remaining or failures:
        raise RuntimeError(f"preloading {topic}: {remaining} undelivered, errors {failures[:3]}")
    return count


# --- agents ------------------------------------------------------------------------------------


def stop_agents(processes: Sequence[subprocess.Popen]) -> list[int | None]:
    """SIGTERM each agent we started (they drain and leave the group), SIGKILL stragglers."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(AGENT_STOP_TIMEOUT_S))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait())
    return codes


def warm_up(client: Client, agents: int) -> None:
    """Until each of ``agents`` running agents has answered a job: joined and warm (not measured)."""
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    with concurrent.futures.ThreadPoolExecutor(agents) as pool:
        while len(seen) < agents and time.monotonic() < deadline:
            jobs = [bench_job(steps=50, width=64, height=64) for _ in range(agents)]
            seen.update(
                answer.agent for answer in pool.map(lambda job: client.run(job, timeout_s=60), jobs) if answer.agent
            )
    time.sleep(2)


def agent_log_tail(workdir: Path, name: str, lines: int = 20) -> str:
    path = workdir / f"{name}.log"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def group_assignment(bootstrap: str, group_id: str, topic: str) -> dict[str, int]:
    """Partitions of ``topic`` held per member (client id -> count) of a consumer group, as the
    broker sees it (the agents also hold the priority lane's)."""
    admin = AdminClient(admin_config(bootstrap))
    future = admin.describe_consumer_groups([group_id], request_timeout=10)[group_id]
    description = future.result(timeout=15)
    return {
        member.client_id: sum(tp.topic == topic for tp in member.assignment.topic_partitions)
        if member.assignment
        else 0
        for member in description.members
    }


def wait_for_beacons(bootstrap: str, topic: str, agents: int, timeout_s: float) -> set[str]:
    """Wait until ``agents`` agents have published a beacon on the agents topic (their loops run)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"beacons-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    consumer.subscribe([topic])
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < agents and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None and message.value() is not None:
                seen.add((message.key() or b"").decode())
    finally:
        consumer.close()
    if len(seen) < agents:
        raise TimeoutError(f"{len(seen)} of {agents} agents published a beacon within {timeout_s} s")
    return seen


def wait_for_group(
    bootstrap: str, group_id: str, members: int, partitions: int, timeout_s: float, topic: str
) -> dict[str, int]:
    """Wait until ``members`` members hold all ``partitions`` of ``topic``, each at least one."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            seen = group_assignment(bootstrap, group_id, topic)
        except Exception:  # the group may not exist yet while the first member joins
            seen = {}
        if len(seen) == members and sum(seen.values()) == partitions and min(seen.values()) > 0:
            return seen
        time.sleep(0.5)
    raise TimeoutError(f"group {group_id} not settled within {timeout_s} s: {seen}")


# --- results -----------------------------------------------------------------------------------


@dataclass
class Completion:
    """One terminal event as read back from a results topic."""

    job_id: str
    status: str
    broker_ms: int  # the record's timestamp (LogAppendTime on the benchmarks' results topics)
    event: StatusEvent | None = None


@dataclass
class ResultsReader:
    """Reads a whole results topic from its beginning on a thread and keeps the terminal events.

    A plain consumer with assigned partitions (no group): it never affects the agents' group.
    Only records whose status header is terminal are decoded, to keep this reader cheap while
    it shares the machine with what it measures.
    """

    bootstrap: str
    topic: str
    decode: bool = True  # parse the StatusEvent (agent results); raw results carry no schema
    completions: dict[str, Completion] = field(default_factory=dict)
    # job id -> the agent's time (epoch ms) of its first event, ``accepted`` or (a job that starts at
    # once says no ``accepted``) ``started``: when the job left the intake
    taken_ms: dict[str, float] = field(default_factory=dict)
    records: int = 0

    def __post_init__(self) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
            }
        )
        metadata = self._consumer.list_topics(self.topic, timeout=10)
        partitions = metadata.topics[self.topic].partitions
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-results", daemon=True)
        self._thread.start()

    def wait_count(self, count: int, timeout_s: float) -> bool:
        """Block until at least ``count`` terminal events were read; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self.completions) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(0.5, remaining))
            return True

    def answered(self, job_ids: set[str]) -> int:
        with self._lock:
            return sum(1 for job_id in job_ids if job_id in self.completions)

    def wait_for(self, job_ids: set[str], timeout_s: float) -> bool:
        """Block until every id in ``job_ids`` has a terminal event; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while sum(1 for job_id in job_ids if job_id in self.completions) < len(job_ids):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(0.5, remaining))
            return True

    def close(self) -> None:
        """Stop reading; safe to call more than once."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            completion = self._completion(message)
            with self._changed:
                self.records += 1
                if completion is not None:
                    self.completions.setdefault(completion.job_id, completion)
                    self._changed.notify_all()

    def _completion(self, message) -> Completion | None:
        _type, broker_ms = message.timestamp()
        if not self.decode:
            return Completion(message.key().decode(), "succeeded", broker_ms)
        status = dict(message.headers() or ()).get(STATUS_HEADER, b"").decode()
        if status in ("accepted", "started"):
            event = StatusEvent.from_bytes(message.value())
            self.taken_ms.setdefault(event.job_id, event.at.timestamp() * 1000)
            return None
        if status in ("progress", "released", ""):
            return None
        event = StatusEvent.from_bytes(message.value())
        return Completion(event.job_id, event.status.value, broker_ms, event)


# --- CPU ---------------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds spent by this process and each kind of process it started, between marks.

    On a 2-core machine the broker, moto, the agents and this script all compete: the split shows
    who spends the CPU per job and whether the machine was saturated.
    """

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._start: dict[str, float] = {}
        self._started_at = 0.0

    def mark(self) -> None:
        self._start, self._started_at = self._sample(), time.monotonic()

    def since_mark(self) -> tuple[dict[str, float], float]:
        """(CPU seconds per role since :meth:`mark`, wall seconds since it)."""
        now = self._sample()
        used = {role: now[role] - self._start.get(role, 0.0) for role in now}
        return used, time.monotonic() - self._started_at

    def _sample(self) -> dict[str, float]:
        roles = {"bench": _cpu_seconds(self._me)}
        for child in self._me.children(recursive=True):
            try:
                command = " ".join(child.cmdline())
                seconds = _cpu_seconds(child)
            except psutil.Error:  # exited between listing and reading
                continue
            role = ("broker" if "kafka.Kafka" in command else "moto" if "moto_server" in command
                    else "gateway" if " gateway " in command else "load" if "--worker" in command else "agents")  # fmt: skip
            roles[role] = roles.get(role, 0.0) + seconds
        return roles


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def cpu_line(used: dict[str, float], wall_s: float, jobs: int) -> str:
    """``role X ms/job`` for each role, and the machine's busy share over the interval."""
    parts = ", ".join(f"{role} {seconds * 1000 / max(jobs, 1):.1f}" for role, seconds in sorted(used.items()))
    busy = sum(used.values()) / wall_s / (psutil.cpu_count() or 1)
    return f"CPU ms per job: {parts}; machine busy {busy:.0%} of {psutil.cpu_count()} cores over {wall_s:.1f} s"


# --- figures -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100): a value that was actually measured."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: Sequence[float]) -> str:
    if not values:
        return "(none)"
    mean = sum(values) / len(values)
    return (
        f"p50 {percentile(values, 50):.2f}  p90 {percentile(values, 90):.2f}  p99 {percentile(values, 99):.2f}  "
        f"max {max(values):.2f}  mean {mean:.2f} ms (n={len(values)})"
    )


def intervals(times_ms: Sequence[float]) -> list[float]:
    """Gaps between consecutive completion times (sorted first)."""
    ordered = sorted(times_ms)
    return [later - earlier for earlier, later in zip(ordered, ordered[1:])]


def python_label() -> str:
    return f"python {sys.version.split()[0]}"


def wait_answered(
    reader: ResultsReader, job_ids: set[str], processes: Sequence[subprocess.Popen], timeout_s: float
) -> bool:
    """Wait until every job is answered (True) or ``timeout_s`` passed (False), reporting every
    few seconds; raises if an agent we started died meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not reader.wait_for(job_ids, min(5.0, max(0.0, deadline - time.monotonic()))):
        done = reader.answered(job_ids)
        dead = [p.pid for p in processes if p.poll() is not None]
        if dead:
            raise RuntimeError(f"agent process(es) {dead} exited with {done}/{len(job_ids)} jobs answered")
        if time.monotonic() >= deadline:
            say(f"  ... {done}/{len(job_ids)} answered when the time limit ran out")
            return False
        say(f"  ... {done}/{len(job_ids)} answered")
    return True
