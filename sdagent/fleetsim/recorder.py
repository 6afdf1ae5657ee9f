"""What happened, second by second and minute by minute, for the plots and the summary."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field

import numpy as np

from sdagent.fleetsim.instance import State
from sdagent.fleetsim.queueing import Job

STATES = (State.PENDING, State.BOOTING, State.READY, State.DRAINING, State.PREPARING, State.STOPPED)


@dataclass
class Counters:
    offered: int = 0
    served: int = 0
    started: int = 0
    interrupted: int = 0  # runs cut short: released by a drain or lost with the instance
    wasted_gpu_s: float = 0.0  # GPU time of those runs, done again elsewhere
    switches: int = 0
    staged_switches: int = 0  # the model was not in the instance's cache
    sync_served: int = 0
    sync_late: int = 0  # answered after the caller's sync timeout
    spot_notices: int = 0
    rebalance_recommendations: int = 0
    launches: int = 0
    by_kind: dict[int, int] = field(default_factory=dict)


class Recorder:
    def __init__(self, duration_s: int, sync_timeout_s: float, latency_kind: int) -> None:
        self.seconds = duration_s
        minutes = math.ceil(duration_s / 60)
        self.count = Counters()
        self.offered_rate = np.zeros(duration_s)
        self.arrived = np.zeros(duration_s, dtype=np.int64)
        self.served = np.zeros(duration_s, dtype=np.int64)
        self.waiting = np.zeros(duration_s, dtype=np.int64)
        self.running = np.zeros(duration_s, dtype=np.int64)
        self.states = {s: np.zeros(duration_s, dtype=np.int64) for s in STATES}
        self.cost = np.zeros(duration_s)  # cumulative $
        # The latency goal is about images: ``latency_kind``'s jobs only (a video's minute would
        # otherwise be every p99); queue waits are of every job.
        self.latency_kind = latency_kind
        self.minute_e2e = np.full((minutes, 2), np.nan)  # p50, p99 of those answered that minute
        self.minute_wait = np.full((minutes, 2), np.nan)
        self.e2e = array("d")
        self.wait = array("d")
        self._sync_timeout_s = sync_timeout_s
        self._minute_e2e: list[float] = []
        self._minute_wait: list[float] = []
        self._served_now = 0

    # --- the intake's events --------------------------------------------------------------------

    def started(self, job: Job, at: float) -> None:
        self.count.started += 1

    def finished(self, job: Job, at: float) -> None:
        e2e, wait = at - job.at, job.start - job.at
        if job.kind == self.latency_kind:
            self._minute_e2e.append(e2e)
            self.e2e.append(e2e)
        self._minute_wait.append(wait)
        self.wait.append(wait)
        self._served_now += 1
        self.count.served += 1
        self.count.by_kind[job.kind] = self.count.by_kind.get(job.kind, 0) + 1
        if job.sync:
            self.count.sync_served += 1
            self.count.sync_late += e2e > self._sync_timeout_s

    def interrupted(self, job: Job, at: float) -> None:
        self.count.interrupted += 1
        if not math.isnan(job.start):
            self.count.wasted_gpu_s += max(at - job.start, 0.0)

    def switched(self, staged: bool) -> None:
        self.count.switches += 1
        self.count.staged_switches += staged

    # --- the fleet's samples --------------------------------------------------------------------

    def second(
        self, t: int, rate: float, arrived: int, waiting: int, running: int, states: dict[State, int], cost: float
    ) -> None:
        self.offered_rate[t] = rate
        self.arrived[t] = arrived
        self.served[t] = self._served_now
        self._served_now = 0
        self.waiting[t] = waiting
        self.running[t] = running
        for state in STATES:
            self.states[state][t] = states.get(state, 0)
        self.cost[t] = cost

    def close_minute(self, minute: int) -> None:
        if minute < len(self.minute_e2e) and self._minute_e2e:
            self.minute_e2e[minute] = np.percentile(self._minute_e2e, [50, 99])
        if minute < len(self.minute_wait) and self._minute_wait:
            self.minute_wait[minute] = np.percentile(self._minute_wait, [50, 99])
        self._minute_e2e, self._minute_wait = [], []
