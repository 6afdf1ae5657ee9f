"""One instance's life, as a SimPy process: launch, boot, prewarm, READY, work, drain, gone.

The steps are those of docs/boot-budget.md and docs/lifecycle.md: the EC2 launch (or a warm
pool's start), the boot with the lazily loaded root volume read for the first time (skipped by a
warm-pool instance, whose blocks were read when it was prepared), the WebUI's start in parallel
with the prewarm's staging, the first model's load, READY (the launch hook completed, in service).
A drain (scale-in or a spot notice) takes no new job and lets the running one finish when it will
end ``drain_margin_s`` before the deadline, else releases it; a reclaim ends everything at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from enum import Enum
from typing import Any

import simpy

from sdagent.fleetsim.queueing import Agent

# The fleet (sdagent.fleetsim.fleet.Fleet) is typed Any here: it imports this module.
Fleet = Any


class State(Enum):
    PENDING = "launching"  # requested, not yet running (not billed)
    BOOTING = "booting"  # running: boot, WebUI start, prewarm
    READY = "ready"  # in service
    DRAINING = "draining"  # terminating: finishing or releasing its job
    PREPARING = "preparing"  # booting into the warm pool
    STOPPED = "warm"  # stopped in the warm pool: EBS billed only
    GONE = "gone"


BILLED = {State.BOOTING, State.READY, State.DRAINING, State.PREPARING}


class Instance:
    def __init__(self, fleet: Fleet, group: Any, name: int, type_name: str, spot: bool) -> None:
        self.fleet = fleet
        self.group = group
        self.name = name
        self.type_name = type_name
        self.spot = spot
        self.state = State.GONE
        self.agent: Agent | None = None
        self.launched_at = fleet.env.now
        self.stop_request: simpy.Event = fleet.env.event()
        self.on_ready: list[Callable[[Instance], None]] = []
        self.process: simpy.Process | None = None

    # --- requests from the group and from EC2 ---------------------------------------------------

    def start(self, warm: bool, into_pool: bool = False, booted: bool = False) -> None:
        """Launches (or starts from the warm pool); ``booted``: in service at once (t=0)."""
        self.launched_at = -math.inf if booted else self.fleet.env.now
        self.stop_request = self.fleet.env.event()
        self.on_ready = []  # a previous life's callbacks (a replacement's) are done
        self.process = self.fleet.env.process(self._life(warm, into_pool, booted))

    def terminate(self, deadline: float, to_pool: bool = False) -> None:
        """Scale-in, a rebalance replacement or a spot notice: drain by ``deadline``."""
        if not self.stop_request.triggered:
            self.stop_request.succeed((deadline, to_pool))

    def reclaim(self) -> None:
        if self.process is not None and self.process.is_alive:
            self.process.interrupt("reclaimed")  # gone now, whatever it was doing

    @property
    def protected(self) -> bool:
        """The agent's scale-in protection: set while busy, lifted after ``protect_idle_s`` idle."""
        agent = self.agent
        if agent is None or self.state is not State.READY:
            return False
        idle_for = self.fleet.env.now - agent.last_busy
        return agent.job is not None or idle_for < self.fleet.scenario.instance.protect_idle_s

    # --- the life -------------------------------------------------------------------------------

    def _life(self, warm: bool, into_pool: bool, booted: bool) -> Generator[simpy.Event, Any, None]:
        env, fleet, instance = self.fleet.env, self.fleet, self.fleet.scenario.instance
        try:
            self._set(State.PENDING)
            yield env.timeout(0 if booted else instance.warm_start_s if warm else instance.ec2_launch_s)
            self._set(State.PREPARING if into_pool else State.BOOTING)
            yield env.timeout(0 if booted else fleet.boot_s(warm))
            if into_pool:
                self._set(State.STOPPED)
                self.group.pooled(self, prepared=True)
                return
            self.agent = fleet.new_agent(self)
            self._set(State.READY)
            fleet.intake.join(self.agent, env.now)
            for callback in self.on_ready:
                callback(self)
            deadline, to_pool = yield self.stop_request
            self._set(State.DRAINING)
            leave_at = fleet.intake.drain(self.agent, env.now, deadline)
            yield env.timeout(max(leave_at - env.now, 0.0))
            fleet.intake.leave(self.agent, env.now)
            self.agent = None
            if to_pool:
                self._set(State.STOPPED)
                self.group.pooled(self, prepared=False)
            else:
                self._set(State.GONE)
        except simpy.Interrupt:
            if self.agent is not None:
                fleet.intake.leave(self.agent, env.now)
                self.agent = None
            self._set(State.GONE)
        finally:
            if self.state is State.GONE:
                self.group.gone(self)

    def _set(self, state: State) -> None:
        self.fleet.changed(self, self.state, state)
        self.state = state
