"""``sdagent run`` with a model cache and a supervised WebUI (the simulator as a child process, driven
over HTTP): the WebUI's checkpoint folder is the cache's, a staged model is rescanned before the
switch (A1111 ``POST /sdapi/v1/refresh-checkpoints``), and a fresh instance whose only checkpoints
come from the store prewarms, loads one and only then takes the job that was already waiting."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import pytest

from sdagent.cache import ModelCache
from sdagent.cache.sources.directory import DirectorySource
from sdagent.cache.testing import InstrumentedSource, make_store, model_bytes
from sdagent.devstack.kafka import free_loopback_port
from sdagent.devstack.moto import aws_client
from sdagent.devstack.process import wait_until
from sdagent.devstack.stack import spawn_agent
from sdagent.jobs import Status

pytestmark = pytest.mark.integration

BAKED = "sd15.safetensors"  # in the WebUI's own list (the image's model), not in the store
STAGED = "store-model.safetensors"
SIZE = 256 * 1024


def job(model: str, job_id: str) -> dict:
    return {"job_id": job_id, "model": model, "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


def webui(kind: str, port: int, cache_dir: Path, models: list[str]) -> dict:
    command = [sys.executable, "-m", "sdagent", "sim", "--port", str(port), "--step-latency-s", "0.01",
               "--models", *models, "--models-dir", str(cache_dir / "checkpoints")]  # fmt: skip
    return {
        "kind": kind,
        "url": f"http://127.0.0.1:{port}",
        "models": models,
        "process": {"command": command, "ready_timeout_s": 60, "env": {"PYTHONUNBUFFERED": "1"}},
    }


def log_events(path: Path) -> list[dict]:
    """The agent's JSON log lines, in order (the WebUI's output is pumped into the same log)."""
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def first_index(events: list[dict], name: str, **fields) -> int:
    for index, event in enumerate(events):
        if event.get("event") == name and all(event.get(key) == value for key, value in fields.items()):
            return index
    raise AssertionError(f"no {name} {fields} in the log")


@pytest.fixture
def store(tmp_path) -> Path:
    root = tmp_path / "store"
    make_store(root, {STAGED: model_bytes(STAGED, SIZE)})
    return root


@pytest.mark.parametrize("kind", ["a1111", "comfyui"])
def test_a_model_staged_for_a_job_is_rescanned_by_the_webui_then_switched_to(
    pipeline, store, tmp_path, aws_endpoint, kind
):
    cache_dir, instance_id = tmp_path / "cache", f"i-0cache{kind}"
    config = pipeline.config | {
        "agent": {**pipeline.config["agent"], "instance_id": instance_id},
        "metrics": {**pipeline.config["metrics"], "publish_interval_s": 1},
        "backend": webui(kind, free_loopback_port(), cache_dir, [BAKED]),
        "cache": {"source": str(store), "dir": str(cache_dir)},
    }
    agent = spawn_agent(config, tmp_path, f"agent-{kind}")
    try:
        first = pipeline.client.run(job(STAGED, f"{kind}-staged"), timeout_s=90)
        second = pipeline.client.run(job(STAGED, f"{kind}-hit"), timeout_s=30)
        baked = pipeline.client.run(job(BAKED, f"{kind}-baked"), timeout_s=30)
        # Stage and switch times and the cache's hits and misses reach CloudWatch (moto).
        wanted = {"ModelStageTime", "ModelSwitchTime", "ModelCacheHits", "ModelCacheMisses"}
        assert wait_until(lambda: wanted <= published_metrics(aws_endpoint, instance_id), timeout_s=30)
    finally:
        agent.terminate()
        agent.wait(60)

    assert first.status is Status.SUCCEEDED, first.message
    assert first.timings_ms["stage_ms"] > 0 and first.timings_ms["switch_ms"] >= 0
    assert first.info["model"] == STAGED
    assert second.status is Status.SUCCEEDED
    assert "stage_ms" not in second.timings_ms and "switch_ms" not in second.timings_ms
    assert baked.status is Status.SUCCEEDED and "stage_ms" not in baked.timings_ms  # not in the store: as is
    events = log_events(tmp_path / f"agent-{kind}.log")
    staged = first_index(events, "model.staged", model=STAGED)
    switched = first_index(events, "model.switched", model=STAGED)
    if kind == "a1111":
        # A1111 sees a new file only after a rescan: asked for between the staging and the switch.
        rescanned = first_index(events, "backend.models_refreshed")
        assert staged < rescanned < switched
    else:
        assert staged < switched


def test_a_fresh_instance_prewarms_loads_a_store_model_and_only_then_takes_work(pipeline, store, tmp_path):
    cache_dir, port = tmp_path / "cache", free_loopback_port()
    queued = pipeline.client.submit(job(STAGED, "waiting-before-start"))  # in Kafka before the agent runs
    # Another process (an operator's `sdagent cache warm`) is staging the model and holds it until
    # the WebUI answers: the WebUI starts on an empty folder, the agent's prewarm waits for that
    # download, then has the WebUI rescan and load the model.
    with notify_socket() as (address, notices), gated_download(cache_dir, store, STAGED) as release:
        config = pipeline.config | {
            "backend": webui("a1111", port, cache_dir, []),  # no checkpoint of its own
            "cache": {"source": str(store), "dir": str(cache_dir), "prewarm": [STAGED, "absent.safetensors"]},
        }
        agent = spawn_agent(config, tmp_path, "agent-fresh", env={"NOTIFY_SOCKET": address})
        assert wait_until(lambda: sim_checkpoints(port) == [], timeout_s=60)  # up, nothing to load
        release()
        try:
            ready = notices.get(timeout=60)
            ready_log = log_events(tmp_path / "agent-fresh.log")  # what had happened by READY=1
            events = pipeline.events(queued.job_id, timeout_s=60)
        finally:
            agent.terminate()
            agent.wait(60)

    (answer,) = [event for event in events if event.status.is_terminal]
    assert answer.status is Status.SUCCEEDED, answer.message
    assert "stage_ms" not in answer.timings_ms and "switch_ms" not in answer.timings_ms  # staged and loaded at boot
    log = log_events(tmp_path / "agent-fresh.log")
    prewarmed = first_index(log, "agent.prewarmed")
    rescanned = first_index(log, "backend.models_refreshed")
    loaded = first_index(log, "agent.prewarmed_model_loaded", model=STAGED)
    ready_seen = first_index(log, "backend.ready")
    subscribed = first_index(log, "intake.subscribed")
    succeeded = first_index(log, "job.succeeded", job_id=queued.job_id)
    assert prewarmed < rescanned < loaded < ready_seen < subscribed < succeeded
    # systemd heard READY=1 only once the model was local and loaded; the failed one is reported.
    assert "READY=1" in ready and "prewarm failed for 1 of 2 models: absent.safetensors" in ready
    first_index(ready_log, "agent.prewarmed_model_loaded", model=STAGED)
    first_index(ready_log, "agent.prewarm_incomplete", failed=["absent.safetensors"])


def test_a_stop_during_a_long_prewarm_leaves_at_once_without_taking_work(pipeline, store, tmp_path):
    cache_dir = tmp_path / "cache"
    queued = pipeline.client.submit(job(STAGED, "left-for-the-fleet"))
    # The prewarm waits for a download another process holds: as long as a large model from S3.
    with gated_download(cache_dir, store, STAGED):
        config = pipeline.config | {
            "backend": webui("a1111", free_loopback_port(), cache_dir, []),
            "cache": {"source": str(store), "dir": str(cache_dir), "prewarm": [STAGED]},
        }
        agent = spawn_agent(config, tmp_path, "agent-stopped")
        log_path = tmp_path / "agent-stopped.log"
        assert wait_until(lambda: log_path.exists() and "agent.prewarm_started" in log_path.read_text(), timeout_s=60)
        agent.send_signal(signal.SIGTERM)  # a spot notice or a scale-in during boot
        code = agent.wait(15)  # not the prewarm's time: the download is still held

    assert code == 0
    log = log_events(log_path)
    # Stopped cleanly, then out without waiting for the held download (its threads would have).
    assert (
        first_index(log, "agent.prewarm_abandoned")
        < first_index(log, "agent.stopped")
        < first_index(log, "agent.exit_during_prewarm")
    )
    assert not any(event.get("event") == "intake.subscribed" for event in log)  # never joined the group
    events = pipeline.events(queued.job_id, timeout_s=2)
    assert not any(event.status.is_terminal for event in events)  # the job waits for another agent


@contextlib.contextmanager
def notify_socket():
    """A datagram socket standing in for systemd's; yields its address and a queue of READY messages."""
    directory = tempfile.mkdtemp(prefix="sdn")  # AF_UNIX paths are short: not under tmp_path
    address = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.5)
    notices: queue.Queue[str] = queue.Queue()
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                message = sock.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in message:
                notices.put(message)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    try:
        yield address, notices
    finally:
        stop.set()
        receiver.join(5)
        sock.close()
        shutil.rmtree(directory)


def published_metrics(endpoint: str, instance_id: str) -> set[str]:
    cloudwatch = aws_client("cloudwatch", endpoint)
    metrics = cloudwatch.list_metrics(Namespace="SDAgent", Dimensions=[{"Name": "InstanceId", "Value": instance_id}])
    return {metric["MetricName"] for metric in metrics["Metrics"]}


def sim_checkpoints(port: int) -> list[str] | None:
    """The simulated A1111's checkpoint names, or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/sdapi/v1/sd-models", timeout=2) as response:
            return [entry["model_name"] for entry in json.load(response)]
    except OSError:
        return None


@contextlib.contextmanager
def gated_download(cache_dir: Path, store: Path, name: str):
    """Stage ``name`` into ``cache_dir`` from this process, holding its download until released."""
    fetching, gate = threading.Event(), threading.Event()

    def hold(fetch) -> None:
        fetching.set()
        gate.wait(120)

    cache = ModelCache(cache_dir, InstrumentedSource(DirectorySource(store), on_fetch=hold), budget_bytes=10 * SIZE)
    stager = threading.Thread(target=cache.ensure, args=(name,), daemon=True)
    stager.start()
    assert fetching.wait(30)  # the model's lock is held from here on
    try:
        yield gate.set
    finally:
        gate.set()
        stager.join(30)
        cache.close()
