"""The jobs between callers and GPUs: the two intakes of the agent, job by job, in exact time order.

Within each simulated second the intake merges the second's arrivals with its agents' events (a
job finished, a paused partition resumed, a released job back on the queue) in time order, so
queue waits are exact to the microsecond although the fleet around it moves second by second.

- :class:`SharedQueue` is share-group consumption: one queue, any idle agent takes the next job
  (with ``affinity``, an idle agent holding the job's model first, and an agent freeing up takes a
  waiting job of its own model first unless the oldest job has waited ``affinity_max_wait_s``).
- :class:`PartitionQueues` is partition-bound consumption: each partition belongs to one agent of
  the group (sticky assignment, moved partitions paused), each agent runs its partitions' jobs one
  at a time; the client places a job by key or on a lightly loaded agent's partition.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Protocol, cast

import numpy as np

from sdagent.fleetsim.scenario import Instance, Intake

_FREE, _WAKE, _RELEASED = 0, 1, 2


class Job:
    __slots__ = ("at", "attempt", "kind", "model", "partition", "service_s", "start", "sync", "taken")

    def __init__(self, at: float, kind: int, service_s: float, model: int, sync: bool) -> None:
        self.at = at
        self.kind = kind
        self.service_s = service_s
        self.model = model
        self.sync = sync
        self.attempt = 1
        self.start = math.nan
        self.partition = -1
        self.taken = False

    def again(self) -> Job:
        """The job queued once more after a cut-short run: a new entry, so that the stale ones
        the queues still hold (removed lazily) stay taken."""
        copy = Job(self.at, self.kind, self.service_s, self.model, self.sync)
        copy.attempt = self.attempt + 1
        return copy


class Recorder(Protocol):
    def started(self, job: Job, at: float) -> None: ...
    def finished(self, job: Job, at: float) -> None: ...
    def interrupted(self, job: Job, at: float) -> None: ...
    def switched(self, staged: bool) -> None: ...


class Agent:
    """The serving side of one instance: its GPU's speed, its models, the job it runs."""

    __slots__ = (
        "busy_minute",
        "cached",
        "cached_gb",
        "free_at",
        "job",
        "last_busy",
        "loaded",
        "name",
        "partitions",
        "speed",
        "taking",
        "token",
    )

    def __init__(self, name: int, speed: float) -> None:
        self.name = name
        self.speed = speed
        self.loaded = -1
        self.cached: OrderedDict[int, float] = OrderedDict()
        self.cached_gb = 0.0
        self.free_at = 0.0
        self.job: Job | None = None
        self.token = 0
        self.taking = False
        self.partitions: list[int] = []
        self.last_busy = -math.inf
        self.busy_minute = -1

    def __lt__(self, other: Agent) -> bool:  # heap ties
        return self.name < other.name


class ModelCosts:
    """What running a model costs an agent: nothing loaded, a load from NVMe, or staging first."""

    def __init__(self, instance: Instance, sizes_gb: np.ndarray, recorder: Recorder) -> None:
        self._instance = instance
        self._sizes = sizes_gb
        self._recorder = recorder

    def stage(self, agent: Agent, model: int) -> float:
        """Puts ``model`` in the agent's cache; the seconds it took (0 when it was there)."""
        if model in agent.cached:
            agent.cached.move_to_end(model)
            return 0.0
        gb = float(self._sizes[model])
        while agent.cached and agent.cached_gb + gb > self._instance.cache_gb:
            _, evicted = agent.cached.popitem(last=False)
            agent.cached_gb -= evicted
        agent.cached[model] = gb
        agent.cached_gb += gb
        return gb * 1024 / self._instance.stage_mb_s

    def load(self, agent: Agent, model: int) -> float:
        """Switches the agent to ``model``: the seconds to stage (on a miss) and load it."""
        if agent.loaded == model:
            return 0.0
        staging = self.stage(agent, model)
        self._recorder.switched(staged=staging > 0)
        agent.loaded = model
        return staging + self._instance.switch_fixed_s + float(self._sizes[model]) / self._instance.load_gb_s


class _Intake:
    """The event loop shared by both intakes; they differ in where a job waits and who takes it."""

    def __init__(self, instance: Instance, costs: ModelCosts, recorder: Recorder) -> None:
        self._instance = instance
        self._costs = costs
        self._recorder = recorder
        self._events: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._arrivals: list[Job] = []
        self._next_arrival = 0
        self.now = 0.0
        self.running = 0
        self.agents: list[Agent] = []

    # --- what the fleet calls -------------------------------------------------------------------

    def offer(self, jobs: Iterable[Job]) -> None:
        self._arrivals = self._arrivals[self._next_arrival :] + list(jobs)
        self._next_arrival = 0

    def run_until(self, end: float) -> None:
        """Every arrival and agent event before ``end``, in time order."""
        arrivals, events = self._arrivals, self._events
        while True:
            arrival_at = arrivals[self._next_arrival].at if self._next_arrival < len(arrivals) else math.inf
            event_at = events[0][0] if events else math.inf
            if min(arrival_at, event_at) >= end:
                break
            if event_at <= arrival_at:
                at, _, what, subject = heapq.heappop(events)
                self.now = at
                self._handle(what, subject, at)
            else:
                job = arrivals[self._next_arrival]
                self._next_arrival += 1
                self.now = job.at
                self._arrive(job, job.at)
        self.now = max(self.now, end)

    def join(self, agent: Agent, at: float) -> None:
        self.run_until(at)
        agent.taking = True
        agent.free_at = at
        self.agents.append(agent)
        self._joined(agent, at)

    def drain(self, agent: Agent, at: float, deadline: float) -> float:
        """Takes no new job for ``agent``; when it can leave: its job finished or released."""
        self.hold(agent, at)
        if agent.job is None:
            return at
        if agent.free_at <= deadline - self._instance.drain_margin_s:
            return agent.free_at
        self._cut_short(agent, at)
        return at

    def hold(self, agent: Agent, at: float) -> None:
        """Takes no new job for ``agent`` (a rebalance recommendation); its job runs on."""
        self.run_until(at)
        if agent.taking:
            agent.taking = False
            self._stopped_taking(agent, at)

    def unhold(self, agent: Agent, at: float) -> None:
        self.run_until(at)
        if agent in self.agents and not agent.taking:
            agent.taking = True
            if agent.job is None:
                self._next_for(agent, at)

    def leave(self, agent: Agent, at: float) -> None:
        """The agent is gone (closed its consumer, or its instance was reclaimed)."""
        self.run_until(at)
        if agent.job is not None:  # reclaimed mid-job (no drain)
            self._cut_short(agent, at)
        agent.taking = False
        self.agents.remove(agent)
        self._left(agent, at)

    def _cut_short(self, agent: Agent, at: float) -> None:
        """Stops the agent's running job (its pending finish goes stale) and queues it again."""
        job = cast(Job, agent.job)
        agent.job = None
        agent.token += 1
        self.running -= 1
        self._recorder.interrupted(job, at)
        self._requeue(job.again(), at)

    # --- the loop -------------------------------------------------------------------------------

    def _push(self, at: float, what: int, subject: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, what, subject))

    def _handle(self, what: int, subject: object, at: float) -> None:
        if what == _FREE:
            agent, token = cast(tuple[Agent, int], subject)
            if token != agent.token:
                return  # the job was interrupted
            job = cast(Job, agent.job)  # a current token: its job is running
            agent.job = None
            self.running -= 1
            agent.last_busy = at
            self._recorder.finished(job, at)
            if agent.taking:
                self._next_for(agent, at)
        elif what == _WAKE:
            woken = cast(Agent, subject)
            if woken.taking and woken.job is None:
                self._next_for(woken, at)
        else:
            self._released(cast(Job, subject), at)

    def _start(self, agent: Agent, job: Job, at: float) -> None:
        job.taken = True
        job.start = at + self._instance.dispatch_s
        agent.job = job
        agent.token += 1
        agent.free_at = job.start + self._costs.load(agent, job.model) + job.service_s / agent.speed
        agent.busy_minute = int(at // 60)
        self.running += 1
        self._recorder.started(job, job.start)
        self._push(agent.free_at, _FREE, (agent, agent.token))

    # --- what each intake decides ---------------------------------------------------------------

    @property
    def waiting(self) -> int:
        raise NotImplementedError

    def _arrive(self, job: Job, at: float) -> None:
        raise NotImplementedError

    def _next_for(self, agent: Agent, at: float) -> None:
        raise NotImplementedError

    def _joined(self, agent: Agent, at: float) -> None:
        raise NotImplementedError

    def _stopped_taking(self, agent: Agent, at: float) -> None:
        raise NotImplementedError

    def _left(self, agent: Agent, at: float) -> None:
        raise NotImplementedError

    def _requeue(self, job: Job, at: float) -> None:
        raise NotImplementedError

    def _released(self, job: Job, at: float) -> None:
        raise NotImplementedError


class SharedQueue(_Intake):
    """Share-group consumption: one FIFO queue over the fleet; optional model affinity."""

    def __init__(self, intake: Intake, instance: Instance, costs: ModelCosts, recorder: Recorder) -> None:
        super().__init__(instance, costs, recorder)
        self._intake = intake
        self._queue: deque[Job] = deque()
        self._by_model: dict[int, deque[Job]] = {}
        self._count = 0
        self._idle: dict[Agent, None] = {}  # oldest idle first
        self._idle_by_model: dict[int, dict[Agent, None]] = {}

    @property
    def waiting(self) -> int:
        return self._count

    def _arrive(self, job: Job, at: float) -> None:
        agent = self._idle_agent_for(job.model)
        if agent is None:
            self._enqueue(job, front=False)
        else:
            self._start(agent, job, at)

    def _next_for(self, agent: Agent, at: float) -> None:
        job = self._dequeue_for(agent, at)
        if job is None:
            self._set_idle(agent)
        else:
            self._start(agent, job, at)

    def _joined(self, agent: Agent, at: float) -> None:
        self._next_for(agent, at)

    def _stopped_taking(self, agent: Agent, at: float) -> None:
        self._unset_idle(agent)

    def _left(self, agent: Agent, at: float) -> None:
        self._unset_idle(agent)

    def _requeue(self, job: Job, at: float) -> None:
        self._push(at + self._intake.release_s, _RELEASED, job)

    def _released(self, job: Job, at: float) -> None:
        agent = self._idle_agent_for(job.model)
        if agent is None:
            self._enqueue(job, front=True)  # its offset is the oldest: the broker hands it out first
        else:
            self._start(agent, job, at)

    def _enqueue(self, job: Job, front: bool) -> None:
        self._count += 1
        (self._queue.appendleft if front else self._queue.append)(job)
        if self._intake.affinity:
            lane = self._by_model.setdefault(job.model, deque())
            (lane.appendleft if front else lane.append)(job)

    def _dequeue_for(self, agent: Agent, at: float) -> Job | None:
        queue = self._queue
        while queue and queue[0].taken:
            queue.popleft()
        if not queue:
            return None
        job = queue[0]
        if self._intake.affinity and at - job.at < self._intake.affinity_max_wait_s:
            lane = self._by_model.get(agent.loaded)
            while lane and lane[0].taken:
                lane.popleft()
            if lane:
                job = lane[0]
        job.taken = True  # lazily removed from whichever deque still holds it
        self._count -= 1
        return job

    def _idle_agent_for(self, model: int) -> Agent | None:
        if not self._idle:
            return None
        holders = self._idle_by_model.get(model) if self._intake.affinity else None
        agent = next(iter(holders)) if holders else next(iter(self._idle))
        self._unset_idle(agent)
        return agent

    def _set_idle(self, agent: Agent) -> None:
        self._idle[agent] = None
        if self._intake.affinity:
            self._idle_by_model.setdefault(agent.loaded, {})[agent] = None

    def _unset_idle(self, agent: Agent) -> None:
        if self._idle.pop(agent, False) is None and self._intake.affinity:
            self._idle_by_model[agent.loaded].pop(agent, None)


class PartitionQueues(_Intake):
    """Partition-bound consumption: per-partition FIFOs, each owned by one agent of the group."""

    def __init__(
        self,
        intake: Intake,
        instance: Instance,
        costs: ModelCosts,
        recorder: Recorder,
        rng: np.random.Generator,
        mean_job_s: Callable[[], float],
    ) -> None:
        super().__init__(instance, costs, recorder)
        self._intake = intake
        self._rng = rng
        self._mean_job_s = mean_job_s
        self._queues: list[deque[Job]] = [deque() for _ in range(intake.partitions)]
        self._queued_s = [0.0] * intake.partitions
        self._owner: list[Agent | None] = [None] * intake.partitions
        self._paused_until = [0.0] * intake.partitions
        self._members: list[Agent] = []  # in the group: joined and not yet left
        self._count = 0
        self._view: dict[Agent, float] = {}  # the agents' beacons: seconds until free
        self._sent_since: dict[Agent, int] = {}

    @property
    def waiting(self) -> int:
        return self._count

    def beacons(self, at: float) -> None:
        """Each agent's published load, as the routing client sees it until the next beacon."""
        self._view = {
            agent: max(agent.free_at - at, 0.0) * (agent.job is not None)
            + sum(self._queued_s[p] for p in agent.partitions) / agent.speed
            for agent in self._members
            if agent.taking and agent.partitions
        }
        self._sent_since = dict.fromkeys(self._view, 0)

    def _arrive(self, job: Job, at: float) -> None:
        partition = self._place(job)
        job.partition = partition
        self._queues[partition].append(job)
        self._queued_s[partition] += job.service_s
        self._count += 1
        owner = self._owner[partition]
        if owner is not None and owner.taking and owner.job is None:
            self._next_for(owner, at)

    def _place(self, job: Job) -> int:
        if self._intake.routing == "least_loaded" and self._view:
            candidates = list(self._view)
            choices = self._intake.routing_choices
            if 0 < choices < len(candidates):
                candidates = [candidates[i] for i in self._rng.choice(len(candidates), choices, replace=False)]
            mean = self._mean_job_s()
            agent = min(candidates, key=lambda a: self._view[a] + self._sent_since[a] * mean)
            self._sent_since[agent] += 1
            return agent.partitions[int(self._rng.integers(len(agent.partitions)))]
        return int(self._rng.integers(self._intake.partitions))  # the job id's hash

    def _next_for(self, agent: Agent, at: float) -> None:
        best, resume = -1, math.inf
        for partition in agent.partitions:
            queue = self._queues[partition]
            if not queue:
                continue
            if self._paused_until[partition] > at:
                resume = min(resume, self._paused_until[partition])
            elif best < 0 or queue[0].at < self._queues[best][0].at:
                best = partition
        if best >= 0:
            job = self._queues[best].popleft()
            self._queued_s[best] -= job.service_s
            self._count -= 1
            self._start(agent, job, at)
        elif resume < math.inf:
            self._push(resume, _WAKE, agent)

    def _joined(self, agent: Agent, at: float) -> None:
        self._members.append(agent)
        self._rebalance(at)

    def _stopped_taking(self, agent: Agent, at: float) -> None:
        pass  # it keeps its partitions until it closes its consumer: their jobs wait

    def _left(self, agent: Agent, at: float) -> None:
        self._members.remove(agent)
        self._rebalance(at)

    def _requeue(self, job: Job, at: float) -> None:
        self._arrive(job, at)  # produced again on the jobs topic, behind what is queued

    def _released(self, job: Job, at: float) -> None:
        raise AssertionError("partition mode re-produces, it does not release")

    def _rebalance(self, at: float) -> None:
        """Sticky assignment: owners keep up to their fair share; the rest move, paused."""
        members = self._members
        for agent in members:
            agent.partitions = []
        if not members:
            self._owner = [None] * len(self._owner)
            return
        quota = math.ceil(len(self._owner) / len(members))
        present = set(members)
        orphans = []
        for partition, owner in enumerate(self._owner):
            if owner in present and len(owner.partitions) < quota:
                owner.partitions.append(partition)
            else:
                orphans.append(partition)
        pause_until = at + self._intake.rebalance_pause_s
        for partition in orphans:
            agent = min(members, key=lambda a: len(a.partitions))
            agent.partitions.append(partition)
            self._owner[partition] = agent
            self._paused_until[partition] = pause_until
        for agent in members:
            if agent.taking and agent.job is None:
                self._next_for(agent, at)
