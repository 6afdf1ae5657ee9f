"""The simulator on a background thread with its own event loop: for tests, benchmarks and demos
that need a real HTTP endpoint inside the current process.

    with SimulatorThread(SimOptions(step_latency_s=0.01)) as sim:
        urllib.request.urlopen(f"{sim.url}/sdapi/v1/sd-models")
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading

from aiohttp import web

from sdagent.sim.engine import Engine, ExitProcess
from sdagent.sim.options import SimOptions
from sdagent.sim.server import ENGINE, build_app, serve

START_TIMEOUT_S = 10.0


class SimulatorThread:
    """Start with ``start()`` (or ``with``); ``url`` is valid once started. ``port=0`` picks a free port."""

    def __init__(
        self,
        options: SimOptions,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        exit_process: ExitProcess = os._exit,
    ) -> None:
        self._options = options
        self._host = host
        self._port = port
        self._exit_process = exit_process
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._app: web.Application | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the simulator is not started")
        return f"http://{self._host}:{self.port}"

    @property
    def engine(self) -> Engine:
        """The engine, for assertions; read it only, from the test thread."""
        if self._app is None:
            raise RuntimeError("the simulator is not started")
        return self._app[ENGINE]

    def start(self) -> SimulatorThread:
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, args=(started,), name="sdagent-sim", daemon=True)
        self._thread.start()
        self.port = started.result(timeout=START_TIMEOUT_S)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        future.result(timeout=START_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=START_TIMEOUT_S)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self, started: concurrent.futures.Future[int]) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            port = self._loop.run_until_complete(self._startup())
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            started.set_exception(exc)
            return
        started.set_result(port)
        self._loop.run_forever()

    async def _startup(self) -> int:
        self._app = build_app(self._options, exit_process=self._exit_process)
        self._runner, port = await serve(self._app, self._host, self._port)
        return port

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
