"""The ComfyUI API on the simulated engine, each route also under ``/api`` as ``server.py`` adds them.

Shapes follow ``server.py``: ``POST /prompt`` validates and queues (400 ``{error, node_errors}``
when no output validates), ``/history/{id}`` is empty until the prompt finished, ``/view`` serves
files of the input/output/temp dirs, ``/upload/image`` stores into the input dir, ``/free`` is
applied between prompts.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import os
import sys
import uuid
from typing import Any

import psutil
import structlog
from aiohttp import web

from sdagent.sim.comfy_exec import ComfyBehaviour, Executor, PromptQueue, QueueItem
from sdagent.sim.comfy_nodes import Dirs, registry
from sdagent.sim.comfy_validate import validate_prompt
from sdagent.sim.comfy_ws import SocketHub
from sdagent.sim.engine import Engine
from sdagent.sim.faults import Api

log = structlog.get_logger(__name__, simulator=True)

COMFYUI_VERSION = "0.3.60-simulated"
# What 0.3.64's requirements.txt pins (comfyui-frontend-package, comfyui-workflow-templates).
FRONTEND_VERSION, TEMPLATES_VERSION = "1.27.10", "0.1.95"
DEVICE_NAME = "SIMULATED"  # /system_stats device name: nobody mistakes the simulator for a GPU
MIB = 1024 * 1024
# The folders /models lists (folder_paths.folder_names_and_paths); only checkpoints has files here.
MODEL_FOLDERS = ("checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
                 "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models",
                 "hypernetworks", "photomaker", "classifiers")  # fmt: skip
INTERNAL_ERROR = "500 Internal Server Error\n\nServer got itself in trouble"  # aiohttp's default body


class ComfyApi:
    """Handlers of the ComfyUI routes; ``start()``/``stop()`` run the prompt worker."""

    def __init__(self, engine: Engine, dirs: Dirs, behaviour: ComfyBehaviour | None = None) -> None:
        self.engine = engine
        self.dirs = dirs
        self.nodes = registry()
        self.queue = PromptQueue()
        self.hub = SocketHub(self.queue.info)
        self.executor = Executor(engine, self.nodes, dirs, self.queue, self.hub, behaviour or ComfyBehaviour())
        self._number = 0
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.dirs.create()
        self._worker = asyncio.create_task(self.executor.worker(), name="sim-comfyui-worker")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    def routes(self) -> list[web.RouteDef]:
        table = [
            ("GET", "/ws", self.hub.handle),
            ("POST", "/prompt", self.post_prompt),
            ("GET", "/prompt", self.get_prompt),
            ("GET", "/queue", self.get_queue),
            ("POST", "/queue", self.post_queue),
            ("GET", "/history", self.get_history),
            ("GET", "/history/{prompt_id}", self.get_history_item),
            ("POST", "/history", self.post_history),
            ("POST", "/interrupt", self.interrupt),
            ("POST", "/free", self.free),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/object_info", self.object_info),
            ("GET", "/object_info/{node_class}", self.object_info_node),
            ("GET", "/models", self.model_folders),
            ("GET", "/models/{folder}", self.models),
            ("GET", "/embeddings", self.empty_list),
            ("GET", "/extensions", self.empty_list),
            ("POST", "/upload/image", self.upload_image),
            ("GET", "/view", self.view),
        ]
        return [web.route(method, prefix + path, handler) for prefix in ("/api", "") for method, path, handler in table]

    # --- prompts ---

    async def post_prompt(self, request: web.Request) -> web.Response:
        try:
            document = await request.json()
        except ValueError:
            return web.Response(status=500, text=INTERNAL_ERROR)
        if not isinstance(document, dict):
            return web.Response(status=500, text=INTERNAL_ERROR)
        number = self._next_number(document)
        if "prompt" not in document:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = document["prompt"]
        self.engine.catalog.refresh_if_changed()
        validation = validate_prompt(prompt, self.nodes, self.engine.catalog, self.dirs)
        if not validation.ok:
            log.info("sim.comfy_prompt_invalid", error=validation.error)
            return web.json_response({"error": validation.error, "node_errors": validation.node_errors}, status=400)
        extra_data = dict(document.get("extra_data") or {})
        if "client_id" in document:
            extra_data["client_id"] = document["client_id"]
        prompt_id = str(document.get("prompt_id") or uuid.uuid4())
        self.queue.put(QueueItem(number, prompt_id, prompt, extra_data, validation.outputs))
        await self.hub.send_status()
        log.info("sim.comfy_prompt_queued", prompt_id=prompt_id, number=number, outputs=validation.outputs)
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": validation.node_errors})

    def _next_number(self, document: dict[str, Any]) -> float | int:
        if "number" in document:
            return float(document["number"])
        number = -self._number if document.get("front") else self._number
        self._number += 1
        return number

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self.queue.info())

    async def get_queue(self, request: web.Request) -> web.Response:
        return web.json_response(self.queue.snapshot())

    async def post_queue(self, request: web.Request) -> web.Response:
        document = await _json_or_empty(request)
        if document.get("clear"):
            self.queue.wipe()
        if "delete" in document:
            self.queue.delete(list(document["delete"]))
        await self.hub.send_status()
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        max_items = request.query.get("max_items")
        return web.json_response(self.queue.get_history(max_items=int(max_items) if max_items else None))

    async def get_history_item(self, request: web.Request) -> web.Response:
        return web.json_response(self.queue.get_history(prompt_id=request.match_info["prompt_id"]))

    async def post_history(self, request: web.Request) -> web.Response:
        document = await _json_or_empty(request)
        if document.get("clear"):
            self.queue.history.clear()
        for prompt_id in document.get("delete", []):
            self.queue.history.pop(prompt_id, None)
        return web.Response(status=200)

    async def interrupt(self, request: web.Request) -> web.Response:
        document = await _json_or_empty(request)
        wanted = document.get("prompt_id")
        running = self.queue.running
        if wanted is None or (running is not None and running.prompt_id == wanted):
            self.engine.interrupt(Api.COMFYUI)
        return web.Response(status=200)

    async def free(self, request: web.Request) -> web.Response:
        document = await _json_or_empty(request)
        for flag in ("unload_models", "free_memory"):
            if document.get(flag):
                self.queue.set_flag(flag, document[flag])
        return web.Response(status=200)

    # --- system, nodes, models ---

    async def system_stats(self, request: web.Request) -> web.Response:
        engine = self.engine
        memory = psutil.virtual_memory()
        vram_total, vram_free = int(engine.vram_total_mb * MIB), int(engine.vram_free_mb * MIB)
        return web.json_response(
            {
                "system": {
                    "os": os.name,
                    "ram_total": memory.total,
                    "ram_free": memory.available,
                    "comfyui_version": COMFYUI_VERSION,
                    "required_frontend_version": FRONTEND_VERSION,
                    "installed_templates_version": TEMPLATES_VERSION,
                    "required_templates_version": TEMPLATES_VERSION,
                    "python_version": sys.version,
                    "pytorch_version": "simulated",
                    "embedded_python": False,
                    "argv": sys.argv,
                },
                "devices": [
                    {
                        "name": DEVICE_NAME,
                        "type": "cuda",
                        "index": 0,
                        "vram_total": vram_total,
                        "vram_free": vram_free,
                        "torch_vram_total": vram_total,
                        "torch_vram_free": vram_free,
                    }
                ],
            }
        )

    async def object_info(self, request: web.Request) -> web.Response:
        self.engine.catalog.refresh_if_changed()
        return web.json_response({name: node.info(self.engine.catalog, self.dirs) for name, node in self.nodes.items()})

    async def object_info_node(self, request: web.Request) -> web.Response:
        self.engine.catalog.refresh_if_changed()
        node = self.nodes.get(request.match_info["node_class"])
        return web.json_response({node.name: node.info(self.engine.catalog, self.dirs)} if node else {})

    async def model_folders(self, request: web.Request) -> web.Response:
        return web.json_response(list(MODEL_FOLDERS))

    async def models(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in MODEL_FOLDERS:
            return web.Response(status=404)
        self.engine.catalog.refresh_if_changed()
        return web.json_response(self.engine.catalog.names() if folder == "checkpoints" else [])

    async def empty_list(self, request: web.Request) -> web.Response:
        return web.json_response([])

    # --- files ---

    async def upload_image(self, request: web.Request) -> web.Response:
        post = await request.post()
        image = post.get("image")
        if not isinstance(image, web.FileField) or not image.filename:
            return web.Response(status=400)
        folder = self.dirs.by_type(str(post.get("type") or "input"))
        if folder is None:
            return web.Response(status=400)
        subfolder = str(post.get("subfolder", ""))
        target_dir = (folder / os.path.normpath(subfolder)).resolve() if subfolder else folder.resolve()
        path = (target_dir / image.filename).resolve()
        if os.path.commonpath((folder.resolve(), path)) != str(folder.resolve()):
            return web.Response(status=400)
        data = image.file.read()
        overwrite = str(post.get("overwrite", "")).lower() in ("true", "1")
        path = await asyncio.to_thread(_store_upload, target_dir, path, data, overwrite)
        kind = str(post.get("type") or "input")
        log.info("sim.comfy_uploaded", name=path.name, subfolder=subfolder, type=kind, bytes=len(data))
        return web.json_response({"name": path.name, "subfolder": subfolder, "type": kind})

    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        if "filename" not in query:
            return web.Response(status=404)
        kind, filename = self.dirs.split_annotation(query["filename"])
        if not filename or filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        folder = self.dirs.by_type(kind or query.get("type", "output"))
        if folder is None:
            return web.Response(status=400)
        if "subfolder" in query:
            full = (folder / query["subfolder"]).resolve()
            if os.path.commonpath((full, folder.resolve())) != str(folder.resolve()):
                return web.Response(status=403)
            folder = full
        path = folder / os.path.basename(filename)
        if not path.is_file():
            return web.Response(status=404)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        headers = {"Content-Disposition": f'filename="{path.name}"', "Content-Type": content_type}
        return web.FileResponse(path, headers=headers)


def _store_upload(target_dir: Any, path: Any, data: bytes, overwrite: bool) -> Any:
    """Write an upload; an existing name gets " (1)", " (2)" ... unless its content is identical."""
    target_dir.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        stem, suffix, counter = path.stem, path.suffix, 1
        while path.exists() and path.read_bytes() != data:
            path = path.with_name(f"{stem} ({counter}){suffix}")
            counter += 1
    path.write_bytes(data)
    return path


async def _json_or_empty(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        document = json.loads(await request.read() or b"{}")
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}
