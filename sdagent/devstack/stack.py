"""A whole local stack on loopback: Kafka, moto's S3, topics, and agents on the simulated backend.

Used by ``sdagent devstack`` (the demo), the integration tests and the benchmarks, so all three run
the same real parts the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import structlog
import tomli_w
from confluent_kafka.admin import AdminClient

from sdagent.backends.config import SimulatedBackendConfig
from sdagent.config import Settings, load_settings
from sdagent.devstack.kafka import die_with_parent
from sdagent.errors import ExitCode
from sdagent.kafka.clients import admin_config
from sdagent.kafka.share_group import configure_lane_groups
from sdagent.kafka.topics import SHARE_JOBS_PARTITIONS, create_topics

log = structlog.get_logger(__name__)

DEMO_MODELS = ["sd15.safetensors", "sdxl-base.safetensors"]
# The lock of a local share group: longer than any job of the demo or the tests, short enough
# that a hung agent's job comes back within a test.
SHARE_LOCK_S = 15.0


def stack_config(
    bootstrap: str,
    aws_endpoint: str,
    bucket: str,
    *,
    topic_prefix: str = "",
    jobs_partitions: int = 4,
    consumption: str = "partition",
    **sections: dict,
) -> dict[str, Any]:
    """Agent configuration (as TOML-shaped data) for a local stack; ``sections`` override parts.
    ``consumption="share"``: the agents form a share group of their own (a group's configuration
    is set before its first member joins)."""
    kafka: dict[str, Any] = {"bootstrap_servers": bootstrap, "consumption": consumption}
    if consumption == "share":
        kafka["group_id"] = f"{topic_prefix}share-{uuid.uuid4().hex[:8]}"
        kafka["share"] = {"lock_duration_s": SHARE_LOCK_S}
    config: dict[str, Any] = {
        "agent": {"instance_id": f"local-{uuid.uuid4().hex[:8]}", "progress_interval_s": 0.2},
        "kafka": kafka,
        "topics": {
            "jobs": f"{topic_prefix}jobs",
            "results": f"{topic_prefix}results",
            "dead_letters": f"{topic_prefix}dead-letters",
            "control": f"{topic_prefix}control",
            "replies": f"{topic_prefix}replies",
            "agents": f"{topic_prefix}agents",
            "jobs_partitions": jobs_partitions if consumption == "partition" else SHARE_JOBS_PARTITIONS,
            "results_partitions": 2,
            "replies_partitions": 2,
            "replication_factor": 1,
        },
        "outputs": {"bucket": bucket, "prefix": "outputs", "endpoint_url": aws_endpoint, "region": "us-east-1"},
        "backend": {"kind": "simulated", "models": DEMO_MODELS},
        "retry": {"initial_backoff_s": 0.05, "max_backoff_s": 0.2},
        "imds": {"enabled": False},  # no instance metadata on a dev box; the spot tests turn it on
        # Metrics go to moto's CloudWatch; no NVML on a dev box.
        "metrics": {"endpoint_url": aws_endpoint, "region": "us-east-1", "gpu": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def settings_from(config: dict[str, Any]) -> Settings:
    return load_settings(overrides=config)


def write_config(config: dict[str, Any], path: Path) -> Path:
    path.write_bytes(tomli_w.dumps(config).encode())
    return path


def ensure_topics(settings: Settings) -> None:
    """The stack's topics, and in share mode its share group's configuration."""
    admin = AdminClient(admin_config(settings.kafka))
    share = settings.kafka.consumption == "share"
    create_topics(admin, settings.topics, replication_factor=1, share=share)
    if share:
        configure_lane_groups(admin, settings.kafka.group_id, settings.kafka.share, settings.topics)


def local_aws_environment() -> dict[str, str]:
    """Dummy credentials for moto; real ones never leave this machine."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class AgentThread:
    """An agent running in this process, on a thread, on the simulated backend."""

    def __init__(self, settings: Settings, backend=None) -> None:
        from sdagent.agent.build import build_agent

        # No NOTIFY_SOCKET and no IMDS endpoint: this process's own environment is not the agent's.
        self.agent = build_agent(settings, {"AWS_EC2_METADATA_DISABLED": "true"}, backend=backend)
        self.backend = self.agent.parts.backend
        self.model_cache = self.agent.parts.model_cache
        self._thread = threading.Thread(target=self._main, name="sdagent-agent", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> AgentThread:
        self.agent.start()
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.agent.controls.request_stop("test")
        self._thread.join(timeout_s)

    def _main(self) -> None:
        try:
            self.agent.run()
            self.agent.drain()
        except BaseException as exc:  # surfaced to the test through .error
            self.error = exc
            raise
        finally:
            self.agent.stop()


def spawn_agent(
    config: dict[str, Any], workdir: Path, name: str = "agent", env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Run ``sdagent run`` as a child process, JSON logs to ``<workdir>/<name>.log``."""
    config_path = write_config(config, workdir / f"{name}.toml")
    env = {**os.environ, **local_aws_environment(), "PYTHONUNBUFFERED": "1", **(env or {})}
    log_file = (workdir / f"{name}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "sdagent", "run", "--config", str(config_path)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=die_with_parent,  # a hard-killed test run leaves no agent behind
    )


def run_demo(jobs: int = 5) -> int:
    """Start everything, run a few real jobs end to end, print their links and timings."""
    from sdagent.client import Client
    from sdagent.devstack.kafka import KafkaBroker, broker_from_env
    from sdagent.devstack.moto import MotoServer, aws_client

    os.environ.update({k: v for k, v in local_aws_environment().items() if k not in os.environ})
    print("sdagent devstack: starting Kafka (real broker) and moto S3 on loopback...", flush=True)
    broker = broker_from_env() or KafkaBroker()
    broker.start()
    moto = MotoServer().start()
    try:
        bucket = "sdagent-demo"
        aws_client("s3", moto.endpoint).create_bucket(Bucket=bucket)
        config = stack_config(
            broker.bootstrap,
            moto.endpoint,
            bucket,
            topic_prefix="demo.",
            backend={"step_latency_s": 0.05, "switch_latency_s": 0.5},
        )
        settings = settings_from(config)
        ensure_topics(settings)
        backend = settings.backend
        step_latency_ms = backend.step_latency_s * 1000 if isinstance(backend, SimulatedBackendConfig) else 0.0
        agent = AgentThread(settings).start()
        print(
            f"kafka {broker.bootstrap}, s3 {moto.endpoint}, agent {settings.agent.instance_id} "
            f"(SIMULATED backend, {step_latency_ms:.0f} ms/step)",
            flush=True,
        )
        failures = 0
        with Client(settings.kafka, settings.topics) as client:
            for index in range(jobs):
                model = DEMO_MODELS[index % 2 if index >= jobs // 2 else 0]
                started = time.perf_counter()
                answer = client.run(
                    {"model": model, "prompt": f"demo image {index}", "steps": 12, "seed": index},
                    timeout_s=60,
                )
                took = (time.perf_counter() - started) * 1000
                failures += answer.status.value != "succeeded"
                print(f"\njob {answer.job_id} {answer.status.value} in {took:.0f} ms (model {model})")
                for output in answer.outputs:
                    print(f"  {output.url}")
                print("  " + ", ".join(f"{k}={v:.1f}" for k, v in answer.timings_ms.items()))
        agent.stop()
        return ExitCode.OK if failures == 0 else ExitCode.FAILURE
    finally:
        moto.stop()
        broker.cleanup()
