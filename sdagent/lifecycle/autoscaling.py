"""Auto Scaling lifecycle hooks and scale-in protection, from the instance's side.

The launch hook tells the group an instance can serve (completed only once the backend is warm);
the terminating hook gives a draining instance time (heartbeats) and is completed when the drain
is done. Completing before the group has an action waiting fails with "No active Lifecycle Action
found" (a ValidationError): that answer is retried, everything else is reported.
"""

from __future__ import annotations

import contextlib
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


PROTECTION_IDLE_S = 30.0  # idle this long before scale-in protection is lifted


class GroupMembership:
    """This instance's part in its Auto Scaling group: the launch hook completed once it serves,
    the terminating hook heartbeated while it drains and completed once it has left, and scale-in
    protection that follows busy and idle."""

    def __init__(
        self,
        actions: LifecycleActions,
        group: str,
        instance_id: str,
        *,
        launch_hook: str | None = None,
        terminate_hook: str | None = None,
        heartbeat_interval_s: float = 30.0,
        protect_while_busy: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._actions = actions
        self._launch = HookTarget(group, launch_hook, instance_id) if launch_hook else None
        self._terminate = HookTarget(group, terminate_hook, instance_id) if terminate_hook else None
        self._heartbeat_interval_s = heartbeat_interval_s
        self._protection = _Protection(actions, group, instance_id, clock) if protect_while_busy else None

    def serving(self) -> None:
        """Tell the group this instance can serve; retried in the background while the group has
        not put the instance in Pending:Wait yet."""
        if self._launch is not None:
            threading.Thread(target=self._actions.complete, args=(self._launch,), daemon=True).start()

    def draining(self, by_group: bool) -> contextlib.AbstractContextManager[object]:
        """Heartbeats the terminating hook for the drain's length when the group asked for it."""
        if self._terminate is None or not by_group:
            return contextlib.nullcontext()
        return Heartbeater(self._actions, self._terminate, self._heartbeat_interval_s)

    def left(self, by_group: bool) -> None:
        """Drained and out of the consumer group: let the group terminate the instance."""
        if self._terminate is not None and by_group:
            self._actions.complete(self._terminate)

    def follow_busy(self, busy: bool) -> None:
        if self._protection is not None:
            self._protection.follow(busy)


class _Protection:
    """Scale-in protection that follows busy/idle with hysteresis: a few API calls, not two per job."""

    def __init__(self, actions: LifecycleActions, group: str, instance_id: str, clock: Callable[[], float]) -> None:
        self._actions = actions
        self._group = group
        self._instance_id = instance_id
        self._clock = clock
        self._protected = False
        self._last_busy = 0.0

    def follow(self, busy: bool) -> None:
        now = self._clock()
        if busy:
            self._last_busy = now
        wanted = busy or now - self._last_busy < PROTECTION_IDLE_S
        if wanted != self._protected:
            self._actions.set_protected(self._group, self._instance_id, wanted)
            self._protected = wanted
