"""The whole fleet in one SimPy environment: traffic, intake, instances, CloudWatch, the groups.

One driver process moves the fleet second by second (arrivals, the intake up to the second,
samples, CloudWatch's minute, the groups' policies each minute and their capacity every
``RECONCILE_S``); each instance's life and each spot interruption is a process of its own.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Generator
from typing import Any

import numpy as np
import simpy
from tqdm import tqdm

from sdagent.fleetsim.autoscaling import RECONCILE_S, Group
from sdagent.fleetsim.cloudwatch import MetricStore
from sdagent.fleetsim.instance import BILLED, Instance, State
from sdagent.fleetsim.policy import read_groups
from sdagent.fleetsim.queueing import Agent, Job, ModelCosts, PartitionQueues, SharedQueue
from sdagent.fleetsim.recorder import Recorder
from sdagent.fleetsim.scenario import Scenario, resolve
from sdagent.fleetsim.templates import Template
from sdagent.fleetsim.traffic import Offered

HOUR_S = 3600
MONTH_S = 730 * HOUR_S


class Fleet:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.env = simpy.Environment()
        seeds = np.random.SeedSequence(scenario.seed).spawn(4)
        traffic_rng, model_rng, intake_rng, fleet_rng = (np.random.default_rng(s) for s in seeds)
        self.rng = fleet_rng
        self.offered = Offered(scenario.traffic, scenario.jobs, traffic_rng)
        models = scenario.jobs.models
        large = model_rng.random(models.count) < models.large_share
        self.model_gb = np.where(large, models.large_gb, models.small_gb)
        names = [k.name for k in scenario.jobs.kinds]
        latency_kind = names.index("image") if "image" in names else 0
        self.recorder = Recorder(int(scenario.duration_s), scenario.traffic.sync_timeout_s, latency_kind)
        costs = ModelCosts(scenario.instance, self.model_gb, self.recorder)
        self._mean_job_s = sum(k.share * k.seconds for k in scenario.jobs.kinds)
        self.intake: SharedQueue | PartitionQueues
        if scenario.intake.mode == "share":
            self.intake = SharedQueue(scenario.intake, scenario.instance, costs, self.recorder)
        else:
            self.intake = PartitionQueues(
                scenario.intake, scenario.instance, costs, self.recorder, intake_rng, lambda: self._mean_job_s
            )
        fleet_template, policies = self._policies()
        prices = scenario.prices
        base_type = prices.base_type or str(fleet_template.parameters["BaseInstanceType"])
        if base_type not in prices.types:
            raise ValueError(f"prices.types has no {base_type!r} (the base group's instance type)")
        self.groups = [Group(self, p, prices.spot_type if p.spot else base_type, fleet_rng) for p in policies]
        self.metrics = MetricStore([g.name for g in self.groups], scenario.cloudwatch.ingestion_delay_s)
        self.states: Counter[State] = Counter()
        self.billed: Counter[tuple[str, str]] = Counter()  # (instance type, purchase) -> instances
        self.instance_hours: dict[tuple[str, str], float] = {}
        self.stopped = 0
        self.cost = 0.0
        self._names = 0
        self._arrived_now = 0
        self._rate_now = 0.0

    def _policies(self) -> tuple[Template, tuple[Any, ...]]:
        refs = self.scenario.templates
        fleet = Template(resolve(refs.fleet.path), refs.fleet.parameters)
        alarms = Template(resolve(refs.alarms.path), refs.alarms.parameters) if refs.alarms else None
        return fleet, read_groups(fleet, alarms)

    # --- running --------------------------------------------------------------------------------

    def run(self, progress: bool = False) -> Recorder:
        spot_groups = [g for g in self.groups if g.policy.spot] or self.groups
        spot_groups[0].start_with(self.scenario.start_instances)
        bar = tqdm(total=int(self.scenario.duration_s), unit="s", desc=self.scenario.name, disable=not progress)
        self.env.process(self._drive(bar))
        self.env.run(until=self.scenario.duration_s + 1)
        bar.close()
        return self.recorder

    def _drive(self, bar: tqdm) -> Generator[simpy.Event, Any, None]:
        duration = int(self.scenario.duration_s)
        intake, recorder = self.intake, self.recorder
        for t in range(duration + 1):
            intake.run_until(t)
            if t > 0:
                self._close_second(t - 1)
            if t % 60 == 0 and t > 0:
                self._close_minute(t // 60 - 1)
                for group in self.groups:
                    group.evaluate(self.metrics, t)
                bar.update(60)
            if t % RECONCILE_S == 0:
                for group in self.groups:
                    group.reconcile()
            if t == duration:
                break
            if isinstance(intake, PartitionQueues):
                intake.beacons(t)
            arrivals = self.offered.draw(t)
            recorder.count.offered += len(arrivals.at)
            intake.offer(
                Job(float(a), int(k), float(s), int(m), bool(y))
                for a, k, s, m, y in zip(
                    arrivals.at, arrivals.kind, arrivals.service_s, arrivals.model, arrivals.sync
                )  # fmt: skip
            )
            self._arrived_now = len(arrivals.at)
            self._rate_now = self.offered.rate(t)
            yield self.env.timeout(1)
        bar.update(duration % 60)

    def _close_second(self, t: int) -> None:
        for key, n in self.billed.items():
            self.instance_hours[key] = self.instance_hours.get(key, 0.0) + n / HOUR_S
            self.cost += self._price(*key) * n / HOUR_S
        self.cost += self.stopped * self.scenario.prices.root_gb * self.scenario.prices.ebs_gb_month / MONTH_S
        intake = self.intake
        self.recorder.second(
            t, self._rate_now, self._arrived_now, intake.waiting, intake.running, self.states, self.cost
        )
        publishing = bool(intake.agents) and (
            isinstance(intake, PartitionQueues) or self.scenario.cloudwatch.share_backlog_published
        )
        backlog = float(intake.waiting + intake.running) if publishing else None
        self.metrics.sample(backlog, {g.name: g.in_service for g in self.groups})

    def _close_minute(self, minute: int) -> None:
        agents = self.intake.agents
        busy = sum(a.busy_minute == minute or a.job is not None for a in agents) / len(agents) if agents else None
        self.metrics.close_minute(busy)
        self.recorder.close_minute(minute)

    # --- what instances and groups ask for ------------------------------------------------------

    def new_instance(self, group: Group) -> Instance:
        self._names += 1
        instance = Instance(self, group, self._names, group.type_name, group.policy.spot)
        self.recorder.count.launches += 1
        rate = self.scenario.spot.interruptions_per_hour
        if instance.spot and rate > 0:
            self.env.process(self._interruption(instance, rate))
        return instance

    def new_agent(self, instance: Instance) -> Agent:
        agent = Agent(instance.name, self.scenario.prices.types[instance.type_name].speed)
        prewarm = min(self.scenario.instance.prewarm_models, len(self.model_gb))
        for model in range(prewarm):
            agent.cached[model] = float(self.model_gb[model])
            agent.cached_gb += float(self.model_gb[model])
        agent.loaded = 0 if prewarm else -1
        agent.last_busy = self.env.now
        return agent

    def boot_s(self, warm: bool) -> float:
        """Running to READY: boot, first touch of the root volume, max(WebUI, prewarm), first load."""
        instance = self.scenario.instance
        prewarm = min(instance.prewarm_models, len(self.model_gb))
        staging = float(self.model_gb[:prewarm].sum()) * 1024 / instance.stage_mb_s
        first_load = instance.switch_fixed_s + float(self.model_gb[0]) / instance.load_gb_s if prewarm else 0.0
        first_touch = 0.0 if warm else instance.ebs_first_touch_s
        return instance.boot_s + first_touch + max(instance.webui_start_s, staging) + first_load

    def changed(self, instance: Instance, before: State, after: State) -> None:
        if before is not State.GONE:
            self.states[before] -= 1
        if after is not State.GONE:
            self.states[after] += 1
        key = (instance.type_name, "spot" if instance.spot else "on-demand")
        self.billed[key] += (after in BILLED) - (before in BILLED)
        self.stopped += (after is State.STOPPED) - (before is State.STOPPED)

    def _price(self, type_name: str, purchase: str) -> float:
        prices = self.scenario.prices.types[type_name]
        return prices.spot if purchase == "spot" and prices.spot is not None else prices.on_demand

    def _interruption(self, instance: Instance, per_hour: float) -> Generator[simpy.Event, Any, None]:
        env, spot, count = self.env, self.scenario.spot, self.recorder.count
        notice_in = float(self.rng.exponential(HOUR_S / per_hour))
        lead = spot.rebalance_lead_s if self.rng.random() < spot.rebalance_share else math.nan
        if not math.isnan(lead) and notice_in > lead:
            yield env.timeout(notice_in - lead)
            if instance.state is State.GONE:
                return
            count.rebalance_recommendations += 1
            self._rebalance(instance)
            yield env.timeout(lead)
        else:
            yield env.timeout(notice_in)
        if instance.state in (State.GONE, State.STOPPED):
            return
        count.spot_notices += 1
        instance.group.noticed(instance)
        if instance.state is State.READY or instance.state is State.DRAINING:
            instance.terminate(env.now + spot.notice_s)
        yield env.timeout(spot.notice_s)
        instance.reclaim()

    def _rebalance(self, instance: Instance) -> None:
        spot = self.scenario.spot
        agent = instance.agent
        if agent is not None and instance.state is State.READY:
            if spot.on_rebalance == "drain":
                instance.terminate(self.env.now + self.scenario.instance.drain_timeout_s)
            else:
                self.intake.hold(agent, self.env.now)
                self.env.process(self._unhold(instance, agent, spot.rebalance_hold_s))
        if instance.group.policy.capacity_rebalance:
            instance.group.replace(instance)

    def _unhold(self, instance: Instance, agent: Agent, after_s: float) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(after_s)
        if instance.state is State.READY and instance.agent is agent:
            self.intake.unhold(agent, self.env.now)
