"""The AUTOMATIC1111 API (``/sdapi/v1/...``) on the simulated engine.

Behaviour follows ``modules/api/api.py``, ``modules/processing.py`` and ``modules/shared_state.py``:
every generation and model change holds one lock; ``/progress`` answers from the shared state while
a job runs; ``/interrupt`` and ``/skip`` are checked between steps and an interrupted job still
answers 200 with the images of the batch it was in; a checkpoint override with
``override_settings_restore_afterwards`` restores the option but not the weights, so the next job
pays the switch back (``process_images`` reloads whatever the option names).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psutil
import structlog
from aiohttp import web

from sdagent.errors import SdagentError
from sdagent.sim import a1111_schema as schema
from sdagent.sim.catalog import Checkpoint
from sdagent.sim.engine import Engine, Generation, Outcome, SimulatedOOM
from sdagent.sim.faults import Api
from sdagent.sim.render import Blended, Drawn, Loaded, Picture, b64, decode_base64_image, prompt_key

log = structlog.get_logger(__name__, simulator=True)

VERSION = "v1.10.1-simulated"  # what infotexts and info.version say; marks every output as simulated
MIB = 1024 * 1024
EMPTY_INIT_IMAGES = "Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: [0]"


class NoCheckpoint(SdagentError):
    """Raised when no checkpoint can be loaded at all (A1111 raises FileNotFoundError)."""


@dataclass
class State:
    """A1111's ``shared.state``: what ``/progress`` reports."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    job_timestamp: str = "0"
    sampling_step: int = 0
    sampling_steps: int = 0
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    time_start: float = 0.0
    textinfo: str | None = None
    preview: Picture | None = None  # the live preview /progress sends unless skip_current_image

    def begin(self, job: str, now: float) -> None:
        self.job, self.job_count, self.job_no = job, -1, 0  # -1 until the job knows its batch count
        # sampling_steps keeps the last job's value until sampling starts, as A1111's does.
        self.sampling_step = 0
        self.skipped = self.interrupted = self.stopping_generation = False
        self.job_timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
        self.time_start, self.textinfo, self.preview = now, None, None

    def end(self) -> None:
        # Idle: job_no past the last batch, step back to 0, steps still the last job's.
        self.job_no, self.sampling_step = max(self.job_count, 1), 0
        self.job, self.job_count, self.preview = "", 0, None

    def as_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": self.stopping_generation,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }


class A1111Api:
    """Handlers of the A1111 routes; ``wall_clock`` is the seam for ``/progress`` ETAs."""

    def __init__(self, engine: Engine, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.state = State()
        self._wall_clock = wall_clock
        first = engine.catalog.all()
        self.opts: dict[str, Any] = {
            "sd_model_checkpoint": first[0].title if first else None,
            "sd_checkpoint_hash": first[0].sha256 if first else None,
            "sd_checkpoints_limit": 1,
            "sd_checkpoints_keep_in_cpu": True,
            "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1,
            "samples_format": "png",
            "live_previews_enable": True,
            "show_progress_every_n_steps": 10,
            "eta_noise_seed_delta": 0,
        }

    def select_initial(self, checkpoint: Checkpoint) -> None:
        """Name the model the server loads at start-up in the options, as A1111's start does."""
        self.opts["sd_model_checkpoint"] = checkpoint.title

    async def load_initial(self, checkpoint: Checkpoint) -> None:
        """Load the start-up model under the lock, so a first txt2img waits for it as in A1111."""
        async with self.engine.exclusive():
            try:
                await self._sync_model()
            except (SimulatedOOM, NoCheckpoint) as exc:
                log.error("sim.initial_load_failed", model=checkpoint.name, error=str(exc))

    def routes(self) -> list[web.RouteDef]:
        prefix = "/sdapi/v1"
        return [
            web.post(f"{prefix}/txt2img", self.txt2img),
            web.post(f"{prefix}/img2img", self.img2img),
            web.get(f"{prefix}/progress", self.progress),
            web.post(f"{prefix}/interrupt", self.interrupt),
            web.post(f"{prefix}/skip", self.skip),
            web.get(f"{prefix}/options", self.get_options),
            web.post(f"{prefix}/options", self.set_options),
            web.get(f"{prefix}/cmd-flags", self.cmd_flags),
            web.get(f"{prefix}/samplers", self.samplers),
            web.get(f"{prefix}/schedulers", self.schedulers),
            web.get(f"{prefix}/sd-models", self.sd_models),
            web.post(f"{prefix}/refresh-checkpoints", self.refresh_checkpoints),
            web.post(f"{prefix}/unload-checkpoint", self.unload_checkpoint),
            web.post(f"{prefix}/reload-checkpoint", self.reload_checkpoint),
            web.get(f"{prefix}/memory", self.memory),
        ]

    # --- generation ---

    async def txt2img(self, request: web.Request) -> web.Response:
        return await self._generate(request, schema.Txt2ImgRequest, "scripts_txt2img")

    async def img2img(self, request: web.Request) -> web.Response:
        return await self._generate(request, schema.Img2ImgRequest, "scripts_img2img")

    async def _generate(self, request: web.Request, model: type[schema.GenerationRequest], job: str) -> web.Response:
        parsed = await schema.parse_request(request, model)
        if isinstance(parsed, web.Response):
            return parsed
        resolved = schema.resolve_sampler(parsed.sampler_name or parsed.sampler_index, parsed.scheduler)
        if (failure := _pipeline_error(parsed)) is not None:
            return failure
        init: list[Loaded] | None = None
        if isinstance(parsed, schema.Img2ImgRequest):
            if parsed.init_images is None:
                return schema.http_exception(404, "Init image not found")
            if not parsed.init_images:  # an empty list reaches the VAE encoder
                return schema.error_response(500, "RuntimeError", errors=EMPTY_INIT_IMAGES)
            try:
                init = [Loaded(decode_base64_image(text)) for text in parsed.init_images]
            except ValueError:
                return schema.http_exception(500, "Invalid encoded image")
        async with self.engine.exclusive():
            return await self._run(parsed, resolved, init, job)

    async def _run(
        self, req: schema.GenerationRequest, sampler: tuple[str, str | None], init: list[Loaded] | None, job: str
    ) -> web.Response:
        generation = self.engine.begin(Api.A1111)
        self.state.begin(job, self._wall_clock())
        stored = self._apply_overrides(req.override_settings or {})
        try:
            checkpoint = await self._sync_model()
            with self.engine.working_memory(req.width, req.height, req.batch_size):
                body = await self._sample(req, sampler, init, checkpoint, generation)
        except SimulatedOOM as exc:
            log.info("sim.a1111_oom", message=str(exc))
            return schema.error_response(500, "OutOfMemoryError", errors=str(exc))
        except NoCheckpoint as exc:
            return schema.error_response(500, "FileNotFoundError", errors=str(exc))
        finally:
            if req.override_settings_restore_afterwards:
                self.opts.update(stored)
            self.state.end()
            self.engine.end(generation)
        return web.json_response(body)

    def _apply_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Set per-request options; returns the values to restore. An unknown checkpoint is dropped."""
        stored = {key: self.opts.get(key) for key in overrides}
        for key, value in overrides.items():
            if key == "sd_model_checkpoint":
                checkpoint = self.engine.catalog.resolve(value)
                if checkpoint is None:
                    continue  # process_images pops an unknown override and keeps the current model
                value = checkpoint.title
            self.opts[key] = value
        return stored

    async def _sync_model(self) -> Checkpoint:
        """Load what ``sd_model_checkpoint`` names (``reload_model_weights``); hold the lock."""
        catalog = self.engine.catalog
        checkpoint = catalog.resolve(self.opts.get("sd_model_checkpoint"))
        if checkpoint is None:
            if not catalog.all():
                raise NoCheckpoint("No checkpoints found. When searching for checkpoints, looked at the models dir")
            checkpoint = catalog.all()[0]  # A1111 falls back to the first checkpoint it knows
        await self.engine.ensure_loaded(checkpoint)
        checkpoint.hashed = catalog.hashing  # A1111 hashes a new file in full on its first load
        self.opts["sd_model_checkpoint"] = checkpoint.title
        self.opts["sd_checkpoint_hash"] = checkpoint.sha256
        return checkpoint

    async def _sample(
        self,
        req: schema.GenerationRequest,
        sampler: tuple[str, str | None],
        init: list[Loaded] | None,
        checkpoint: Checkpoint,
        generation: Generation,
    ) -> dict[str, Any]:
        seed = req.seed if req.seed != -1 else self.engine.random_seed()
        subseed = req.subseed if req.subseed != -1 else self.engine.random_seed()
        total = req.n_iter * req.batch_size
        # A variation seed (subseed_strength > 0) keeps the main seed for every image.
        all_seeds = [seed + (index if req.subseed_strength == 0 else 0) for index in range(total)]
        all_subseeds = [subseed + index for index in range(total)]
        steps = _effective_steps(req)
        key = prompt_key(req.prompt, req.negative_prompt)
        images: list[str] = []
        produced = 0
        self.state.job_count = req.n_iter
        for batch in range(req.n_iter):
            if generation.skipped:
                generation.clear_skip()
                self.state.skipped = False
            if generation.interrupted:
                break
            self.state.job_no, self.state.sampling_step, self.state.sampling_steps = batch, 0, steps
            seeds = all_seeds[batch * req.batch_size : (batch + 1) * req.batch_size]
            pictures = [_picture(req, init, item_seed, key, index) for index, item_seed in enumerate(seeds)]
            self.state.preview = _preview(pictures[0])
            outcome = await self.engine.run_steps(generation, steps, self._on_step)
            if req.send_images:
                images += await asyncio.to_thread(_encoded_batch, pictures)
            produced += len(pictures)
            if outcome is Outcome.INTERRUPTED:
                break
        log.info(
            "sim.a1111_generated",
            job=self.state.job,
            model=checkpoint.name,
            seed=seed,
            images=produced,
            interrupted=generation.interrupted,
            ms=round((self.engine.clock() - generation.started) * 1000, 1),
        )
        info = self._info(req, sampler, checkpoint, seed, subseed, all_seeds, all_subseeds, produced)
        return {"images": images, "parameters": _parameters(req), "info": json.dumps(info)}

    async def _on_step(self, step: int, steps: int) -> None:
        self.state.sampling_step = step

    def _info(
        self,
        req: schema.GenerationRequest,
        sampler: tuple[str, str | None],
        checkpoint: Checkpoint,
        seed: int,
        subseed: int,
        all_seeds: list[int],
        all_subseeds: list[int],
        produced: int,
    ) -> dict[str, Any]:
        """``Processed.js()``: the generation's facts, sent as a JSON string in ``info``."""
        total = len(all_seeds)
        denoising = getattr(req, "denoising_strength", None) if isinstance(req, schema.Img2ImgRequest) else None
        infotexts = [_infotext(req, sampler, checkpoint, all_seeds[index], denoising) for index in range(produced)]
        return {
            "prompt": req.prompt,
            "all_prompts": [req.prompt] * total,
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * total,
            "seed": seed,
            "all_seeds": all_seeds,
            "subseed": subseed,
            "all_subseeds": all_subseeds,
            "subseed_strength": req.subseed_strength,
            "width": req.width,
            "height": req.height,
            "sampler_name": sampler[0],
            "cfg_scale": req.cfg_scale,
            "steps": req.steps,
            "batch_size": req.batch_size,
            "restore_faces": bool(req.restore_faces),
            "face_restoration_model": None,
            "sd_model_name": checkpoint.name_for_extra,
            "sd_model_hash": checkpoint.shorthash,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": req.seed_resize_from_w,
            "seed_resize_from_h": req.seed_resize_from_h,
            "denoising_strength": denoising,
            "extra_generation_params": _extra_generation_params(sampler, denoising),
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": req.styles or [],
            "job_timestamp": self.state.job_timestamp,
            "clip_skip": self.opts.get("CLIP_stop_at_last_layers", 1),
            "is_using_inpainting_conditioning": False,
            "version": VERSION,
            "simulator": True,
        }

    # --- progress and control ---

    async def progress(self, request: web.Request) -> web.Response:
        state = self.state
        skip_image = request.query.get("skip_current_image", "false").lower() in ("1", "true", "yes", "on")
        body: dict[str, Any] = {
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": state.as_dict(),
            "current_image": None,
            "textinfo": state.textinfo,
        }
        if state.job_count == 0:
            return web.json_response(body)
        progress = 0.01  # A1111 starts at 0.01 so the ETA never divides by zero
        if state.job_count > 0:
            progress += state.job_no / state.job_count
            if state.sampling_steps > 0:
                progress += state.sampling_step / state.sampling_steps / state.job_count
        elapsed = self._wall_clock() - state.time_start
        body["eta_relative"] = elapsed / progress - elapsed
        body["progress"] = min(progress, 1.0)
        if not skip_image and state.preview is not None and state.sampling_step > 0:
            body["current_image"] = b64(await asyncio.to_thread(state.preview.png))
        return web.json_response(body)

    async def interrupt(self, request: web.Request) -> web.Response:
        self.state.interrupted = True
        self.engine.interrupt(Api.A1111)
        return web.json_response({})

    async def skip(self, request: web.Request) -> web.Response:
        self.state.skipped = True
        self.engine.skip(Api.A1111)
        return web.json_response(None)

    # --- options and models ---

    async def get_options(self, request: web.Request) -> web.Response:
        return web.json_response(self.opts)

    async def set_options(self, request: web.Request) -> web.Response:
        try:
            document = json.loads(await request.read())
        except ValueError as exc:
            return schema.unprocessable([{"loc": ["body", 0], "msg": str(exc), "type": "value_error.jsondecode"}])
        if not isinstance(document, dict):
            return schema.unprocessable(
                [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]
            )
        name = document.get("sd_model_checkpoint")
        if name is not None and self.engine.catalog.resolve(name) is None:
            return schema.error_response(500, "RuntimeError", errors=f"model {name!r} not found")
        async with self.engine.exclusive():  # the option's onchange waits for a running job
            self.opts.update(document)
            if name is not None:
                try:
                    await self._sync_model()
                except SimulatedOOM as exc:
                    return schema.error_response(500, "OutOfMemoryError", errors=str(exc))
        return web.json_response(None)

    async def cmd_flags(self, request: web.Request) -> web.Response:
        catalog = self.engine.catalog
        return web.json_response(
            {
                "nowebui": True,
                "api": True,
                "ckpt_dir": str(catalog.models_dir) if catalog.models_dir else None,
                "no_hashing": False,
                "api_server_stop": False,
                "simulator": True,
            }
        )

    async def samplers(self, request: web.Request) -> web.Response:
        return web.json_response(schema.samplers_payload())

    async def schedulers(self, request: web.Request) -> web.Response:
        return web.json_response(schema.schedulers_payload())

    async def sd_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            [
                {
                    "title": checkpoint.title,
                    "model_name": checkpoint.model_name,
                    "hash": checkpoint.shorthash,
                    "sha256": checkpoint.sha256,
                    "filename": checkpoint.filename,
                    "config": None,
                }
                for checkpoint in self.engine.catalog.all()
            ]
        )

    async def refresh_checkpoints(self, request: web.Request) -> web.Response:
        async with self.engine.exclusive():
            self.engine.catalog.refresh()
        log.info("sim.checkpoints_refreshed", models=self.engine.catalog.names())
        return web.json_response(None)

    async def unload_checkpoint(self, request: web.Request) -> web.Response:
        # A1111 does not take the lock here; the simulator does, so VRAM accounting stays whole.
        async with self.engine.exclusive():
            self.engine.unload()
        return web.json_response({})

    async def reload_checkpoint(self, request: web.Request) -> web.Response:
        async with self.engine.exclusive():
            try:
                await self._sync_model()
            except (SimulatedOOM, NoCheckpoint) as exc:
                return schema.error_response(500, type(exc).__name__, errors=str(exc))
        return web.json_response({})

    async def memory(self, request: web.Request) -> web.Response:
        engine = self.engine
        rss = psutil.Process(os.getpid()).memory_info().rss
        ram_total = psutil.virtual_memory().total
        total, used, peak = (engine.vram_total_mb * MIB, engine.vram_used_mb * MIB, engine.peak_mb * MIB)
        current = {"current": int(used), "peak": int(max(peak, used))}
        return web.json_response(
            {
                "ram": {"free": ram_total - rss, "used": rss, "total": ram_total},
                "cuda": {
                    "system": {"free": int(total - used), "used": int(used), "total": int(total)},
                    "active": current,
                    "allocated": current,
                    "reserved": current,
                    "inactive": {"current": 0, "peak": 0},
                    "events": {"retries": 0, "oom": engine.oom_events},
                },
            }
        )


def _effective_steps(req: schema.GenerationRequest) -> int:
    """The steps ``/progress`` counts: img2img samples the denoised part of the schedule and
    reports ``t_enc + 1`` of them (``setup_img2img_steps``; 11 for 20 steps at 0.5)."""
    if isinstance(req, schema.Img2ImgRequest):
        return int(min(req.denoising_strength, 0.999) * req.steps) + 1
    return req.steps


def _pipeline_error(req: schema.GenerationRequest) -> web.Response | None:
    """What A1111 answers for the zeros its request models let through: the pipeline's exception."""
    if req.steps < 1:
        return schema.error_response(500, "ZeroDivisionError", errors="integer division or modulo by zero")
    if req.batch_size < 1 or req.n_iter < 1:
        return schema.error_response(500, "IndexError", errors="list index out of range")
    return None


def _picture(req: schema.GenerationRequest, init: list[Loaded] | None, seed: int, key: str, index: int) -> Picture:
    if init is None:
        return Drawn(req.width, req.height, seed, key)
    strength = req.denoising_strength if isinstance(req, schema.Img2ImgRequest) else 1.0
    return Blended(init[index % len(init)], req.width, req.height, seed, key, strength)


def _encoded_batch(pictures: list[Picture]) -> list[str]:
    """Base64 PNGs, drawn off the event loop so /progress keeps answering."""
    return [b64(picture.png()) for picture in pictures]


def _preview(picture: Picture) -> Picture:
    if isinstance(picture, Drawn):
        return Drawn(max(8, picture.width // 4), max(8, picture.height // 4), picture.seed, picture.key)
    return picture


def _parameters(req: schema.GenerationRequest) -> dict[str, Any]:
    """The request echo: every field with its default, init images dropped unless asked for."""
    parameters = req.model_dump()
    if isinstance(req, schema.Img2ImgRequest) and not req.include_init_images:
        parameters["init_images"] = None
        parameters["mask"] = None
    return parameters


def _extra_generation_params(sampler: tuple[str, str | None], denoising: float | None) -> dict[str, Any]:
    """What the sampler and img2img add to the infotext: a schedule other than Automatic, the strength."""
    extra: dict[str, Any] = {"Schedule type": sampler[1]} if sampler[1] else {}
    if denoising is not None:
        extra["Denoising strength"] = denoising
    return extra


def _infotext(
    req: schema.GenerationRequest,
    sampler: tuple[str, str | None],
    checkpoint: Checkpoint,
    seed: int,
    denoising: float | None,
) -> str:
    """The "parameters" text A1111 writes into each image and returns in ``infotexts``."""
    fields: dict[str, Any] = {
        "Steps": req.steps,
        "Sampler": sampler[0],
        "Schedule type": sampler[1] or "Automatic",
        "CFG scale": req.cfg_scale,
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        "Model hash": checkpoint.shorthash,
        "Model": checkpoint.name_for_extra,
        "Denoising strength": denoising,
        "Version": VERSION,
    }
    settings = ", ".join(f"{name}: {value}" for name, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {req.negative_prompt}" if req.negative_prompt else ""
    return f"{req.prompt}{negative}\n{settings}".strip()
