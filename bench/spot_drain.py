"""Spot drain: from an IMDS interruption notice to every job released or done, and nothing lost.

On the real broker (and moto's S3), agent A runs as ``sdagent run`` with its IMDS pointed at a
FakeImds on loopback and the simulated backend slowed to STEP_LATENCY_S per step, so a job takes
~10 s. A backlog of jobs is queued first: A holds every jobs partition, reads them all ahead
(``agent.read_ahead`` 64) and runs one. A few seconds into that job the bench posts a spot
``terminate`` notice in the fake IMDS; A's notice watcher polls every ``imds.interval_s`` = 1 s,
so up to 1 s of each stop figure is the poll interval.

Two scenarios, each on its own topics and consumer group:

- ``window_120s``: the real two-minute warning. The running job's estimate fits before the
  deadline minus ``agent.drain_margin_s`` (15 s), so A lets it finish, then leaves; the jobs it
  read ahead were never committed and go to the next owner of the partitions.
- ``window_8s``: a short window. The running job cannot finish in time: A must release it
  (requeue + ``released`` answer) and leave at once.

Measured from the moment the notice is set in the fake IMDS, on A's JSON log timestamps (same
machine, same clock): ``seen_s`` (``notice.received``), ``stop_s`` (``intake.held`` with reason
draining: no job starts on A after it), ``release_s`` (``intake.closed``: offsets committed, group
left, every job released or done). Then agent B (a subprocess, fast backend) takes the partitions
and the bench checks every job on the results topic: ``lost`` = no ``succeeded`` answer within
B_ANSWER_LIMIT_S, ``duplicated`` = more than one terminal answer.

The top-level ``stop_s`` / ``release_s`` are the short-window (released) case; both scenarios are
in ``scenarios``. Usage: ``.venv/bin/python bench/spot_drain.py [--jobs 6]``. Loopback only; runs
in about a minute and a half.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common import Services, agent_log_tail, bench_job, emit, say, setup, stop_agents
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from sdagent.devstack.fake_imds import FakeImds
from sdagent.devstack.stack import ensure_topics, settings_from, spawn_agent, stack_config
from sdagent.jobs import Status, StatusEvent
from sdagent.kafka.records import STATUS_HEADER

BUCKET = "sdagent-bench-spot"
JOBS_PARTITIONS = 4
STEPS = 20
STEP_LATENCY_S = 0.5  # 20 steps x 0.5 s: a job takes ~10 s on agent A
B_STEP_LATENCY_S = 0.01  # the rest of the fleet: leftovers are done in well under a second each
IMDS_INTERVAL_S = 1.0
RUN_BEFORE_NOTICE_S = 3.0  # the notice comes this far into A's running job (~30% done)
GOAL_RELEASE_S = 5.0
# Bounds that keep the whole benchmark under ~3 minutes whatever happens.
A_START_LIMIT_S = 60.0  # interpreter, group join, first job started
A_EXIT_LIMIT_S = 40.0  # after the notice; the 120 s case finishes its ~7 s of job and leaves
B_ANSWER_LIMIT_S = 60.0  # after B is spawned: every job must have succeeded by then
DUPLICATE_GRACE_S = 3.0  # after the last answer, wait this long for a second (duplicate) answer
READ_BACK_LIMIT_S = 15.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6, help="jobs per scenario (one runs, the rest wait on A)")
    parser.add_argument("--short-window", type=float, default=8.0, help="seconds of the short-window scenario")
    parser.add_argument("--keep-logs", action="store_true", help="keep the agents' logs and configs (path printed)")
    args = parser.parse_args()
    setup()

    say(
        f"spot drain benchmark: {args.jobs} jobs per scenario, {STEPS} steps x {STEP_LATENCY_S:g} s "
        f"(~{STEPS * STEP_LATENCY_S:g} s per job) on agent A, IMDS polled every {IMDS_INTERVAL_S:g} s, "
        f"{JOBS_PARTITIONS} jobs partitions"
    )
    scenarios: dict[str, dict[str, Any]] = {}
    with Services(BUCKET) as services, workdir_for(args.keep_logs) as workdir:
        for label, window_s in (("window_120s", 120.0), (f"window_{args.short_window:g}s", args.short_window)):
            scenarios[label] = run_scenario(services, Path(workdir), label, window_s, args.jobs)

    released_case = scenarios[f"window_{args.short_window:g}s"]
    lost = sum(s["lost"] for s in scenarios.values())
    duplicated = sum(s["duplicated"] for s in scenarios.values())
    say("")
    for label, s in scenarios.items():
        say(
            f"{label}: seen {fmt(s['seen_s'])} s, intake stopped {fmt(s['stop_s'])} s, consumer closed "
            f"{fmt(s['release_s'])} s after the notice; running job {s['running_job_outcome']}; "
            f"lost {s['lost']}, duplicated {s['duplicated']} of {s['jobs']}"
        )
    release_s = released_case["release_s"]
    say(
        f"release_s (released case) {fmt(release_s)} s (goal < {GOAL_RELEASE_S:g}: "
        f"{'met' if release_s is not None and release_s < GOAL_RELEASE_S else 'NOT met'}); "
        f"lost {lost} (goal 0: {'met' if lost == 0 else 'NOT met'}), "
        f"duplicated {duplicated} (goal 0: {'met' if duplicated == 0 else 'NOT met'})"
    )
    emit(
        {
            "stop_s": released_case["stop_s"],
            "release_s": release_s,
            "lost": lost,
            "duplicated": duplicated,
            "jobs": sum(s["jobs"] for s in scenarios.values()),
            "imds_interval_s": IMDS_INTERVAL_S,
            "job_s": STEPS * STEP_LATENCY_S,
            "figures_from": "agent A's JSON log timestamps minus the wall time the notice was set in the fake IMDS",
            "stop_event": "intake.held reason=draining",
            "release_event": "intake.closed",
            "release_s_scenario": f"window_{args.short_window:g}s",
            "scenarios": scenarios,
        }
    )


@contextlib.contextmanager
def workdir_for(keep: bool):
    if not keep:
        with tempfile.TemporaryDirectory(prefix="sdagent-spot-") as workdir:
            yield workdir
        return
    workdir = tempfile.mkdtemp(prefix="sdagent-spot-")
    say(f"agents' logs kept in {workdir}")
    yield workdir


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# --- one scenario ------------------------------------------------------------------------------


def run_scenario(services: Services, workdir: Path, label: str, window_s: float, jobs: int) -> dict[str, Any]:
    say(f"\n[{label}] spot terminate notice with a {window_s:g} s window")
    tag = label.replace("_", "-")
    instance_id = f"i-0spot{uuid.uuid4().hex[:8]}"
    config = stack_config(
        services.bootstrap,
        services.s3_endpoint,
        BUCKET,
        topic_prefix=f"spot-{tag}.",
        jobs_partitions=JOBS_PARTITIONS,
        kafka={"group_id": f"sdagent-spot-{tag}"},
        backend={"step_latency_s": STEP_LATENCY_S},
        imds={"enabled": True, "interval_s": IMDS_INTERVAL_S},
        logging={"format": "json", "level": "info"},
    )
    del config["agent"]["instance_id"]  # A takes its id from the (fake) IMDS, as on EC2
    settings = settings_from(config)
    ensure_topics(settings)
    job_ids = [f"{tag}-{index:02d}" for index in range(jobs)]
    partitions = submit_jobs(services.bootstrap, settings.topics.jobs, job_ids)
    spread = Counter(partitions.values())
    say(
        f"[{label}] queued {len(job_ids)} jobs on {settings.topics.jobs}, per partition "
        f"{dict(sorted(spread.items()))}; starting agent A ({instance_id}) with IMDS at the fake"
    )

    events = EventLog(services.bootstrap, settings.topics.results)
    imds = FakeImds().start()
    imds.identity(instance_id, "g5.xlarge", "us-east-1")
    a_name, b_name = f"{tag}-a", f"{tag}-b"
    processes: list[subprocess.Popen] = []
    try:
        agent_a = spawn_agent(config, workdir, a_name, env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.endpoint})
        processes.append(agent_a)
        spawned = time.monotonic()
        running = events.wait_first(lambda e: e.status is Status.STARTED and e.agent == instance_id, A_START_LIMIT_S)
        if running is None:
            raise RuntimeError(f"agent A started no job within {A_START_LIMIT_S:g} s")
        say(
            f"[{label}] A started {running.job_id} {time.monotonic() - spawned:.1f} s after spawn; "
            f"the other {len(job_ids) - 1} wait on A (read ahead)"
        )
        time.sleep(RUN_BEFORE_NOTICE_S)

        # The notice: IMDS states whole seconds, so the deadline is rounded up (window >= asked).
        now = datetime.now(UTC)
        deadline = now + timedelta(seconds=window_s)
        deadline = deadline.replace(microsecond=0) + timedelta(seconds=1 if deadline.microsecond else 0)
        imds.spot("terminate", deadline)
        noticed_wall = time.time()
        noticed = time.monotonic()
        effective_window_s = deadline.timestamp() - noticed_wall
        say(f"[{label}] notice set in IMDS: terminate at {deadline.isoformat()} ({effective_window_s:.1f} s from now)")
        try:
            a_code = agent_a.wait(A_EXIT_LIMIT_S)
        except subprocess.TimeoutExpired:
            say(agent_log_tail(workdir, a_name))
            raise RuntimeError(f"agent A did not leave within {A_EXIT_LIMIT_S:g} s of the notice") from None
        a_exit_s = time.monotonic() - noticed
        drain = drain_timeline(workdir / f"{a_name}.log", noticed_wall)
        say(
            f"[{label}] A exited with {a_code} {a_exit_s:.2f} s after the notice; from its log: "
            + ", ".join(
                f"{name} {fmt(drain[name])} s"
                for name in (
                    "seen_s",
                    "stop_requested_s",
                    "draining_s",
                    "stop_s",
                    "released_s",
                    "release_s",
                    "stopped_s",
                )
            )
        )

        config_b = copy.deepcopy(config)
        config_b["agent"]["instance_id"] = f"agent-b-{tag}"
        config_b["backend"]["step_latency_s"] = B_STEP_LATENCY_S
        config_b["imds"] = {"enabled": False}
        agent_b = spawn_agent(config_b, workdir, b_name)
        processes.append(agent_b)
        b_spawned = time.monotonic()
        complete = events.wait_all_succeeded(set(job_ids), B_ANSWER_LIMIT_S, processes=[agent_b])
        b_done_s = time.monotonic() - b_spawned
        say(f"[{label}] agent B spawned; every job succeeded: {complete} ({b_done_s:.1f} s after spawn)")
        time.sleep(DUPLICATE_GRACE_S)  # room for a late second answer to show up
    except Exception:
        for name in (a_name, b_name):
            say(f"--- {name}.log (tail)\n{agent_log_tail(workdir, name)}")
        raise
    finally:
        codes = stop_agents(processes)
        events.close()
        imds.stop()

    answers = read_results(services.bootstrap, settings.topics.results)
    requeued = count_records(services.bootstrap, settings.topics.jobs) - len(job_ids)
    return summarize(
        label,
        window_s,
        effective_window_s,
        job_ids,
        answers,
        instance_id,
        running.job_id,
        drain,
        a_code,
        a_exit_s,
        codes,
        requeued,
    )


def summarize(
    label,
    window_s,
    effective_window_s,
    job_ids,
    answers,
    instance_id,
    running_id,
    drain,
    a_code,
    a_exit_s,
    codes,
    requeued,
) -> dict[str, Any]:
    terminal = {job_id: [e for e in answers.get(job_id, []) if e.status.is_terminal] for job_id in job_ids}
    lost = sorted(job_id for job_id, evs in terminal.items() if not any(e.status is Status.SUCCEEDED for e in evs))
    duplicated = sorted(job_id for job_id, evs in terminal.items() if len(evs) > 1)
    stray = sorted(set(answers) - set(job_ids))
    running_events = answers.get(running_id, [])
    released_by_a = [e for e in running_events if e.status is Status.RELEASED and e.agent == instance_id]
    done_by_a = [e for e in running_events if e.status is Status.SUCCEEDED and e.agent == instance_id]
    if released_by_a:
        outcome = f"released ({released_by_a[0].reason}) and redone by B"
    elif done_by_a:
        outcome = "finished on A"
    else:
        outcome = "neither finished nor released by A"
    answered_by = Counter(
        "A" if e.agent == instance_id else "B" for evs in terminal.values() for e in evs if e.status is Status.SUCCEEDED
    )
    started_on_a = sorted(
        {e.job_id for evs in answers.values() for e in evs if e.status is Status.STARTED and e.agent == instance_id}
    )
    say(
        f"[{label}] running job {running_id}: {outcome}; jobs started on A: {started_on_a}; "
        f"succeeded by A {answered_by.get('A', 0)}, by B {answered_by.get('B', 0)}; requeued records {requeued}"
    )
    say(
        f"[{label}] lost {len(lost)} {lost or ''}, duplicated {len(duplicated)} {duplicated or ''}"
        + (f"; answers for unknown jobs {stray}" if stray else "")
    )
    for job_id in duplicated:
        say(
            f"[{label}]   {job_id}: "
            + ", ".join(f"{e.status.value} by {e.agent} (attempt {e.attempt})" for e in terminal[job_id])
        )
    return {
        "window_s": window_s,
        "effective_window_s": round(effective_window_s, 2),
        "jobs": len(job_ids),
        "running_job": running_id,
        "running_job_outcome": outcome,
        "started_on_a": len(started_on_a),
        "succeeded_by_a": answered_by.get("A", 0),
        "succeeded_by_b": answered_by.get("B", 0),
        "requeued_records": requeued,
        **{
            name: drain[name]
            for name in ("seen_s", "stop_requested_s", "draining_s", "stop_s", "released_s", "release_s", "stopped_s")
        },
        "drain_budget_s": drain["budget_s"],
        "a_exit_s": round(a_exit_s, 3),
        "a_exit_code": a_code,
        "b_exit_code": codes[1] if len(codes) > 1 else None,
        "lost": len(lost),
        "lost_jobs": lost,
        "duplicated": len(duplicated),
        "duplicated_jobs": duplicated,
    }


# --- jobs and the results topic ----------------------------------------------------------------


def submit_jobs(bootstrap: str, topic: str, job_ids: list[str]) -> dict[str, int]:
    """Queue one job per id, keyed by id as the Client does; returns the partition of each."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    partitions: dict[str, int] = {}
    failures: list[Any] = []

    def delivered(err, msg) -> None:
        if err is not None:
            failures.append(err)
        else:
            partitions[msg.key().decode()] = msg.partition()

    for job_id in job_ids:
        job = bench_job(job_id, steps=STEPS)
        producer.produce(topic, key=job_id.encode(), value=job.to_bytes(), on_delivery=delivered)
    remaining = producer.flush(30)
    if remaining or failures or len(partitions) != len(job_ids):
        raise RuntimeError(f"queueing jobs on {topic}: {remaining} undelivered, errors {failures[:3]}")
    return partitions


class EventLog:
    """Every status event of a results topic (progress left out), read from its start on a thread."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = assigned_reader(bootstrap, topic)
        self.events: list[StatusEvent] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            event = decode(message)
            if event is not None:
                with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()

    def wait_first(self, match, timeout_s: float) -> StatusEvent | None:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = next((e for e in self.events if match(e)), None)
                remaining = deadline - time.monotonic()
                if found is not None or remaining <= 0:
                    return found
                self._changed.wait(min(0.5, remaining))

    def wait_all_succeeded(self, job_ids: set[str], timeout_s: float, processes: list[subprocess.Popen]) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                done = {e.job_id for e in self.events if e.status is Status.SUCCEEDED}
                if job_ids <= done:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or any(p.poll() is not None for p in processes):
                    say(f"  ... {len(job_ids & done)}/{len(job_ids)} succeeded; missing {sorted(job_ids - done)}")
                    return False
                self._changed.wait(min(0.5, remaining))

    def close(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(5)
            self._consumer.close()


def assigned_reader(bootstrap: str, topic: str) -> Consumer:
    """A plain consumer on every partition of ``topic`` from the beginning (no group membership)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-spot-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
    )
    metadata = consumer.list_topics(topic, timeout=10)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.topics[topic].partitions])
    return consumer


def decode(message) -> StatusEvent | None:
    status = dict(message.headers() or ()).get(STATUS_HEADER, b"").decode()
    if status == "progress":
        return None
    return StatusEvent.from_bytes(message.value())


def read_to_end(bootstrap: str, topic: str) -> list:
    """Every record of ``topic`` up to its current end, read once (bounded by READ_BACK_LIMIT_S)."""
    consumer = assigned_reader(bootstrap, topic)
    try:
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in consumer.assignment()}
        positions = {p: 0 for p in ends}
        records = []
        deadline = time.monotonic() + READ_BACK_LIMIT_S
        while any(positions[p] < ends[p] for p in ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} back: at {positions}, end {ends}")
            message = consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            records.append(message)
            positions[message.partition()] = message.offset() + 1
        return records
    finally:
        consumer.close()


def read_results(bootstrap: str, topic: str) -> dict[str, list[StatusEvent]]:
    """The answer of record: every non-progress event per job, from a fresh read of the whole topic."""
    answers: dict[str, list[StatusEvent]] = {}
    for message in read_to_end(bootstrap, topic):
        event = decode(message)
        if event is not None:
            answers.setdefault(event.job_id, []).append(event)
    return answers


def count_records(bootstrap: str, topic: str) -> int:
    return len(read_to_end(bootstrap, topic))


# --- agent A's log -----------------------------------------------------------------------------


@dataclass
class LogLine:
    event: str
    at: float  # epoch seconds
    fields: dict[str, Any] = field(default_factory=dict)


def read_log(path: Path) -> list[LogLine]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(raw)
            at = datetime.fromisoformat(record["timestamp"]).timestamp()
        except (ValueError, KeyError, TypeError):
            continue  # a non-JSON line (e.g. a library writing to stderr)
        lines.append(LogLine(record.get("event", ""), at, record))
    return lines


def drain_timeline(path: Path, noticed_wall: float) -> dict[str, Any]:
    """Seconds from the notice to each drain step, from the first matching log line (None if absent)."""
    lines = read_log(path)

    def after(match) -> float | None:
        found = next((line for line in lines if line.at >= noticed_wall - 1 and match(line)), None)
        return None if found is None else round(found.at - noticed_wall, 3)

    draining = next((line for line in lines if line.event == "agent.draining"), None)
    return {
        "seen_s": after(
            lambda line: line.event == "notice.received" and line.fields.get("kind") == "spot_interruption"
        ),
        "stop_requested_s": after(lambda line: line.event == "agent.stop_requested"),
        "draining_s": after(lambda line: line.event == "agent.draining"),
        "stop_s": after(lambda line: line.event == "intake.held" and line.fields.get("reason") == "draining"),
        "released_s": after(lambda line: line.event == "job.released"),
        "release_s": after(lambda line: line.event == "intake.closed"),
        "stopped_s": after(lambda line: line.event == "agent.stopped"),
        "budget_s": None if draining is None else draining.fields.get("budget_s"),
    }


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
