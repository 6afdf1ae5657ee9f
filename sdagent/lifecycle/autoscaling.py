"""Auto Scaling lifecycle hooks and scale-in protection, from the instance's side.

The launch hook tells the group an instance can serve (completed only once the backend is warm);
the terminating hook gives a draining instance time (heartbeats) and is completed when the drain
is done. Completing before the group has an action waiting fails with "No active Lifecycle Action
found" (a ValidationError): that answer is retried, everything else is reported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from botocore.exceptions import BotoCoreError, ClientError

log = structlog.get_logger(__name__)

NO_ACTION_YET = "No active Lifecycle Action found"
COMPLETE_RETRY_S = 2.0  # how often to ask again while the group has no action waiting yet
COMPLETE_PATIENCE_S = 60.0  # the group records the action within seconds of the state change


@dataclass(frozen=True)
class HookTarget:
    """Which group, hook and instance a lifecycle action belongs to."""

    group: str
    hook: str
    instance_id: str


class LifecycleActions:
    """Completes and heartbeats lifecycle actions through an injected boto3 autoscaling client."""

    def __init__(
        self,
        autoscaling,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._autoscaling = autoscaling
        self._clock = clock
        self._sleep = sleep

    def complete(self, target: HookTarget, result: str = "CONTINUE", patience_s: float = COMPLETE_PATIENCE_S) -> bool:
        """Complete the action, retrying while the group has none waiting; False if it never came."""
        deadline = self._clock() + patience_s
        while True:
            try:
                self._autoscaling.complete_lifecycle_action(
                    AutoScalingGroupName=target.group,
                    LifecycleHookName=target.hook,
                    InstanceId=target.instance_id,
                    LifecycleActionResult=result,
                )
                log.info("lifecycle.completed", hook=target.hook, result=result)
                return True
            except ClientError as exc:
                if NO_ACTION_YET not in str(exc) or self._clock() >= deadline:
                    log.warning("lifecycle.complete_failed", hook=target.hook, error=str(exc))
                    return False
                self._sleep(COMPLETE_RETRY_S)
            except BotoCoreError as exc:
                if self._clock() >= deadline:
                    log.warning("lifecycle.complete_failed", hook=target.hook, error=str(exc))
                    return False
                self._sleep(COMPLETE_RETRY_S)

    def heartbeat(self, target: HookTarget) -> bool:
        """Restart the hook's timeout; False (logged) when the group refuses."""
        try:
            self._autoscaling.record_lifecycle_action_heartbeat(
                AutoScalingGroupName=target.group, LifecycleHookName=target.hook, InstanceId=target.instance_id
            )
            log.info("lifecycle.heartbeat", hook=target.hook)
            return True
        except (BotoCoreError, ClientError) as exc:
            log.warning("lifecycle.heartbeat_failed", hook=target.hook, error=str(exc))
            return False

    def set_protected(self, group: str, instance_id: str, protected: bool) -> None:
        """Scale-in protection while busy; best effort (it never stops a spot reclaim anyway)."""
        try:
            self._autoscaling.set_instance_protection(
                AutoScalingGroupName=group, InstanceIds=[instance_id], ProtectedFromScaleIn=protected
            )
            log.info("lifecycle.protection", protected=protected)
        except (BotoCoreError, ClientError) as exc:
            log.warning("lifecycle.protection_failed", protected=protected, error=str(exc))


class Heartbeater:
    """Heartbeats a terminating hook every ``interval_s`` on a thread while a drain runs."""

    def __init__(self, actions: LifecycleActions, target: HookTarget, interval_s: float) -> None:
        self._actions = actions
        self._target = target
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdagent-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeater:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._actions.heartbeat(self._target)
