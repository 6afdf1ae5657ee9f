"""The report directory: one PNG per question, and the summary as text and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a build machine

import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)
import numpy as np  # noqa: E402

from sdagent.fleetsim.instance import State  # noqa: E402
from sdagent.fleetsim.recorder import Recorder  # noqa: E402


def write(directory: Path, recorder: Recorder, summary: dict[str, Any]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    minutes = np.arange(recorder.minute_e2e.shape[0])
    written = []
    for name, draw in PLOTS.items():
        figure, axes = plt.subplots(figsize=(10, 4), layout="constrained")
        draw(axes, recorder, minutes, summary)
        axes.set_xlabel("minutes")
        axes.grid(alpha=0.3)
        axes.set_title(f"{summary['scenario']}: {axes.get_title()}")
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (directory / "summary.txt").write_text(text(summary))
    return written + [directory / "summary.json", directory / "summary.txt"]


def text(summary: dict[str, Any]) -> str:
    width = max(len(key) for key in summary)
    lines = []
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines) + "\n"


def _per_minute(series: np.ndarray, how: str = "mean") -> np.ndarray:
    usable = series[: len(series) // 60 * 60].reshape(-1, 60)
    return usable.max(axis=1) if how == "max" else usable.mean(axis=1)


def _throughput(axes: Any, r: Recorder, minutes: np.ndarray, _: dict[str, Any]) -> None:
    offered, served = _per_minute(r.arrived.astype(float)), _per_minute(r.served.astype(float))
    axes.plot(minutes[: len(offered)], offered, label="offered jobs/s")
    axes.plot(minutes[: len(served)], served, label="served jobs/s")
    axes.set_title("offered vs served")
    axes.legend()


def _instances(axes: Any, r: Recorder, minutes: np.ndarray, _: dict[str, Any]) -> None:
    for state in (State.PENDING, State.BOOTING, State.READY, State.DRAINING, State.STOPPED, State.PREPARING):
        series = _per_minute(r.states[state].astype(float))
        if series.any():
            axes.plot(minutes[: len(series)], series, label=state.value)
    axes.set_title("instances")
    axes.legend()


def _queue(axes: Any, r: Recorder, minutes: np.ndarray, _: dict[str, Any]) -> None:
    waiting = _per_minute(r.waiting.astype(float), "max")
    axes.plot(minutes[: len(waiting)], waiting, label="jobs waiting (max in the minute)")
    axes.set_title("queue depth")
    axes.legend()


def _latency(axes: Any, r: Recorder, minutes: np.ndarray, summary: dict[str, Any]) -> None:
    axes.plot(minutes, r.minute_e2e[:, 0], label="p50 end to end")
    axes.plot(minutes, r.minute_e2e[:, 1], label="p99 end to end")
    axes.axhline(summary["latency_goal_s"], color="grey", linestyle="--", label="goal")
    axes.set_yscale("log")
    axes.set_ylabel("seconds")
    axes.set_title(f"latency of the {summary['latency_of']} jobs answered each minute")
    axes.legend()


def _cost(axes: Any, r: Recorder, minutes: np.ndarray, summary: dict[str, Any]) -> None:
    cost = r.cost[59::60]
    axes.plot(minutes[: len(cost)], cost, label="cumulative $")
    axes.set_title(f"cost (prices as of {summary['prices_as_of']})")
    axes.legend()


PLOTS = {"throughput": _throughput, "instances": _instances, "queue": _queue, "latency": _latency, "cost": _cost}
