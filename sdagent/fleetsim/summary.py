"""The scenario's answers, from what the recorder saw: latency, capacity, re-run work, cost."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sdagent.fleetsim.fleet import Fleet
from sdagent.fleetsim.instance import State
from sdagent.fleetsim.scenario import StepChange


def summarise(fleet: Fleet) -> dict[str, Any]:
    scenario, recorder, count = fleet.scenario, fleet.recorder, fleet.recorder.count
    e2e, wait = np.frombuffer(recorder.e2e), np.frombuffer(recorder.wait)
    images = sum(n for kind, n in count.by_kind.items() if scenario.jobs.kinds[kind].name == "image")
    ready = recorder.states[State.READY]
    goal = scenario.latency_goal_s
    summary: dict[str, Any] = {
        "scenario": scenario.name,
        "simulated_s": int(scenario.duration_s),
        "intake": _intake(fleet),
        "offered_jobs": count.offered,
        "served_jobs": count.served,
        "unfinished_jobs": count.offered - count.served,
        "served_per_s": round(count.served / scenario.duration_s, 2),
        "latency_of": scenario.jobs.kinds[recorder.latency_kind].name,
        "e2e_p50_s": _percentile(e2e, 50),
        "e2e_p99_s": _percentile(e2e, 99),
        "e2e_max_s": round(float(e2e.max()), 3) if e2e.size else None,
        "wait_p50_s": _percentile(wait, 50),
        "wait_p99_s": _percentile(wait, 99),
        "minutes_p99_within_goal": _share(recorder.minute_e2e[:, 1] <= goal, recorder.minute_e2e[:, 1]),
        "latency_goal_s": goal,
        "sync_late_share": round(count.sync_late / count.sync_served, 4) if count.sync_served else 0.0,
        "instances_ready_mean": round(float(ready.mean()), 1),
        "instances_ready_max": int(ready.max()),
        "launches": count.launches,
        "spot_notices": count.spot_notices,
        "rebalance_recommendations": count.rebalance_recommendations,
        "interrupted_runs": count.interrupted,
        "rerun_gpu_share": round(count.wasted_gpu_s / max(_gpu_busy_s(fleet), 1e-9), 5),
        "switches_per_1000_jobs": round(1000 * count.switches / max(count.started, 1), 1),
        "staged_switch_share": round(count.staged_switches / count.switches, 3) if count.switches else 0.0,
        "cost_usd": round(fleet.cost, 2),
        "usd_per_1000_images": round(1000 * fleet.cost / images, 4) if images else None,
        "instance_hours": {f"{t} {p}": round(h, 2) for (t, p), h in sorted(fleet.instance_hours.items())},
        "prices_as_of": scenario.prices.as_of.isoformat(),
        "scaling_actions": sum(len(g.scaling_actions) for g in fleet.groups),
    }
    recovery = _recovery_after_step(fleet)
    if recovery is not None:
        summary["step_at_s"], summary["p99_back_within_goal_after_s"] = recovery
    return summary


def _intake(fleet: Fleet) -> str:
    intake = fleet.scenario.intake
    if intake.mode == "share":
        return "share, affinity" if intake.affinity else "share"
    return f"partition ({intake.partitions}), {intake.routing}"


def _percentile(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values.size else None


def _share(condition: np.ndarray, values: np.ndarray) -> float:
    known = ~np.isnan(values)
    return round(float(condition[known].mean()), 4) if known.any() else 0.0


def _gpu_busy_s(fleet: Fleet) -> float:
    return float(fleet.recorder.running.sum())


def _recovery_after_step(fleet: Fleet) -> tuple[int, int | None] | None:
    """For a step up: seconds from the step until each later minute's p99 is within the goal."""
    steps = [c for c in fleet.scenario.traffic.components if isinstance(c, StepChange) and c.after > c.before]
    if not steps:
        return None
    at = int(steps[0].at_s)
    p99 = fleet.recorder.minute_e2e[:, 1]
    first = at // 60
    if first >= len(p99):
        return None  # the step is past the simulated time
    bad = [m for m in range(first, len(p99)) if not (p99[m] <= fleet.scenario.latency_goal_s)]
    if not bad:
        return at, 0
    last_bad = bad[-1]
    if last_bad >= len(p99) - 1:
        return at, None  # never back within the goal in the simulated time
    return at, int(math.ceil((last_bad + 1) * 60 - at))
