"""One aiohttp server on one port speaking both WebUI APIs, plus the simulator's ``/sim`` routes.

``build_app`` assembles it; ``serve`` starts it on an event loop already running (tests, the
thread harness); ``run`` is the blocking entry point ``sdagent sim`` calls.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import web

from sdagent.sim import a1111_schema
from sdagent.sim.a1111 import A1111Api
from sdagent.sim.catalog import Checkpoint
from sdagent.sim.comfy_exec import ComfyBehaviour
from sdagent.sim.comfy_nodes import Dirs
from sdagent.sim.comfyui import INTERNAL_ERROR, ComfyApi
from sdagent.sim.control import ControlApi
from sdagent.sim.engine import Engine, ExitProcess
from sdagent.sim.faults import Api, FaultKind
from sdagent.sim.options import SimOptions

log = structlog.get_logger(__name__, simulator=True)

# ComfyUI's default --max-upload-size is 100 MB; A1111 takes base64 init images of any size.
MAX_BODY_BYTES = 100 * 1024 * 1024
GENERATION_ROUTES = frozenset({"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/prompt", "/api/prompt"})

ENGINE = web.AppKey("engine", Engine)
A1111 = web.AppKey("a1111", A1111Api)
COMFYUI = web.AppKey("comfyui", ComfyApi)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(
    options: SimOptions, *, engine: Engine | None = None, exit_process: ExitProcess = os._exit
) -> web.Application:
    """The simulator's application; ``engine`` and ``exit_process`` are seams for tests."""
    engine = engine or Engine.from_options(options, exit_process=exit_process)
    data_dir = options.data_dir or Path(tempfile.mkdtemp(prefix="sdagent-sim-"))
    a1111 = A1111Api(engine)
    comfy = ComfyApi(engine, Dirs(data_dir), ComfyBehaviour(options.history_delay_s, options.previews))
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[_a1111_error_shapes, _counted(engine), _faulty(engine)],
    )
    app[ENGINE], app[A1111], app[COMFYUI] = engine, a1111, comfy
    app.add_routes([web.get("/", _index), *a1111.routes(), *comfy.routes(), *ControlApi(engine).routes()])

    initial: list[asyncio.Task[None]] = []

    async def on_startup(app: web.Application) -> None:
        comfy.start()
        checkpoint = _initial_checkpoint(engine, options)
        if checkpoint is not None:
            a1111.select_initial(checkpoint)
            # A1111 loads its model at start-up while the API already answers (--nowebui).
            initial.append(asyncio.create_task(a1111.load_initial(checkpoint), name="sim-initial-load"))

    async def on_shutdown(app: web.Application) -> None:
        # Before connections close: aiohttp would otherwise wait for open websockets to end.
        await comfy.hub.close_all()

    async def on_cleanup(app: web.Application) -> None:
        for task in initial:
            task.cancel()
        await asyncio.gather(*initial, return_exceptions=True)
        await comfy.stop()
        if options.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


async def serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start ``app`` on the running loop; returns the runner (to clean up) and the bound port."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    engine = app[ENGINE]
    log.warning(
        "sim.started",
        note="SIMULATED WebUI: AUTOMATIC1111 and ComfyUI APIs, no model, no GPU",
        url=f"http://{host}:{bound}",
        models=engine.catalog.names(),
        step_latency_s=engine.step_latency_s,
        vram_total_mb=engine.vram_total_mb,
        faults=engine.faults.armed(),
    )
    return runner, bound


def run(host: str, port: int, options: SimOptions) -> None:
    """Serve until SIGINT or SIGTERM; this is the process's entry, so it owns the signal handlers."""
    asyncio.run(_run_until_signalled(host, port, options))


async def _run_until_signalled(host: str, port: int, options: SimOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner, _ = await serve(build_app(options), host, port)
    try:
        await stop.wait()
    finally:
        log.info("sim.stopping")
        await runner.cleanup()


def _initial_checkpoint(engine: Engine, options: SimOptions) -> Checkpoint | None:
    if options.initial_model is None:
        return None
    if options.initial_model:
        return engine.catalog.get(options.initial_model)
    checkpoints = engine.catalog.all()
    return checkpoints[0] if checkpoints else None


async def _index(request: web.Request) -> web.Response:
    return web.Response(text="sdagent WebUI simulator: AUTOMATIC1111 (/sdapi/v1) and ComfyUI APIs, simulated\n")


def _api_of(path: str) -> Api | None:
    if path.startswith("/sim/"):
        return None
    return Api.A1111 if path.startswith("/sdapi/") else Api.COMFYUI


@web.middleware
async def _a1111_error_shapes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A1111 (FastAPI) answers unknown routes in JSON and turns handler exceptions into its error body."""
    if not request.path.startswith("/sdapi/"):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return web.json_response({"detail": "Not Found"}, status=404)
    except web.HTTPMethodNotAllowed:
        return web.json_response({"detail": "Method Not Allowed"}, status=405)
    except web.HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - A1111's middleware answers every exception this way
        log.exception("sim.a1111_handler_failed")
        return a1111_schema.error_response(500, type(exc).__name__, errors=str(exc))


def _counted(engine: Engine) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/sim/"):
            resource = request.match_info.route.resource
            engine.stats.request(request.method, resource.canonical if resource else request.path)
        return await handler(request)

    return count


def _faulty(engine: Engine) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def inject(request: web.Request, handler: Handler) -> web.StreamResponse:
        api = _api_of(request.path)
        if api is None:
            return await handler(request)
        starts_generation = request.method == "POST" and request.path in GENERATION_ROUTES
        fault = engine.faults.take_http(api, starts_generation=starts_generation)
        if fault is None:
            return await handler(request)
        log.info("sim.fault_injected", fault=fault.kind.value, api=api.value, path=request.path)
        if fault.kind is FaultKind.SLOW:
            await asyncio.sleep(fault.delay_s)
            return await handler(request)
        if api is Api.A1111:
            return a1111_schema.error_response(
                fault.status, "RuntimeError", errors="simulated server error (injected fault)"
            )
        return web.Response(status=fault.status, text=INTERNAL_ERROR)

    return inject
