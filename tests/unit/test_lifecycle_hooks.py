"""Lifecycle actions against the FAKE Auto Scaling endpoint (moto lacks these calls), over real HTTP."""

from __future__ import annotations

import boto3
import pytest
from botocore.config import Config

from sdagent.devstack.fake_autoscaling import FakeAutoScaling
from sdagent.lifecycle.autoscaling import Heartbeater, HookTarget, LifecycleActions

TARGET = HookTarget(group="gpu-fleet", hook="drain", instance_id="i-0abc")


@pytest.fixture
def fake():
    server = FakeAutoScaling().start()
    yield server
    server.stop()


@pytest.fixture
def autoscaling(fake):
    return boto3.client(
        "autoscaling",
        endpoint_url=fake.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1}),
    )


class FakeTime:
    def __init__(self, fake: FakeAutoScaling | None = None, activate_after: int | None = None):
        self.now = 0.0
        self.sleeps = 0
        self._fake, self._activate_after = fake, activate_after

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.sleeps += 1
        if self._fake is not None and self.sleeps == self._activate_after:
            self._fake.activate(TARGET.hook, TARGET.instance_id)


def test_complete_retries_until_the_group_has_an_action_waiting(fake, autoscaling):
    time = FakeTime(fake, activate_after=3)
    actions = LifecycleActions(autoscaling, clock=time.clock, sleep=time.sleep)
    assert actions.complete(TARGET) is True
    calls = fake.actions("CompleteLifecycleAction")
    assert len(calls) == 4
    assert calls[-1]["LifecycleActionResult"] == "CONTINUE" and calls[-1]["AutoScalingGroupName"] == "gpu-fleet"


def test_complete_gives_up_after_its_patience(fake, autoscaling):
    time = FakeTime()
    actions = LifecycleActions(autoscaling, clock=time.clock, sleep=time.sleep)
    assert actions.complete(TARGET, patience_s=10) is False
    assert len(fake.actions("CompleteLifecycleAction")) == 6  # at 0, 2, 4, 6, 8 and 10 s


def test_heartbeat_is_sent_while_an_action_waits(fake, autoscaling):
    actions = LifecycleActions(autoscaling)
    assert actions.heartbeat(TARGET) is False
    fake.activate(TARGET.hook, TARGET.instance_id)
    with Heartbeater(actions, TARGET, interval_s=0.05):
        import time

        time.sleep(0.3)
    assert len(fake.actions("RecordLifecycleActionHeartbeat")) >= 3


def test_scale_in_protection_names_the_instance(fake, autoscaling):
    LifecycleActions(autoscaling).set_protected("gpu-fleet", "i-0abc", True)
    (call,) = fake.actions("SetInstanceProtection")
    assert call["ProtectedFromScaleIn"] == "true" and call["InstanceIds.member.1"] == "i-0abc"
