"""cloudwatch/: the alarms template, the agent configuration and the dashboard name only real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdagent.metrics import names
from sdagent.metrics.config import MetricsConfig

ROOT = Path(__file__).resolve().parents[2]
CLOUDWATCH = ROOT / "cloudwatch"
yaml = pytest.importorskip("yaml")


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags (!Ref, !Sub, !If...) as their long forms."""


def _cfn_tag(loader, tag_suffix, node):
    name = "Ref" if tag_suffix == "Ref" else f"Fn::{tag_suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)


def load_template() -> dict:
    return yaml.load((CLOUDWATCH / "alarms.yaml").read_text(), Loader=_CfnLoader)


def metric_stats(template: dict):
    """Every (resource, metric) the template reads, with its namespace and dimension names."""
    for name, resource in template["Resources"].items():
        props = resource["Properties"]
        queries = props.get("Metrics") or (
            props.get("TargetTrackingConfiguration", {}).get("CustomizedMetricSpecification", {}).get("Metrics", [])
        )
        for query in queries:
            if "MetricStat" in query:
                metric = query["MetricStat"]["Metric"]
                yield name, metric["Namespace"], metric["MetricName"], [d["Name"] for d in metric["Dimensions"]]
        if "MetricName" in props:
            yield name, props["Namespace"], props["MetricName"], [d["Name"] for d in props["Dimensions"]]


def test_alarms_template_reads_only_published_metrics_with_their_dimensions():
    found = list(metric_stats(load_template()))
    assert found
    scope_dims = {"topic": [names.JOBS_TOPIC], "group": [names.AUTOSCALING_GROUP]}
    for resource, namespace, metric, dimensions in found:
        if namespace == "AWS/AutoScaling":
            assert metric == "GroupInServiceInstances" and dimensions == [names.AUTOSCALING_GROUP]
            continue
        assert namespace == {"Ref": "Namespace"}, resource
        spec = names.METRICS[metric]
        assert any(scope_dims.get(scope) == dimensions for scope in spec.scopes), (resource, metric, dimensions)


def test_target_tracking_uses_jobs_per_in_service_instance():
    policy = load_template()["Resources"]["BacklogTargetTracking"]["Properties"]
    queries = policy["TargetTrackingConfiguration"]["CustomizedMetricSpecification"]["Metrics"]
    returned = [q["Id"] for q in queries if q.get("ReturnData", True)]
    assert returned == ["e1"]  # target tracking takes exactly one returned series
    expressions = {q["Id"]: q["Expression"] for q in queries if "Expression" in q}
    assert expressions == {
        "instances": "FILL(inservice, REPEAT)",
        "inflight": "FILL(busy, 0) * instances",
        "waiting": "MAX([backlog - inflight, 0])",
        "e1": "(waiting + inflight) / MAX([instances, 1])",
    }
    by_id = {q["Id"]: q["MetricStat"] for q in queries if "MetricStat" in q}
    assert by_id["backlog"]["Metric"]["MetricName"] == "QueueBacklog"
    # The fleet template's contract: JobsInFlight by JobsTopic, averaged over agents.
    assert by_id["busy"]["Metric"]["MetricName"] == "JobsInFlight" and by_id["busy"]["Stat"] == "Average"
    assert by_id["busy"]["Metric"]["Dimensions"] == [{"Name": "JobsTopic", "Value": {"Ref": "JobsTopic"}}]
    assert by_id["inservice"]["Metric"]["MetricName"] == "GroupInServiceInstances"
    assert policy["TargetTrackingConfiguration"]["DisableScaleIn"] is True  # the guarded policy scales in


def test_every_alarm_returns_one_series():
    for name, resource in load_template()["Resources"].items():
        metrics = resource["Properties"].get("Metrics")
        if resource["Type"] == "AWS::CloudWatch::Alarm" and metrics:
            assert sum(q.get("ReturnData", True) for q in metrics) == 1, name


def test_alarms_template_passes_cfn_lint():
    cfn_lint = shutil.which("cfn-lint") or str(Path(sys.executable).with_name("cfn-lint"))
    if not Path(cfn_lint).exists():
        pytest.skip("cfn-lint is not installed (pip install cfn-lint)")
    result = subprocess.run([cfn_lint, str(CLOUDWATCH / "alarms.yaml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the CloudWatch agent ----------------------------------------------------------------------

# aws/amazon-cloudwatch-agent translator/translate/metrics/config/registered_metrics.go, nvidia_smi.
NVIDIA_SMI_MEASUREMENTS = {
    "utilization_gpu",
    "temperature_gpu",
    "power_draw",
    "utilization_memory",
    "utilization_encoder",
    "utilization_decoder",
    "fan_speed",
    "memory_total",
    "memory_used",
    "memory_free",
    "pcie_link_gen_current",
    "pcie_link_width_current",
    "encoder_stats_session_count",
    "encoder_stats_average_fps",
    "encoder_stats_average_latency",
    "clocks_current_graphics",
    "clocks_current_sm",
    "clocks_current_memory",
    "clocks_current_video",
}


def test_agent_config_collects_gpus_sdagent_logs_and_emf():
    config = json.loads((CLOUDWATCH / "agent.json").read_text())
    measurements = set(config["metrics"]["metrics_collected"]["nvidia_gpu"]["measurement"])
    assert measurements <= NVIDIA_SMI_MEASUREMENTS
    journald = config["logs"]["logs_collected"]["journald"]["collect_list"]
    assert any(entry.get("units") == ["sdagent.service"] for entry in journald)
    # The EMF sink's default destination is where the agent listens.
    assert config["logs"]["metrics_collected"]["emf"]["service_address"] == MetricsConfig().emf_destination
    # The instance role allows PutMetricData to SDAgent and CWAgent only; host metrics stay apart.
    assert config["metrics"]["namespace"] == "CWAgent"


# --- the dashboard -----------------------------------------------------------------------------


def test_dashboard_is_valid_json_after_substitution_and_names_real_metrics():
    text = (CLOUDWATCH / "dashboard.json").read_text()
    placeholders = set(re.findall(r"\$\{(\w+)\}", text))
    assert placeholders == {"Region", "Namespace", "AutoScalingGroupName", "JobsTopic"}
    values = {
        "Region": "us-east-1",
        "Namespace": "SDAgent",
        "AutoScalingGroupName": "fleet",
        "JobsTopic": "sdagent.jobs",
    }
    body = json.loads(re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text))
    referenced = set()
    for widget in body["widgets"]:
        for row in widget["properties"].get("metrics", []):
            if isinstance(row[0], str) and row[0] == "SDAgent":
                referenced.add(row[1])
            elif isinstance(row[0], dict):
                referenced.update(re.findall(r'MetricName="(\w+)"', row[0]["expression"]))
    assert referenced and referenced <= set(names.METRICS)
    assert {"QueueBacklog", "JobsInFlight", "GpuXidErrors", "BackendRestarts"} <= referenced


def test_docs_describe_every_metric():
    docs = (ROOT / "docs" / "metrics.md").read_text()
    missing = [name for name in names.METRICS if f"`{name}`" not in docs]
    assert not missing
