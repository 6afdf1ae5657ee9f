"""The fleet simulator's parts: exact queueing in both intakes, drains, scenarios, a whole run."""

from __future__ import annotations

import heapq
import json
import math
from pathlib import Path

import numpy as np
import pytest

from sdagent.fleetsim.cli import _overrides
from sdagent.fleetsim.fleet import Fleet
from sdagent.fleetsim.queueing import Agent, Job, ModelCosts, PartitionQueues, SharedQueue
from sdagent.fleetsim.scenario import Instance, Intake, load
from sdagent.fleetsim.summary import summarise

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "fleet" / "scenarios").glob("*.yaml"))
STEP_SPIKE = ROOT / "fleet" / "scenarios" / "step-spike.yaml"


class _Seen:
    def __init__(self) -> None:
        self.done: list[Job] = []
        self.cut: list[Job] = []

    def started(self, job: Job, at: float) -> None:
        pass

    def finished(self, job: Job, at: float) -> None:
        self.done.append(job)

    def interrupted(self, job: Job, at: float) -> None:
        self.cut.append(job)

    def switched(self, staged: bool) -> None:
        pass


def _instance() -> Instance:
    return Instance(dispatch_s=0.0)


def _jobs(count: int, rng: np.random.Generator) -> list[Job]:
    arrivals = np.sort(rng.random(count) * count / 5.0)  # ~5 jobs/s
    return [Job(float(a), 0, float(rng.lognormal(-0.1, 0.3)), 0, False) for a in arrivals]


def _ideal_waits(jobs: list[Job], servers: int) -> list[float]:
    """An M/G/c FIFO queue computed directly: each job to the server free soonest."""
    free = [0.0] * servers
    waits = []
    for job in jobs:
        soonest = heapq.heappop(free)
        start = max(soonest, job.at)
        waits.append(start - job.at)
        heapq.heappush(free, start + job.service_s)
    return waits


def _run(intake: SharedQueue | PartitionQueues, jobs: list[Job], agents: int, seen: _Seen) -> None:
    for name in range(agents):
        agent = Agent(name, 1.0)
        agent.loaded = 0
        intake.join(agent, 0.0)
    for second in range(int(jobs[-1].at) + 1):
        intake.offer(j for j in jobs if second <= j.at < second + 1)
        intake.run_until(second + 1)
    intake.run_until(math.inf)


def test_the_shared_queue_waits_exactly_as_an_ideal_fifo_queue_over_the_same_agents():
    rng = np.random.default_rng(3)
    jobs, seen = _jobs(3000, rng), _Seen()
    sizes = np.array([2.0])
    _run(SharedQueue(Intake(), _instance(), ModelCosts(_instance(), sizes, seen), seen), jobs, 5, seen)
    assert len(seen.done) == len(jobs)
    ideal = _ideal_waits(_jobs(3000, np.random.default_rng(3)), 5)
    assert [round(j.start - j.at, 9) for j in jobs] == [round(w, 9) for w in ideal]


def test_partition_bound_agents_wait_longer_than_the_shared_queue_and_extra_agents_get_no_partition():
    rng = np.random.default_rng(4)
    jobs, seen = _jobs(3000, rng), _Seen()
    intake = PartitionQueues(
        Intake(mode="partition", partitions=4), _instance(), ModelCosts(_instance(), np.array([2.0]), seen), seen,
        np.random.default_rng(5), lambda: 1.0,
    )  # fmt: skip
    _run(intake, jobs, 6, seen)
    assert len(seen.done) == len(jobs)
    assert sorted(len(a.partitions) for a in intake.agents) == [0, 0, 1, 1, 1, 1]
    partition_p99 = np.percentile([j.start - j.at for j in jobs], 99)
    assert partition_p99 > 2 * np.percentile(_ideal_waits(_jobs(3000, np.random.default_rng(4)), 6), 99)


@pytest.mark.parametrize("mode", ["share", "partition"])
def test_a_drain_releases_a_job_that_would_outrun_the_deadline_and_it_runs_again_elsewhere(mode):
    seen = _Seen()
    costs = ModelCosts(_instance(), np.array([2.0]), seen)
    intake: SharedQueue | PartitionQueues
    if mode == "share":
        intake = SharedQueue(Intake(), _instance(), costs, seen)
    else:
        unpaused = Intake(mode="partition", partitions=2, rebalance_pause_s=0)
        intake = PartitionQueues(unpaused, _instance(), costs, seen, np.random.default_rng(1), lambda: 1.0)
    first, second = Agent(1, 1.0), Agent(2, 1.0)
    first.loaded = second.loaded = 0
    intake.join(first, 0.0)
    long = Job(0.5, 0, 100.0, 0, False)
    intake.offer([long])
    intake.run_until(1.0)
    runner = next(a for a in (first, second) if a.job is long)
    intake.join(second, 1.0)
    leave_at = intake.drain(runner, 2.0, deadline=2.0 + 90)
    assert leave_at == 2.0 and seen.cut == [long]
    intake.leave(runner, leave_at)
    intake.run_until(math.inf)
    (rerun,) = seen.done
    assert (rerun.at, rerun.attempt, rerun.service_s) == (long.at, 2, long.service_s) and rerun.start >= 2.0


def test_a_released_job_is_answered_once_though_the_queues_still_hold_its_stale_entry():
    seen = _Seen()
    intake = SharedQueue(Intake(affinity=True), _instance(), ModelCosts(_instance(), np.array([2.0]), seen), seen)
    agents = [Agent(n, 1.0) for n in range(2)]
    for agent in agents:
        agent.loaded = 0
        intake.join(agent, 0.0)
    jobs = [Job(0.1 * i, 0, 50.0 if i < 3 else 1.0, 0, False) for i in range(6)]  # a backlog behind two long jobs
    intake.offer(jobs)
    intake.run_until(60.0)
    intake.drain(agents[0], 60.0, deadline=61.0)  # its long job is released onto the queue
    intake.leave(agents[0], 60.0)
    intake.run_until(math.inf)
    assert len(seen.done) == len(jobs) and len(seen.cut) == 1


def test_a_scenario_with_a_wrong_key_or_value_is_refused_naming_it(tmp_path):
    scenario = STEP_SPIKE
    with pytest.raises(ValueError, match=r"intake.mode: Input should be 'share' or 'partition'"):
        load(scenario, {"intake.mode": "queue"})
    with pytest.raises(ValueError, match=r"intake.affinty: Extra inputs are not permitted"):
        load(scenario, {"intake.affinty": True})
    with pytest.raises(ValueError, match="jobs.kinds shares add up to 1.5"):
        kinds = [{"name": "image", "share": 1.0, "seconds": 2}, {"name": "video", "share": 0.5, "seconds": 60}]
        load(scenario, {"jobs.kinds": kinds})
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        _overrides(["intake.mode"])


def test_a_template_parameter_the_scenario_names_wrongly_is_refused():
    with pytest.raises(ValueError, match="fleet.yaml has no parameter MaxSise"):
        Fleet(load(STEP_SPIKE, {"templates.fleet.parameters": {"MaxSise": 10}}))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.stem)
def test_each_checked_in_scenario_runs_and_answers(scenario, tmp_path):
    fleet = Fleet(load(scenario, {"duration_s": 900}))
    fleet.run()
    summary = summarise(fleet)
    assert summary["offered_jobs"] > 0 and summary["served_jobs"] > 0.5 * summary["offered_jobs"]
    assert summary["cost_usd"] > 0 and summary["instances_ready_max"] >= 1
    json.dumps(summary)


def test_the_shipped_target_is_what_scales_the_fleet():
    """A lower BacklogPerInstanceTarget in the template means more instances for the same load."""
    runs = {}
    for target in (4, 1):
        fleet = Fleet(load(STEP_SPIKE, {"duration_s": 1800, "templates.fleet.parameters.BacklogPerInstanceTarget": target}))  # fmt: skip
        fleet.run()
        runs[target] = summarise(fleet)["instances_ready_mean"]
    assert runs[1] > runs[4]


def test_the_command_writes_the_report_and_prints_the_summary_as_its_last_line(tmp_path, capsys):
    from sdagent.cli import main

    out = tmp_path / "report"
    rc = main(["fleet", "simulate", str(STEP_SPIKE), "--out", str(out), "--set", "duration_s=600", "--no-progress"])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"throughput.png", "instances.png", "queue.png", "latency.png", "cost.png", "summary.json"} <= names
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads((out / "summary.json").read_text())


def test_the_command_refuses_a_bad_scenario_naming_the_key(tmp_path, capsys):
    from sdagent.cli import main

    rc = main(["fleet", "simulate", str(STEP_SPIKE), "--out", str(tmp_path), "--set", "spot.notice_s=-1"])
    assert rc == 2 and "spot.notice_s" in capsys.readouterr().err and not list(tmp_path.iterdir())
