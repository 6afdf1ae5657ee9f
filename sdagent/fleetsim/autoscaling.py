"""An Auto Scaling group acting on its policies as AWS documents them.

- Target tracking: a high alarm after ``scale_out_datapoints`` datapoints above the target sets
  the desired capacity to ``ceil(value * in_service / target)`` (instances still warming up count
  as capacity already: it only ever raises what is desired); a low alarm after
  ``scale_in_datapoints`` below ``scale_in_threshold * target`` lowers it, by at most
  ``scale_in_max_share`` of the capacity, never while an instance is within its warmup.
- Step alarms: in ALARM when ``datapoints`` of the last ``evaluation_periods`` breach; the step
  whose bounds hold the breach sets the adjustment; one scale-out per warmup.
- Capacity is reconciled every ``RECONCILE_S``: launches (from the warm pool first) and
  terminations of unprotected instances through the terminate hook (a drain). The warm pool holds
  ``max(MinSize, MaxSize - desired)`` prepared, stopped instances (MaxGroupPreparedCapacity unset),
  and a scaled-in instance goes back to it (ReuseOnScaleIn).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from sdagent.fleetsim.cloudwatch import MetricStore
from sdagent.fleetsim.instance import Instance, State
from sdagent.fleetsim.policy import JOBS_PER_INSTANCE, GroupPolicy, StepAlarm

# The fleet (sdagent.fleetsim.fleet.Fleet) is typed Any here: it imports this module.
Fleet = Any

RECONCILE_S = 10
COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "GreaterThanThreshold": operator.gt,
    "GreaterThanOrEqualToThreshold": operator.ge,
    "LessThanThreshold": operator.lt,
    "LessThanOrEqualToThreshold": operator.le,
}


class Group:
    def __init__(self, fleet: Fleet, policy: GroupPolicy, type_name: str, rng: np.random.Generator) -> None:
        self.fleet = fleet
        self.policy = policy
        self.type_name = type_name
        self.name = policy.name
        self._rng = rng
        self.desired = policy.min_size
        self.live: list[Instance] = []  # launching, booting or in service; not terminating
        self.pool: list[Instance] = []  # stopped in the warm pool
        self.preparing = 0
        self.terminating = 0
        self._last_step_out: dict[str, float] = {}
        self.scaling_actions: list[tuple[float, int, str]] = []

    @property
    def in_service(self) -> int:
        return sum(1 for i in self.live if i.state is State.READY)

    # --- policies, once a minute ----------------------------------------------------------------

    def evaluate(self, metrics: MetricStore, now: float) -> None:
        before = self.desired
        tracking = self.policy.target_tracking
        if tracking is not None:
            self._track(tracking.target, tracking.scale_in, tracking.warmup_s, metrics, now)
        for alarm in self.policy.step_alarms:
            self._step(alarm, metrics, now)
        if self.desired != before:
            self.scaling_actions.append((now, self.desired, f"{before} -> {self.desired}"))

    def _track(self, target: float, scale_in: bool, warmup_s: float, metrics: MetricStore, now: float) -> None:
        cw = self.fleet.scenario.cloudwatch
        out_n, in_n = cw.scale_out_datapoints, cw.scale_in_datapoints
        values = metrics.visible(self.name, now, max(out_n, in_n), JOBS_PER_INSTANCE)
        latest = metrics.latest(self.name)
        if not values or values[-1] is None or latest is None:
            return
        needed = math.ceil(values[-1] * max(latest.in_service, 1.0) / target - 1e-9)
        recent = values[-out_n:]
        if len(recent) == out_n and all(v is not None and v > target for v in recent):
            self._set_desired(max(self.desired, needed))
            return
        recent = values[-in_n:]
        low = cw.scale_in_threshold * target
        warming = any(now - i.launched_at < warmup_s for i in self.live)
        if scale_in and not warming and len(recent) == in_n and all(v is not None and v < low for v in recent):
            floor = self.desired - max(1, math.floor(self.desired * cw.scale_in_max_share))
            self._set_desired(min(self.desired, max(needed, floor)))

    def _step(self, alarm: StepAlarm, metrics: MetricStore, now: float) -> None:
        values = metrics.visible(self.name, now, alarm.evaluation_periods, alarm.metric)
        breaching = [v for v in values if v is not None and COMPARISONS[alarm.comparison](v, alarm.threshold)]
        if len(breaching) < alarm.datapoints or values[-1] is None:
            return
        offset = values[-1] - alarm.threshold
        step = next((s for s in alarm.steps if s.lower <= offset and (s.upper is None or offset < s.upper)), None)
        if step is None:
            return
        if alarm.adjustment_type == "PercentChangeInCapacity":
            change = self.desired * step.adjustment / 100
            change = math.copysign(max(abs(math.trunc(change)), alarm.min_magnitude), change)
        else:
            change = step.adjustment
        if change > 0:
            if now - self._last_step_out.get(alarm.name, -math.inf) < alarm.warmup_s:
                return
            self._last_step_out[alarm.name] = now
        self._set_desired(self.desired + int(change))

    def _set_desired(self, desired: int) -> None:
        self.desired = min(max(desired, self.policy.min_size), self.policy.max_size)

    # --- capacity -------------------------------------------------------------------------------

    def reconcile(self) -> None:
        missing = self.desired - len(self.live)
        for _ in range(max(missing, 0)):
            self._launch()
        if missing < 0:
            self._scale_in(-missing)
        self._keep_pool()

    def start_with(self, count: int) -> None:
        """``count`` instances in service at t=0 (a fleet already running)."""
        self._set_desired(max(self.desired, count))
        for _ in range(count):
            instance = self.fleet.new_instance(self)
            self.live.append(instance)
            instance.start(warm=True, booted=True)

    def replace(self, old: Instance) -> None:
        """Capacity rebalance: a replacement first, then the old one drains (terminate hook)."""
        if old not in self.live:
            return
        self.live.remove(old)
        self.terminating += 1
        replacement = self._launch()
        deadline_s = self.fleet.scenario.instance.drain_timeout_s
        replacement.on_ready.append(lambda _: old.terminate(self.fleet.env.now + deadline_s))

    def noticed(self, instance: Instance) -> None:
        """A spot notice: with capacity rebalancing the group replaces the instance now, else
        once it is gone."""
        if self.policy.capacity_rebalance and instance in self.live:
            self.live.remove(instance)
            self.terminating += 1

    def gone(self, instance: Instance) -> None:
        if instance in self.live:
            self.live.remove(instance)  # reclaimed while launching or booting
        elif instance in self.pool:
            self.pool.remove(instance)
        else:
            self.terminating = max(self.terminating - 1, 0)

    def pooled(self, instance: Instance, prepared: bool) -> None:
        """``instance`` stopped in the pool: newly ``prepared``, or scaled in (ReuseOnScaleIn)."""
        if prepared:
            self.preparing = max(self.preparing - 1, 0)
        else:
            self.terminating = max(self.terminating - 1, 0)
        self.pool.append(instance)

    def _launch(self) -> Instance:
        if self.pool:
            instance = self.pool.pop(0)
            self.fleet.changed(instance, State.STOPPED, State.GONE)
            instance.state = State.GONE
            warm = True
        else:
            instance = self.fleet.new_instance(self)
            warm = False
        self.live.append(instance)
        instance.start(warm=warm)
        return instance

    def _scale_in(self, count: int) -> None:
        candidates = [i for i in self.live if not i.protected and i.state is not State.DRAINING]
        if not candidates:
            return  # every instance is busy: AWS retries the scale-in later
        chosen = self._rng.choice(len(candidates), min(count, len(candidates)), replace=False)
        reuse = self.policy.warm_pool > 0
        deadline = self.fleet.env.now + self.fleet.scenario.instance.drain_timeout_s
        for index in sorted(chosen, reverse=True):
            instance = candidates[int(index)]
            self.live.remove(instance)
            self.terminating += 1
            if instance.state is State.READY:
                instance.terminate(deadline, to_pool=reuse)
            else:
                instance.reclaim()  # not in service yet: terminated at once

    def _keep_pool(self) -> None:
        if self.policy.warm_pool <= 0:
            return
        target = max(self.policy.warm_pool, self.policy.max_size - self.desired)
        for _ in range(target - len(self.pool) - self.preparing):
            self.preparing += 1
            self.fleet.new_instance(self).start(warm=False, into_pool=True)
        while len(self.pool) > target:
            instance = self.pool.pop()
            self.fleet.changed(instance, State.STOPPED, State.GONE)
            instance.state = State.GONE
