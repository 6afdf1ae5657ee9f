"""Counters of what the simulator was asked and did, served by ``GET /sim/stats`` for tests."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stats:
    """Plain counters; the server runs on one event loop, so no lock is needed."""

    requests: collections.Counter[str] = field(default_factory=collections.Counter)  # "GET /route"
    events: collections.Counter[str] = field(default_factory=collections.Counter)  # "model_loads", ...

    def request(self, method: str, route: str) -> None:
        self.requests[f"{method} {route}"] += 1

    def count(self, event: str, n: int = 1) -> None:
        self.events[event] += n

    def reset(self) -> None:
        self.requests.clear()
        self.events.clear()

    def snapshot(self) -> dict[str, Any]:
        return {"requests": dict(self.requests), "events": dict(self.events)}
