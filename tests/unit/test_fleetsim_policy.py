"""The simulator's scaling policy comes from the templates: their numbers, their math, or a refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdagent.fleetsim.policy import BACKLOG_WITHOUT_CAPACITY, IDLE_INSTANCES, JOBS_PER_INSTANCE, read_groups
from sdagent.fleetsim.templates import Template

ROOT = Path(__file__).resolve().parents[2]
FLEET = ROOT / "fleet" / "fleet.yaml"
ALARMS = ROOT / "cloudwatch" / "alarms.yaml"


def test_the_shipped_fleet_is_one_spot_group_tracking_backlog_per_instance_with_the_templates_numbers():
    fleet = Template(FLEET)
    (spot,) = read_groups(fleet)
    assert (spot.name, spot.spot, spot.capacity_rebalance, spot.warm_pool) == ("SpotGroup", True, True, 0)
    assert (spot.min_size, spot.max_size) == (0, int(fleet.parameters["MaxSize"]))
    tracking = spot.target_tracking
    assert tracking is not None
    assert tracking.target == float(fleet.parameters["BacklogPerInstanceTarget"])
    assert tracking.warmup_s == spot.warmup_s == float(fleet.parameters["InstanceWarmupSeconds"])
    assert (tracking.period_s, tracking.scale_in, spot.step_alarms) == (60, True, ())


def test_a_scenario_overrides_parameters_and_the_conditions_follow():
    fleet = Template(FLEET, {"MaxSize": 400, "BaseGroupSize": 8, "WarmPoolSize": 3, "BacklogPerInstanceTarget": 2})
    spot, base = read_groups(fleet)
    assert spot.max_size == 400 and spot.target_tracking and spot.target_tracking.target == 2
    assert (base.name, base.spot, base.max_size, base.warm_pool) == ("BaseGroup", False, 8, 3)


def test_an_unknown_parameter_is_refused_naming_it():
    with pytest.raises(ValueError, match="fleet.yaml has no parameter MaxSise"):
        Template(FLEET, {"MaxSise": 10})


def test_with_the_alarms_template_each_group_gets_its_step_alarms_and_one_target_tracking():
    fleet = Template(FLEET, {"CreateBacklogPolicies": "false"})
    alarms = Template(ALARMS, {"AutoScalingGroupName": "spot", "ScaleInIdleMinutes": 7})
    (spot,) = read_groups(fleet, alarms)
    assert spot.target_tracking and spot.target_tracking.target == float(alarms.parameters["TargetBacklogPerInstance"])
    assert spot.target_tracking.scale_in is False  # the idle step policy removes capacity instead
    by_metric = {alarm.metric: alarm for alarm in spot.step_alarms}
    assert set(by_metric) == {JOBS_PER_INSTANCE, BACKLOG_WITHOUT_CAPACITY, IDLE_INSTANCES}
    assert by_metric[IDLE_INSTANCES].evaluation_periods == 7
    sustained = by_metric[JOBS_PER_INSTANCE]
    assert sustained.threshold == float(alarms.parameters["ScaleOutBacklogPerInstance"])
    assert sustained.adjustment_type == "PercentChangeInCapacity" and [s.adjustment for s in sustained.steps] == [
        25,
        50,
    ]


def test_two_target_trackings_on_one_group_are_refused():
    fleet = Template(FLEET)  # CreateBacklogPolicies defaults to true
    with pytest.raises(ValueError, match="2 target-tracking policies on one metric"):
        read_groups(fleet, Template(ALARMS, {"AutoScalingGroupName": "spot"}))


def test_metric_math_the_simulator_does_not_implement_is_refused(tmp_path):
    changed = tmp_path / "fleet.yaml"
    changed.write_text(FLEET.read_text().replace("/ MAX([in_service, 1])", "/ in_service"))
    with pytest.raises(ValueError, match="the simulator does not implement"):
        read_groups(Template(changed))
