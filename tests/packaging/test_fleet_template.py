"""fleet/fleet.yaml through cfn-lint, and fleet/check_warm_pools.py, which catches what cfn-lint
does not: a warm pool on a Spot or mixed-instances group."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from tests.packaging.conftest import REPO, run

FLEET = REPO / "fleet" / "fleet.yaml"
CHECK = REPO / "fleet" / "check_warm_pools.py"

sys.path.insert(0, str(REPO / "fleet"))
import check_warm_pools  # noqa: E402


def test_fleet_template_passes_cfn_lint(cfn_lint):
    result = run([*cfn_lint, str(FLEET)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_fleet_template_passes_the_warm_pool_check():
    result = run([sys.executable, str(CHECK), str(FLEET)])
    assert result.returncode == 0, result.stdout + result.stderr


def fleet() -> dict:
    return check_warm_pools.load_template(FLEET)


def write(tmp_path, template: dict):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(template))
    return path


def test_warm_pool_on_the_mixed_instances_spot_group_is_caught(tmp_path):
    template = fleet()
    template["Resources"]["BaseWarmPool"]["Properties"]["AutoScalingGroupName"] = {"Ref": "SpotGroup"}
    result = run([sys.executable, str(CHECK), str(write(tmp_path, template))])
    assert result.returncode == 1
    assert "BaseWarmPool: warm pool on SpotGroup, which has a MixedInstancesPolicy" in result.stdout


def test_cfn_lint_alone_does_not_catch_it(cfn_lint, tmp_path):
    """Why the check exists: the same bad template passes cfn-lint."""
    template = fleet()
    template["Resources"]["BaseWarmPool"]["Properties"]["AutoScalingGroupName"] = {"Ref": "SpotGroup"}
    result = run([*cfn_lint, str(write(tmp_path, template))])
    assert result.returncode == 0, result.stdout


def test_warm_pool_on_a_group_whose_launch_template_asks_for_spot_is_caught():
    template = fleet()
    data = template["Resources"]["BaseLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    data["InstanceMarketOptions"] = {"MarketType": "spot"}
    assert check_warm_pools.problems(template) == [
        (
            "BaseWarmPool: warm pool on BaseGroup, which launches Spot Instances (launch template "
            "BaseLaunchTemplate); warm pools need an on-demand, single-template group"
        )
    ]


def test_warm_pool_on_a_spot_launch_configuration_is_caught():
    template = copy.deepcopy(fleet())
    resources = template["Resources"]
    resources["SpotConfig"] = {
        "Type": "AWS::AutoScaling::LaunchConfiguration",
        "Properties": {"ImageId": "ami-12345678", "InstanceType": "g5.xlarge", "SpotPrice": "0.5"},
    }
    group = resources["BaseGroup"]["Properties"]
    del group["LaunchTemplate"]
    group["LaunchConfigurationName"] = {"Ref": "SpotConfig"}
    (problem,) = check_warm_pools.problems(template)
    assert "SpotConfig sets SpotPrice" in problem


def test_a_warm_pool_on_a_group_outside_the_template_cannot_pass_unchecked():
    template = fleet()
    template["Resources"]["BaseWarmPool"]["Properties"]["AutoScalingGroupName"] = "some-other-group"
    (problem,) = check_warm_pools.problems(template)
    assert "is not a !Ref to a group in this template" in problem


@pytest.mark.parametrize("group", ["SpotGroup", "BaseGroup"])
def test_groups_collect_metrics_and_carry_both_lifecycle_hooks(group):
    properties = fleet()["Resources"][group]["Properties"]
    assert properties["MetricsCollection"] == [{"Granularity": "1Minute"}]
    hooks = {hook["LifecycleHookName"]: hook for hook in properties["LifecycleHookSpecificationList"]}
    assert hooks["sdagent-launch"]["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_LAUNCHING"
    assert hooks["sdagent-terminate"]["HeartbeatTimeout"] == 180


def test_launch_templates_require_imdsv2_with_one_hop():
    resources = fleet()["Resources"]
    for name in ("SpotLaunchTemplate", "BaseLaunchTemplate"):
        options = resources[name]["Properties"]["LaunchTemplateData"]["MetadataOptions"]
        assert options["HttpTokens"] == "required" and options["HttpPutResponseHopLimit"] == 1, name


def test_scaling_metric_math_returns_only_e1():
    for policy in ("SpotBacklogScaling", "BaseBacklogScaling"):
        spec = fleet()["Resources"][policy]["Properties"]["TargetTrackingConfiguration"]
        metrics = spec["CustomizedMetricSpecification"]["Metrics"]
        assert [m["Id"] for m in metrics if m.get("ReturnData")] == ["e1"]
        names = {m["MetricStat"]["Metric"]["MetricName"] for m in metrics if "MetricStat" in m}
        assert names == {"QueueBacklog", "JobsInFlight", "GroupInServiceInstances"}


def test_the_checker_runs_without_the_project_installed(tmp_path):
    """It needs PyYAML only, so it can run in any pipeline that deploys the template."""
    result = subprocess.run(
        [sys.executable, "-I", str(CHECK), str(FLEET)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kafka_auth", ["plaintext", "tls", "msk-iam"])
def test_the_settings_the_launch_templates_write_are_ones_the_agent_accepts(monkeypatch, tmp_path, kafka_auth):
    """site.env as each KafkaAuth choice writes it: real config keys with valid values, together."""
    import re

    from sdagent.config import load_settings

    text = FLEET.read_text()
    lines = set(re.findall(r"(SDAGENT_[A-Z_]+)=([^\s\"'{][^\s\"']*)", text))
    lines |= set(re.findall(r"'(SDAGENT_[A-Z_]+)=(\{[^']*\})'", text))  # the JSON client configs
    placeholders = {"${AWS::Region}": "eu-west-1", "${AWS::StackName}": "fleet", "${KafkaBootstrapServers}":
                    "b-1.msk.example:9098", "${ConsumerGroup}": "sdagent", "${JobsTopic}": "sdagent.jobs", "${Consumption}": "share",
                    "${OutputsBucket}": "outputs-bucket", "${OutputsPrefix}": "outputs",
                    "${CloudFrontDomain}": "d1.cloudfront.net"}  # fmt: skip
    chosen = {"plaintext": set(), "tls": {"SDAGENT_KAFKA__CLIENT_CONFIG"}, "msk-iam": {"SDAGENT_KAFKA__MSK_IAM_REGION"}}
    alternatives = set().union(*chosen.values())
    for name, value in sorted(lines):
        if name in alternatives and name not in chosen[kafka_auth]:
            continue
        for placeholder, example in placeholders.items():
            value = value.replace(placeholder, example)
        assert "${" not in value, f"{name}: no example for {value}"
        monkeypatch.setenv(name, value)
    config = tmp_path / "empty.toml"
    config.write_text("")
    kafka = load_settings(config).kafka  # raises ConfigError naming the key when the template is wrong
    assert (kafka.msk_iam_region == "eu-west-1") is (kafka_auth == "msk-iam")
    assert kafka.client_config == ({"security.protocol": "SSL"} if kafka_auth == "tls" else {})
