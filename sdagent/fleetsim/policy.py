"""The scaling policy as shipped, read from the templates: groups, target tracking, step alarms.

Every number comes from the templates (a parameter's default unless the scenario overrides it);
the metric math the simulator evaluates is checked against the templates' expressions, so a
template that changes its math makes the simulator refuse it instead of simulating something else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sdagent.fleetsim.templates import Template

# The expressions the simulator implements (sdagent/fleetsim/metrics.py), by the Id the templates
# give them, as they are written there (whitespace aside).
JOBS_PER_INSTANCE = "jobs_per_instance"
BACKLOG_WITHOUT_CAPACITY = "backlog_without_capacity"
IDLE_INSTANCES = "idle_instances"
KNOWN_EXPRESSIONS = {
    "(MAX([backlog-in_flight,0])+in_flight)/MAX([in_service,1])": JOBS_PER_INSTANCE,
    "(waiting+inflight)/MAX([instances,1])": JOBS_PER_INSTANCE,
    "IF(backlog>0ANDFILL(inservice,0)==0,1,0)": BACKLOG_WITHOUT_CAPACITY,
    "IF(backlog-inflight<=0,inservice-inflight,0)": IDLE_INSTANCES,
}
DEFAULT_PERIOD_S = 60  # a customized metric without a Period is evaluated per minute


@dataclass(frozen=True)
class Step:
    lower: float  # bounds are relative to the alarm's threshold
    upper: float | None
    adjustment: float


@dataclass(frozen=True)
class TargetTracking:
    target: float  # jobs per in-service instance
    period_s: int
    warmup_s: float
    scale_in: bool


@dataclass(frozen=True)
class StepAlarm:
    name: str
    metric: str  # JOBS_PER_INSTANCE, BACKLOG_WITHOUT_CAPACITY or IDLE_INSTANCES
    comparison: str  # GreaterThanThreshold, GreaterThanOrEqualToThreshold...
    threshold: float
    evaluation_periods: int
    datapoints: int
    period_s: int
    adjustment_type: str  # ChangeInCapacity or PercentChangeInCapacity
    steps: tuple[Step, ...]
    min_magnitude: int
    warmup_s: float


@dataclass(frozen=True)
class GroupPolicy:
    name: str
    min_size: int
    max_size: int
    warmup_s: float
    spot: bool
    capacity_rebalance: bool
    warm_pool: int  # stopped, prewarmed instances kept (0: none)
    target_tracking: TargetTracking | None
    step_alarms: tuple[StepAlarm, ...]


def read_groups(fleet: Template, alarms: Template | None = None) -> tuple[GroupPolicy, ...]:
    """The fleet's groups with their policies: the target tracking of fleet.yaml where its
    condition holds, plus every alarm-driven policy of alarms.yaml (deployed per group) when given."""
    groups = []
    warm_pools = {
        _logical_id(p["AutoScalingGroupName"]): p for n, p in _live(fleet, "AWS::AutoScaling::WarmPool").items()
    }
    policies = _live(fleet, "AWS::AutoScaling::ScalingPolicy")
    for name, props in _live(fleet, "AWS::AutoScaling::AutoScalingGroup").items():
        tracking = [
            _target_tracking(fleet, p) for p in policies.values() if _logical_id(p["AutoScalingGroupName"]) == name
        ]
        if alarms is not None:
            tracking += [_target_tracking(alarms, p) for p in alarms.resources_of_type("AWS::AutoScaling::ScalingPolicy").values()
                         if p["PolicyType"] == "TargetTrackingScaling"]  # fmt: skip
        if len(tracking) > 1:
            raise ValueError(f"group {name} has {len(tracking)} target-tracking policies on one metric: they fight")
        pool = warm_pools.get(name)
        groups.append(
            GroupPolicy(
                name=name,
                min_size=int(fleet.number(props["MinSize"])),
                max_size=int(fleet.number(props["MaxSize"])),
                warmup_s=fleet.number(props.get("DefaultInstanceWarmup", 300)),
                spot="MixedInstancesPolicy" in props
                and fleet.number(props["MixedInstancesPolicy"]["InstancesDistribution"]["OnDemandPercentageAboveBaseCapacity"]) == 0,
                capacity_rebalance=bool(fleet.value(props.get("CapacityRebalance", False))),
                warm_pool=int(fleet.number(pool["MinSize"])) if pool else 0,
                target_tracking=tracking[0] if tracking else None,
                step_alarms=_step_alarms(alarms) if alarms is not None else (),
            )
        )  # fmt: skip
    return tuple(groups)


def _live(template: Template, kind: str) -> dict[str, dict[str, Any]]:
    """Resources of ``kind`` whose Condition holds with the template's parameters."""
    resources = template.body["Resources"]
    return {
        name: props
        for name, props in template.resources_of_type(kind).items()
        if "Condition" not in resources[name] or template.condition(resources[name]["Condition"])
    }


def _logical_id(reference: Any) -> str:
    if isinstance(reference, dict) and "Ref" in reference:
        return reference["Ref"]
    return str(reference)


def _target_tracking(template: Template, props: dict[str, Any]) -> TargetTracking:
    config = props["TargetTrackingConfiguration"]
    queries = config["CustomizedMetricSpecification"]["Metrics"]
    _metric_of(queries, template)  # refuses math the simulator does not implement
    periods = {
        int(template.number(q["MetricStat"].get("Period", DEFAULT_PERIOD_S))) for q in queries if "MetricStat" in q
    }
    return TargetTracking(
        target=template.number(config["TargetValue"]),
        period_s=max(periods),
        warmup_s=template.number(props.get("EstimatedInstanceWarmup", 0)),
        scale_in=not bool(template.value(config.get("DisableScaleIn", False))),
    )


def _step_alarms(alarms: Template) -> tuple[StepAlarm, ...]:
    policies = alarms.resources_of_type("AWS::AutoScaling::ScalingPolicy")
    found = []
    for name, alarm in alarms.resources_of_type("AWS::CloudWatch::Alarm").items():
        actions = [_logical_id(a) for a in alarm.get("AlarmActions", []) if isinstance(a, dict)]
        stepped = [policies[a] for a in actions if a in policies and policies[a]["PolicyType"] == "StepScaling"]
        if not stepped:
            continue  # notifications only (GPU errors, crash loops)
        (policy,) = stepped
        queries = alarm["Metrics"]
        periods = {int(alarms.number(q["MetricStat"]["Period"])) for q in queries if "MetricStat" in q}
        found.append(
            StepAlarm(
                name=name,
                metric=_metric_of(queries, alarms),
                comparison=alarm["ComparisonOperator"],
                threshold=alarms.number(alarm["Threshold"]),
                evaluation_periods=int(alarms.number(alarm["EvaluationPeriods"])),
                datapoints=int(alarms.number(alarm.get("DatapointsToAlarm", alarm["EvaluationPeriods"]))),
                period_s=max(periods),
                adjustment_type=policy["AdjustmentType"],
                steps=tuple(
                    Step(
                        lower=alarms.number(s.get("MetricIntervalLowerBound", float("-inf"))),
                        upper=alarms.number(s["MetricIntervalUpperBound"]) if "MetricIntervalUpperBound" in s else None,
                        adjustment=alarms.number(s["ScalingAdjustment"]),
                    )
                    for s in policy["StepAdjustments"]
                ),
                min_magnitude=int(alarms.number(policy.get("MinAdjustmentMagnitude", 0))),
                warmup_s=alarms.number(policy.get("EstimatedInstanceWarmup", 0)),
            )
        )
    return tuple(found)


def _metric_of(queries: list[dict[str, Any]], template: Template) -> str:
    (returned,) = [q for q in queries if q.get("ReturnData", True) and "Expression" in q]
    expression = re.sub(r"\s+", "", returned["Expression"])
    if expression not in KNOWN_EXPRESSIONS:
        raise ValueError(f"{template.path.name}: the simulator does not implement {returned['Expression']!r}")
    return KNOWN_EXPRESSIONS[expression]
