"""The command line against the real broker and moto: what an operator or a script sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_pipeline import wait_until

from sdagent.devstack.stack import local_aws_environment, write_config
from sdagent.errors import ExitCode


def sdagent(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdagent", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_topics_create_makes_every_topic_once(kafka_bootstrap, topic_prefix, tmp_path):
    from sdagent.devstack.stack import stack_config

    config = write_config(
        stack_config(kafka_bootstrap, "http://unused", "bucket", topic_prefix=topic_prefix), tmp_path / "sdagent.toml"
    )
    first = sdagent("topics", "create", "--config", str(config), "--replication-factor", "1")
    assert first.returncode == 0, first.stderr
    # jobs, the priority lane, results, dead letters, control, replies, agents
    assert first.stdout.count(": created") == 7
    assert f"{topic_prefix}jobs.priority: created" in first.stdout
    again = sdagent("topics", "create", "--config", str(config), "--replication-factor", "1")
    assert again.stdout.count(": exists") == 7


def test_topics_create_in_share_mode_configures_both_share_groups(kafka_bootstrap, topic_prefix, tmp_path):
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    from sdagent.devstack.stack import stack_config

    settings = stack_config(kafka_bootstrap, "http://unused", "bucket", topic_prefix=topic_prefix, consumption="share")
    config = write_config(settings, tmp_path / "sdagent.toml")
    made = sdagent("topics", "create", "--config", str(config), "--replication-factor", "1")
    assert made.returncode == 0, made.stderr
    group = settings["kafka"]["group_id"]
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for name in (group, f"{group}.priority"):
        assert f"share group {name}: share.auto.offset.reset=earliest" in made.stdout
        (future,) = admin.describe_configs([ConfigResource(ResourceType.GROUP, name)]).values()
        entries = future.result(10)
        assert entries["share.auto.offset.reset"].value == "earliest"
        assert entries["share.record.lock.duration.ms"].value == "15000"
        assert entries["share.delivery.count.limit"].value == "10"
    metadata = admin.list_topics(timeout=10)
    assert len(metadata.topics[f"{topic_prefix}jobs"].partitions) == 1  # every member reads it


def test_submit_waits_and_prints_the_answer_as_json(pipeline, tmp_path):
    pipeline.start_agent()
    config = write_config(pipeline.config, tmp_path / "sdagent.toml")
    done = sdagent(
        "submit",
        "--config",
        str(config),
        "--model",
        "sd15.safetensors",
        "--prompt",
        "a fox",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "3",
        "--json",
    )
    assert done.returncode == ExitCode.OK, done.stderr
    answer = json.loads(done.stdout)
    assert answer["status"] == "succeeded" and answer["outputs"][0]["url"].startswith("http://127.0.0.1")


def test_submit_no_wait_prints_the_job_id_and_cancel_reaches_the_agents(pipeline, tmp_path):
    agent = pipeline.start_agent(backend={"step_latency_s": 0.5})
    config = write_config(pipeline.config, tmp_path / "sdagent.toml")
    queued = sdagent(
        "submit",
        "--config",
        str(config),
        "--model",
        "sd15.safetensors",
        "--steps",
        "60",
        "--job-id",
        "cli-cancelled",
        "--no-wait",
    )
    assert queued.returncode == 0 and queued.stdout.strip() == "cli-cancelled"
    assert wait_until(lambda: agent.agent.intake.busy)
    cancelled = sdagent("cancel", "--config", str(config), "cli-cancelled")
    assert cancelled.returncode == 0
    events = pipeline.events("cli-cancelled")
    assert [e.status.value for e in events if e.status.is_terminal] == ["cancelled"]


def test_run_with_a_bad_config_exits_78_naming_the_key(tmp_path):
    config = tmp_path / "sdagent.toml"
    config.write_text('[kafka]\ngroup_protocol = "eager"\n')
    done = sdagent("run", "--config", str(config))
    assert done.returncode == ExitCode.CONFIG
    assert "kafka.group_protocol" in done.stderr


def test_run_without_its_topics_exits_69(kafka_bootstrap, tmp_path):
    from sdagent.devstack.stack import stack_config

    config = stack_config(kafka_bootstrap, "http://127.0.0.1:9", "bucket", topic_prefix="never-created.")
    path = write_config(config, tmp_path / "sdagent.toml")
    done = sdagent("run", "--config", str(path), env={**local_aws_environment(), "PATH": "/usr/bin:/bin"})
    assert done.returncode == ExitCode.UNAVAILABLE, done.stderr
    assert "does not exist" in done.stderr


def test_schema_prints_the_published_json_schema():
    done = sdagent("schema")
    assert json.loads(done.stdout)["properties"]["kind"]


def test_a_running_agent_publishes_its_job_metrics_to_cloudwatch(pipeline, tmp_path, aws_endpoint):
    from sdagent.devstack.moto import aws_client
    from sdagent.devstack.stack import spawn_agent

    config = pipeline.config | {
        "agent": {**pipeline.config["agent"], "instance_id": "i-0metrics"},
        "metrics": {**pipeline.config["metrics"], "publish_interval_s": 1},
    }
    agent = spawn_agent(config, tmp_path, "metrics-agent")
    try:
        assert (
            pipeline.client.run(
                {"model": "sd15.safetensors", "width": 64, "height": 64, "steps": 2}, timeout_s=60
            ).status.value
            == "succeeded"
        )
        cloudwatch = aws_client("cloudwatch", aws_endpoint)

        def published() -> set[str]:
            metrics = cloudwatch.list_metrics(
                Namespace="SDAgent", Dimensions=[{"Name": "InstanceId", "Value": "i-0metrics"}]
            )["Metrics"]
            return {metric["MetricName"] for metric in metrics}

        assert wait_until(lambda: {"JobsFinished", "JobTotalTime", "JobsInFlight"} <= published(), timeout_s=30)
    finally:
        agent.terminate()
        agent.wait(60)
    # Start-up's objects were frozen out of the collector's reach before the first job.
    frozen = [json.loads(line) for line in (tmp_path / "metrics-agent.log").read_text().splitlines()
              if '"heap.frozen"' in line]  # fmt: skip
    assert len(frozen) == 1 and frozen[0]["objects"] > 10_000


def test_check_config_accepts_the_example_and_names_a_bad_key(tmp_path):
    example = Path(__file__).parents[2] / "examples" / "sdagent.toml"
    good = sdagent("check-config", "--config", str(example))
    assert good.returncode == ExitCode.OK and "OK" in good.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nread_ahead = -1\n")
    refused = sdagent("check-config", "--config", str(bad))
    assert refused.returncode == ExitCode.CONFIG and "agent.read_ahead" in refused.stderr
