"""Simulator-only routes under ``/sim``: arm and clear faults, read and reset counters.

* ``GET /sim/faults`` -> ``{armed: [fault...], fired: {kind: n}}``
* ``POST /sim/faults`` ``{kind, count?, api?, scope?, status?, delay_s?}`` -> 200 ``{armed}``, 400 ``{error}``
* ``DELETE /sim/faults`` -> disarm everything
* ``GET /sim/stats`` -> request and event counters plus the engine's state
* ``DELETE /sim/stats`` -> reset the counters
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from aiohttp import web

from sdagent.sim.engine import Engine
from sdagent.sim.faults import Fault

log = structlog.get_logger(__name__, simulator=True)


class ControlApi:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/sim/faults", self.get_faults),
            web.post("/sim/faults", self.arm_fault),
            web.delete("/sim/faults", self.clear_faults),
            web.get("/sim/stats", self.get_stats),
            web.delete("/sim/stats", self.reset_stats),
        ]

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self._faults())

    async def arm_fault(self, request: web.Request) -> web.Response:
        try:
            document = json.loads(await request.read())
            if not isinstance(document, dict):
                raise ValueError("the body must be a JSON object")
            fault = Fault.from_dict(document)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.engine.faults.arm(fault)
        log.info("sim.fault_armed", **fault.to_dict())
        return web.json_response(self._faults())

    async def clear_faults(self, request: web.Request) -> web.Response:
        self.engine.faults.clear()
        log.info("sim.faults_cleared")
        return web.json_response(self._faults())

    async def get_stats(self, request: web.Request) -> web.Response:
        engine = self.engine
        snapshot = engine.stats.snapshot()
        snapshot.update(
            faults_fired=dict(engine.faults.fired),
            loaded_model=engine.loaded.name if engine.loaded else None,
            loading_model=engine.loading.name if engine.loading else None,
            busy=engine.busy,
            vram_used_mb=engine.vram_used_mb,
            vram_total_mb=engine.vram_total_mb,
            oom_events=engine.oom_events,
            simulator=True,
        )
        return web.json_response(snapshot)

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.engine.stats.reset()
        self.engine.faults.fired.clear()
        return web.json_response({})

    def _faults(self) -> dict[str, Any]:
        return {"armed": self.engine.faults.armed(), "fired": dict(self.engine.faults.fired)}
