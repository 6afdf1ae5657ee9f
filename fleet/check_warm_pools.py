#!/usr/bin/env python3
"""Fail when a CloudFormation template attaches a warm pool to a group that cannot have one.

EC2 Auto Scaling rejects a warm pool on a group with a mixed instances policy or one that launches
Spot Instances, but only when the stack is deployed; cfn-lint does not check it. This script does,
for every ``AWS::AutoScaling::WarmPool`` in the templates given:

- the pool's ``AutoScalingGroupName`` must resolve to a group in the same template (``!Ref``);
- that group has no ``MixedInstancesPolicy``;
- its launch template does not ask for Spot (``InstanceMarketOptions.MarketType: spot``), nor its
  launch configuration (``SpotPrice``).

Usage: ``python fleet/check_warm_pools.py TEMPLATE...``; exit 0 when all pass, 1 with one line per
problem otherwise, 2 on a file that cannot be read. Needs PyYAML only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

GROUP = "AWS::AutoScaling::AutoScalingGroup"
WARM_POOL = "AWS::AutoScaling::WarmPool"
LAUNCH_TEMPLATE = "AWS::EC2::LaunchTemplate"
LAUNCH_CONFIGURATION = "AWS::AutoScaling::LaunchConfiguration"


class _TemplateLoader(yaml.SafeLoader):
    """SafeLoader that reads CloudFormation's short-form tags (!Ref x -> {"Ref": "x"})."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = suffix if suffix in ("Ref", "Condition") else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_TemplateLoader.add_multi_constructor("!", _intrinsic)


def load_template(path: Path) -> dict[str, Any]:
    """The template as plain data; JSON templates load too (JSON is YAML)."""
    with path.open(encoding="utf-8") as handle:
        template = yaml.load(handle, Loader=_TemplateLoader)  # noqa: S506 - SafeLoader subclass
    if not isinstance(template, dict):
        raise ValueError(f"{path}: not a CloudFormation template")
    return template


def problems(template: dict[str, Any]) -> list[str]:
    """One message per warm pool attached to a group that cannot have one."""
    resources: dict[str, Any] = template.get("Resources") or {}
    found = []
    for name, resource in resources.items():
        if not isinstance(resource, dict) or resource.get("Type") != WARM_POOL:
            continue
        target = (resource.get("Properties") or {}).get("AutoScalingGroupName")
        group_name = _ref(target)
        group = resources.get(group_name) if group_name else None
        if not isinstance(group, dict) or group.get("Type") != GROUP:
            found.append(
                f"{name}: AutoScalingGroupName {target!r} is not a !Ref to a group in this template, "
                "so the group cannot be checked for Spot or a mixed instances policy"
            )
            continue
        reason = _why_no_warm_pool(group.get("Properties") or {}, resources)
        if reason:
            found.append(
                f"{name}: warm pool on {group_name}, which {reason}; warm pools need an on-demand, single-template group"
            )
    return found


def _why_no_warm_pool(group: dict[str, Any], resources: dict[str, Any]) -> str | None:
    if "MixedInstancesPolicy" in group:
        return "has a MixedInstancesPolicy"
    template_name = _ref((group.get("LaunchTemplate") or {}).get("LaunchTemplateId"))
    template = resources.get(template_name) if template_name else None
    if isinstance(template, dict) and template.get("Type") == LAUNCH_TEMPLATE:
        data = (template.get("Properties") or {}).get("LaunchTemplateData") or {}
        market = (data.get("InstanceMarketOptions") or {}).get("MarketType")
        if isinstance(market, str) and market.lower() == "spot":
            return f"launches Spot Instances (launch template {template_name})"
    configuration_name = _ref(group.get("LaunchConfigurationName"))
    configuration = resources.get(configuration_name) if configuration_name else None
    if (
        isinstance(configuration, dict)
        and configuration.get("Type") == LAUNCH_CONFIGURATION
        and "SpotPrice" in (configuration.get("Properties") or {})
    ):
        return f"launches Spot Instances (launch configuration {configuration_name} sets SpotPrice)"
    return None


def _ref(value: Any) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("Ref"), str):
        return value["Ref"]
    return None


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: check_warm_pools.py TEMPLATE...", file=sys.stderr)
        return 2
    failed = False
    for argument in argv:
        path = Path(argument)
        try:
            template = load_template(path)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            print(f"{path}: cannot read: {exc}", file=sys.stderr)
            return 2
        for problem in problems(template):
            print(f"{path}: {problem}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
