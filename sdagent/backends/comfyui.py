"""ComfyUI driven through its HTTP API and websocket.

A job becomes an API-format graph: ``txt2img``, ``img2img`` and ``txt2vid`` through the versioned
templates of :mod:`sdagent.backends.workflows`, ``workflow`` jobs as the caller's own graph with the
job's explicit fields written into it (rules in :meth:`ComfyUIBackend.generate`). The graph is
queued with ``POST /prompt``, followed on ``/ws?clientId=`` and its files read from ``/view``.

Facts this adapter relies on (comfyanonymous/ComfyUI ``server.py``, ``execution.py``, ``main.py``,
``nodes.py``; the same shapes as :mod:`sdagent.sim.comfyui`):

* ``POST /prompt`` validates the graph at once: 400 ``{error, node_errors}`` when no output node
  validates; 200 ``{prompt_id, number, node_errors}`` otherwise, where ``node_errors`` lists outputs
  it accepted the prompt *without* (those are treated as a failure here, never silently dropped).
  A ``prompt_id`` sent in the body is used by current versions, so the agent knows the id even when
  the answer is lost.
* Messages for a prompt go to the websocket of its ``client_id``: ``execution_start``,
  ``execution_cached``, ``executing {node}``, ``progress {value, max}``, ``executed``, then
  ``execution_success`` / ``execution_error`` / ``execution_interrupted`` and ``executing`` with
  ``node: null``. The history entry is written between the last two, so its fetch is retried briefly.
* ``GET /history/{prompt_id}`` is empty until the prompt ended; then ``status {status_str,
  completed, messages}`` tells success, error (``execution_error`` in the messages) or interruption.
  The full ``/history`` grows without bound and is never read.
* ``POST /interrupt`` sets a flag the samplers check between steps; current versions take a
  ``prompt_id`` so only that prompt is stopped. The flag is cleared when the next prompt starts, so
  an interrupt that lands before its prompt runs is lost: a pending prompt is deleted from the queue
  instead (``POST /queue {delete}``) and the interrupt is repeated until the prompt is gone.
* Checkpoints are loaded by the graph (``CheckpointLoaderSimple``) and kept in ComfyUI's cache, so
  there is no "current model" to switch: see :meth:`ComfyUIBackend.switch_model`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import hashlib
import io
import json
import mimetypes
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import structlog
from PIL import Image, UnidentifiedImageError

from sdagent.backends.base import Artifact, Backend, Generation, Health, ProgressCallback
from sdagent.backends.http import json_of, send
from sdagent.backends.workflows import BUILTIN, Template, TemplateError, load_template
from sdagent.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    JobAborted,
    ModelNotFound,
    UnsupportedJob,
)
from sdagent.jobs import Job, JobKind, OutputFormat

log = structlog.get_logger(__name__)

Clock = Callable[[], float]

# The template each job kind runs, pinned: a new graph is a new file and a reviewed change here.
TEMPLATES: dict[JobKind, tuple[str, int]] = {
    JobKind.TXT2IMG: ("txt2img", 1),
    JobKind.IMG2IMG: ("img2img", 1),
    JobKind.TXT2VID: ("txt2vid", 1),
}
# What a template must let the job set, per kind; anything else it may leave out, and then a job
# that gives that value is refused rather than run without it.
REQUIRED_PARAMETERS: dict[JobKind, frozenset[str]] = {
    JobKind.TXT2IMG: frozenset({"model", "prompt", "width", "height", "seed", "steps", "cfg"}),
    JobKind.IMG2IMG: frozenset({"model", "prompt", "image", "denoise", "seed", "steps", "cfg"}),
    JobKind.TXT2VID: frozenset({"model", "prompt", "width", "height", "frames", "fps", "seed", "steps", "cfg"}),
}

# The follower waits for websocket messages in slices this long, so an abort is seen at once.
RECV_SLICE_S = 0.05
# With the websocket up but silent this long, the history is read once in case a message was lost.
QUIET_HISTORY_CHECK_S = 5.0
# How long an aborted job waits for ComfyUI to confirm the prompt stopped. Samplers check the
# interrupt flag between steps, so a healthy GPU stops within one step; a wedged one is the
# supervisor's to restart, and the job is given back either way.
ABORT_WAIT_S = 10.0
# ComfyUI's messages are small JSON; previews are binary frames of a few hundred kB.
MAX_WS_MESSAGE_BYTES = 16 * 1024 * 1024
# A job's seed of -1 is drawn here: within the job schema's range, so a result's seed can be resent.
MAX_JOB_SEED = 2**32 - 1

JPEG_QUALITY = 90  # as the A1111 adapter converts, so a job's output looks alike on both backends
WEBP_QUALITY = 90

CHECKPOINT_LOADER = "CheckpointLoaderSimple"
# Sampler nodes a workflow job's seed/steps/cfg_scale/sampler/denoising_strength are written into.
SAMPLER_INPUTS: dict[str, dict[str, str]] = {
    "KSampler": {
        "seed": "seed",
        "steps": "steps",
        "cfg_scale": "cfg",
        "sampler": "sampler_name",
        "denoising_strength": "denoise",
    },
    "KSamplerAdvanced": {"seed": "noise_seed", "steps": "steps", "cfg_scale": "cfg", "sampler": "sampler_name"},
}
ANIMATION_SAVERS = ("SaveWEBM", "SaveAnimatedWEBP", "SaveAnimatedPNG")  # nodes with an fps input

# A1111 sampler names (what most callers know) -> ComfyUI's KSampler names (comfy/samplers.py).
_A1111_SAMPLERS = {
    "euler a": "euler_ancestral",
    "euler": "euler",
    "lms": "lms",
    "heun": "heun",
    "dpm2": "dpm_2",
    "dpm2 a": "dpm_2_ancestral",
    "dpm++ 2s a": "dpmpp_2s_ancestral",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ sde": "dpmpp_sde",
    "dpm++ 2m sde": "dpmpp_2m_sde",
    "dpm++ 3m sde": "dpmpp_3m_sde",
    "dpm fast": "dpm_fast",
    "dpm adaptive": "dpm_adaptive",
    "ddim": "ddim",
    "unipc": "uni_pc",
    "lcm": "lcm",
}
# A1111's legacy "<sampler> <schedule>" names (e.g. "DPM++ 2M Karras") -> ComfyUI scheduler.
_A1111_SCHEDULES = {"karras": "karras", "exponential": "exponential", "sgm uniform": "sgm_uniform"}

_MEDIA_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "mp4": "video/mp4",
    "webm": "video/webm",
}
_STILL_FORMATS = {OutputFormat.PNG: "PNG", OutputFormat.JPEG: "JPEG", OutputFormat.WEBP: "WEBP"}
_UNSAFE_PREFIX = re.compile(r"[^A-Za-z0-9._-]")


# --- the websocket seam ------------------------------------------------------------------------------


class MessageSocket(Protocol):
    """What the follower needs of a websocket client (``websockets.sync.client.ClientConnection``).

    ``recv`` raises TimeoutError when nothing came in ``timeout`` seconds and any other exception
    when the connection is gone.
    """

    def recv(self, timeout: float | None = None) -> str | bytes: ...

    def close(self) -> None: ...


SocketFactory = Callable[[str, float], AbstractContextManager[MessageSocket]]
"""Open a websocket to ``url`` within ``timeout`` seconds (on the call or on entering), or raise;
leaving the context closes it."""


@contextlib.contextmanager
def connect_websocket(url: str, timeout: float) -> Iterator[MessageSocket]:
    """The default :data:`SocketFactory`: websockets' threaded client (it answers pings itself)."""
    from websockets.sync.client import connect

    with connect(url, open_timeout=timeout, close_timeout=timeout, max_size=MAX_WS_MESSAGE_BYTES) as websocket:
        yield websocket


# --- the backend ---------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """A job made ready to queue: the graph and what the result must say about it."""

    graph: dict[str, Any]
    output_nodes: list[str] | None  # None: every node that saved files (workflow jobs)
    convert_to: OutputFormat | None  # re-encode still images into this format
    seed: int | None
    info: dict[str, Any]


class ComfyUIBackend(Backend):
    """ComfyUI at ``url``, one prompt at a time.

    ``request_timeout_s`` bounds every HTTP call and the websocket's opening; a prompt itself may
    run as long as it takes (the job loop's stall and job timeouts abort it). ``progress_poll_s`` is
    the ``/history`` polling interval when the websocket is unavailable. ``workflows_dir`` overrides
    built-in templates by file name. ``client``, ``ws_connect``, ``clock`` and ``rng`` (draws the
    seed of ``seed: -1`` jobs) are seams for tests.
    """

    name = "comfyui"

    def __init__(
        self,
        url: str,
        *,
        models: Iterable[str] = (),
        request_timeout_s: float = 30.0,
        progress_poll_s: float = 0.5,
        workflows_dir: Path | None = None,
        client: httpx.Client | None = None,
        ws_connect: SocketFactory = connect_websocket,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if request_timeout_s <= 0 or progress_poll_s <= 0:
            raise ValueError("request_timeout_s and progress_poll_s must be > 0")
        self._url = url.rstrip("/")
        self._ws_url = re.sub(r"^http", "ws", self._url)  # http -> ws, https -> wss
        self._expected = tuple(dict.fromkeys(models))
        self._timeout = httpx.Timeout(request_timeout_s)
        self._request_timeout_s = request_timeout_s
        self._progress_poll_s = progress_poll_s
        self._owns_client = client is None
        self._client = client or httpx.Client(timeout=self._timeout)
        self._ws_connect = ws_connect
        self._clock = clock
        self._rng = rng or random.Random()
        self._client_id = uuid.uuid4().hex
        self._templates = _load_templates(workflows_dir)
        # health() runs on another thread than the jobs: caches are replaced whole, never mutated.
        self._checkpoints: tuple[str, ...] | None = None  # ComfyUI's spelling
        self._sampler_lists: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._loaded: str | None = None
        self._lock = threading.Lock()
        self._running: str | None = None  # the prompt generate() follows, for interrupt()

    # --- models and health -----------------------------------------------------------------------

    def health(self) -> Health:
        """Ready when ``/system_stats`` answers and ComfyUI lists at least one checkpoint; never raises."""
        try:
            stats = self._get_json("/system_stats")
            names = self._fetch_checkpoints()
        except BackendError as exc:
            return Health(ready=False, detail=str(exc), loaded_model=self._loaded)
        models = tuple(_job_name(name) for name in names)
        devices = stats.get("devices") if isinstance(stats, dict) else None
        first = devices[0] if isinstance(devices, list) and devices else None
        device = first.get("name") if isinstance(first, dict) else None
        if not models:
            return Health(ready=False, detail="ComfyUI is up but lists no checkpoint", loaded_model=self._loaded)
        missing = [model for model in self._expected if _resolve(model, names) is None]
        detail = f"missing expected models: {', '.join(missing)}" if missing else "ok"
        if device:
            detail += f" (device {device})"
        return Health(ready=True, detail=detail, models=models, loaded_model=self._loaded)

    def loaded_model(self) -> str | None:
        return self._loaded

    def switch_model(self, model: str) -> None:
        """Check that ComfyUI has ``model`` and remember it as the agent's current model.

        ComfyUI has no model setting: every graph names its checkpoint and ComfyUI loads it when the
        loader node runs, keeping it cached for the next prompt. So the real switch happens in the
        first job's graph; recording the choice here keeps the job loop's model affinity (it only
        switches when the model changes) and turns an unknown model into ModelNotFound before any
        graph is queued. The list is read fresh: ComfyUI rescans its folders when their mtime
        changes, so a checkpoint the model cache just staged is seen.
        """
        names = self._fetch_checkpoints()
        if _resolve(model, names) is None:
            raise ModelNotFound(f"model {model!r} is not among ComfyUI's checkpoints {list(names)}")
        previous, self._loaded = self._loaded, model
        log.info("comfyui.model_selected", model=model, previous=previous)

    def refresh_models(self) -> tuple[str, ...]:
        """Re-read ComfyUI's checkpoint list (it rescans folders by mtime); returns the job names."""
        return tuple(_job_name(name) for name in self._fetch_checkpoints())

    def free(self) -> None:
        """Ask ComfyUI to unload models and drop its node cache; applied once the queue is idle."""
        self._call("POST", "/free", json={"unload_models": True, "free_memory": True})

    # --- generation -------------------------------------------------------------------------------

    def interrupt(self) -> None:
        """Stop the prompt being followed (or whatever runs, when none is); never raises.

        The agent owns its ComfyUI, and an interrupt while idle is cleared when the next prompt
        starts, so an untargeted interrupt is harmless.
        """
        with self._lock:
            prompt_id = self._running
        if prompt_id is not None:
            self._stop_prompt(prompt_id)
            return
        try:
            self._call("POST", "/interrupt", json={})
        except BackendError as exc:
            log.warning("comfyui.interrupt_failed", error=str(exc))

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def generate(self, job: Job, progress: ProgressCallback, abort: threading.Event) -> Generation:
        """Run ``job`` as a ComfyUI prompt.

        Template jobs (txt2img, img2img, txt2vid) fill the pinned template's parameters; a job
        value the template has no parameter for is refused (UnsupportedJob) unless it is the
        neutral one (empty negative prompt, batch of one, no sampler). img2img's init image is
        resized to the job's width x height (A1111's "just resize") and uploaded first.

        ``workflow`` jobs run the caller's graph. Only fields the job sets explicitly are written in,
        and each must find its place, else UnsupportedJob:

        * ``model`` -> ``ckpt_name`` of the graph's one CheckpointLoaderSimple (with several, the
          job's model must already be one of theirs);
        * ``seed`` (-1 draws one), ``steps``, ``cfg_scale``, ``sampler`` (+ its scheduler when the
          name carries one), ``denoising_strength`` -> every KSampler / KSamplerAdvanced;
        * ``prompt`` / ``negative_prompt`` -> the ``text`` of CLIPTextEncode nodes linked directly
          to a sampler's ``positive`` / ``negative`` input;
        * ``width``, ``height``, ``batch_size`` and ``video.frames`` (the batch) -> EmptyLatentImage
          nodes linked directly to a sampler's ``latent_image``; ``video.fps`` -> the animation savers;
        * ``init_image`` -> uploaded, into the graph's one LoadImage node.

        Files come back as the graph saved them (``type: output``; previews are left out). With
        ``output.format`` set, still images are converted to it and anything else is refused.
        """
        if abort.is_set():
            raise JobAborted("interrupted")
        checkpoint = self._checkpoint_for(job.model)
        plan = self._plan(job, checkpoint)
        if abort.is_set():
            raise JobAborted("interrupted")
        with contextlib.ExitStack() as closing:
            socket = self._open_socket(closing)
            started = self._clock()
            prompt_id = self._submit(plan.graph)
            watch = _Watch(prompt_id)
            with self._lock:
                self._running = prompt_id
            try:
                entry = self._follow(watch, socket, progress, abort)
            except BaseException:
                if not watch.ended:
                    self._stop_prompt(prompt_id)  # never leave the GPU busy for a job given up
                raise
            finally:
                with self._lock:
                    self._running = None
        inference_ms = (self._clock() - started) * 1000.0
        _raise_for_outcome(entry, prompt_id)
        if watch.last_progress is not None and watch.last_progress[0] < watch.last_progress[1]:
            progress(watch.last_progress[1], watch.last_progress[1])  # the last steps went unreported
        artifacts = self._artifacts(job, plan, entry, prompt_id)
        info = {**plan.info, "prompt_id": prompt_id, **watch.timings(entry)}
        log.info(
            "comfyui.generated",
            job_id=job.job_id,
            kind=job.kind.value,
            model=job.model,
            prompt_id=prompt_id,
            seed=plan.seed,
            files=len(artifacts),
            followed="websocket" if watch.via_websocket else "history",
            inference_ms=round(inference_ms, 1),
        )
        return Generation(artifacts, info=info, inference_ms=inference_ms)

    # --- job -> graph -------------------------------------------------------------------------------

    def _plan(self, job: Job, checkpoint: str) -> _Plan:
        if job.kind is JobKind.WORKFLOW:
            return self._plan_workflow(job, checkpoint)
        return self._plan_template(job, checkpoint)

    def _plan_template(self, job: Job, checkpoint: str) -> _Plan:
        template = self._templates[job.kind]
        saved, convert_to = _saved_format(template, job)
        seed = self._seed(job.seed)
        values: dict[str, Any] = {
            "model": checkpoint,
            "prompt": job.prompt,
            "seed": seed,
            "steps": job.steps,
            "cfg": job.cfg_scale,
        }
        optional: list[tuple[str, Any, bool]] = [  # (parameter, value, given: not the neutral value)
            ("negative_prompt", job.negative_prompt, job.negative_prompt != ""),
            ("batch_size", job.batch_size, job.batch_size != 1),
            ("filename_prefix", _filename_prefix(job), False),
        ]
        if job.sampler is not None:
            sampler_name, scheduler = self._sampler(job.sampler)
            optional.append(("sampler_name", sampler_name, True))
            if scheduler is not None:
                optional.append(("scheduler", scheduler, True))
        if job.kind is JobKind.IMG2IMG:
            values["denoise"] = job.denoising_strength
        else:
            values.update(width=job.width, height=job.height)
        if job.kind is JobKind.TXT2VID:
            assert job.video is not None  # the schema requires it for txt2vid
            values.update(frames=job.video.frames, fps=float(job.video.fps))
        for parameter, value, given in optional:
            if template.accepts(parameter):
                values[parameter] = value
            elif given:
                raise UnsupportedJob(
                    f"template {template.ref} has no place for {parameter} (the job gives {value!r}); "
                    f"it takes: {', '.join(template.parameters)}"
                )
        if job.kind is JobKind.IMG2IMG:  # last: nothing is uploaded for a job refused above
            values["image"] = self._upload(_init_image_bytes(job), resize_to=(job.width, job.height))
        graph = template.fill(values, saved)
        info = {
            "model": job.model,
            "ckpt_name": checkpoint,
            "template": template.ref,
            "template_source": template.source,
            "seed": seed,
            "steps": job.steps,
            "cfg_scale": job.cfg_scale,
            "sampler": values.get("sampler_name", _literal(graph, template, "sampler_name")),
            "scheduler": values.get("scheduler", _literal(graph, template, "scheduler")),
            "width": job.width,
            "height": job.height,
        }
        if job.kind is JobKind.IMG2IMG:
            info["denoising_strength"] = job.denoising_strength
        if job.kind is JobKind.TXT2VID:
            info.update(frames=values["frames"], fps=values["fps"])
        else:
            info["batch_size"] = job.batch_size
        info = {key: value for key, value in info.items() if value is not None}
        return _Plan(graph, [template.outputs[saved]], convert_to, seed, info)

    def _plan_workflow(self, job: Job, checkpoint: str) -> _Plan:
        assert job.workflow is not None  # the schema requires it for workflow jobs
        graph = copy.deepcopy(job.workflow)
        if not all(isinstance(node, dict) and isinstance(node.get("inputs", {}), dict) for node in graph.values()):
            raise BackendError("workflow is not an API-format graph {node_id: {class_type, inputs}}")
        for node in graph.values():
            node.setdefault("inputs", {})
        given = job.model_fields_set
        self._override_checkpoint(job, graph, checkpoint)
        samplers = [node for node, spec in graph.items() if spec.get("class_type") in SAMPLER_INPUTS]
        seed = self._override_samplers(job, graph, samplers, given)
        self._override_prompts(job, graph, samplers, given)
        self._override_latents(job, graph, samplers, given)
        if job.video is not None and "video" in given:
            savers = [node for node, spec in graph.items() if spec.get("class_type") in ANIMATION_SAVERS]
            if not savers:
                raise UnsupportedJob(f"workflow: video.fps has no place: no {', '.join(ANIMATION_SAVERS)} node")
            for node in savers:
                _put(graph, node, "fps", float(job.video.fps), "video.fps")
        if job.init_image is not None:  # last: nothing is uploaded for a job refused above
            loads = _nodes_of(graph, "LoadImage")
            if len(loads) != 1:
                raise UnsupportedJob(
                    f"workflow: init_image needs exactly one LoadImage node, the graph has {len(loads)}"
                )
            _put(graph, loads[0], "image", self._upload(_init_image_bytes(job)), "init_image")
        seeds = sorted(
            {value for node in samplers if isinstance(value := graph[node]["inputs"].get(
                SAMPLER_INPUTS[graph[node]["class_type"]]["seed"]), int)}
        )  # fmt: skip
        if seed is None and len(seeds) == 1:
            seed = seeds[0]
        info: dict[str, Any] = {"model": job.model, "ckpt_name": checkpoint, "template": "workflow", "seeds": seeds}
        if seed is not None:
            info["seed"] = seed
        return _Plan(graph, None, job.output.format, seed, info)

    def _override_checkpoint(self, job: Job, graph: dict[str, Any], checkpoint: str) -> None:
        loaders = _nodes_of(graph, CHECKPOINT_LOADER)
        if len(loaders) == 1:
            _put(graph, loaders[0], "ckpt_name", checkpoint, "model")
            return
        named = [graph[node]["inputs"].get("ckpt_name") for node in loaders]
        if not any(isinstance(name, str) and _job_name(name) == _job_name(checkpoint) for name in named):
            raise UnsupportedJob(
                f"workflow: the job's model {job.model!r} has no place: the graph has {len(loaders)} "
                f"{CHECKPOINT_LOADER} nodes; the model is written into a single one, or must already be "
                "named by one of several"
            )

    def _override_samplers(self, job: Job, graph: dict[str, Any], samplers: list[str], given: set[str]) -> int | None:
        """Write the sampling fields the job sets into every sampler node; returns the seed written."""
        values: dict[str, Any] = {name: getattr(job, name) for name in ("steps", "cfg_scale", "denoising_strength")
                                  if name in given}  # fmt: skip
        seed = None
        if "seed" in given:
            values["seed"] = seed = self._seed(job.seed)
        scheduler = None
        if "sampler" in given and job.sampler is not None:
            values["sampler"], scheduler = self._sampler(job.sampler)
        for job_field, value in values.items():
            targets = [(node, SAMPLER_INPUTS[graph[node]["class_type"]].get(job_field)) for node in samplers]
            targets = [(node, name) for node, name in targets if name is not None]
            if not targets:
                raise UnsupportedJob(f"workflow: {job_field} has no place: no {' or '.join(SAMPLER_INPUTS)} takes it")
            for node, input_name in targets:
                _put(graph, node, input_name, value, job_field)
                if job_field == "sampler" and scheduler is not None:
                    _put(graph, node, "scheduler", scheduler, job_field)
        return seed

    def _override_prompts(self, job: Job, graph: dict[str, Any], samplers: list[str], given: set[str]) -> None:
        wanted = {"prompt": ("positive", job.prompt), "negative_prompt": ("negative", job.negative_prompt)}
        written: dict[str, str] = {}
        for job_field, (slot, text) in wanted.items():
            if job_field not in given:
                continue
            encoders = {_linked(graph, node, slot) for node in samplers} - {None}
            encoders = {node for node in encoders if graph[node].get("class_type") == "CLIPTextEncode"}
            if not encoders:
                raise UnsupportedJob(
                    f"workflow: {job_field} has no place: no CLIPTextEncode is linked directly to a sampler's {slot}"
                )
            for node in sorted(encoders):
                if written.get(node, text) != text:
                    raise UnsupportedJob(f"workflow: CLIPTextEncode {node} feeds both positive and negative")
                _put(graph, node, "text", text, job_field)
                written[node] = text

    def _override_latents(self, job: Job, graph: dict[str, Any], samplers: list[str], given: set[str]) -> None:
        values = {name: getattr(job, name) for name in ("width", "height", "batch_size") if name in given}
        if job.video is not None and "video" in given:
            if "batch_size" in values and values["batch_size"] != job.video.frames:
                raise UnsupportedJob("workflow: batch_size and video.frames both set the latent batch; give one")
            values["batch_size"] = job.video.frames
        if not values:
            return
        latents = {_linked(graph, node, "latent_image") for node in samplers} - {None}
        latents = {node for node in latents if graph[node].get("class_type") == "EmptyLatentImage"}
        if not latents:
            raise UnsupportedJob(
                f"workflow: {', '.join(values)} have no place: no EmptyLatentImage is linked directly to a "
                "sampler's latent_image"
            )
        for node in sorted(latents):
            for name, value in values.items():
                _put(graph, node, name, value, name)

    def _seed(self, seed: int) -> int:
        return seed if seed != -1 else self._rng.randrange(MAX_JOB_SEED)

    def _sampler(self, name: str) -> tuple[str, str | None]:
        """ComfyUI's (sampler_name, scheduler or None) for a job's sampler, ComfyUI's or A1111's name."""
        samplers, schedulers = self._fetch_sampler_lists()
        if name in samplers:
            return name, None
        lowered, scheduler = name.lower(), None
        for label, comfy_name in _A1111_SCHEDULES.items():
            if lowered.endswith(f" {label}") and comfy_name in schedulers:
                lowered, scheduler = lowered[: -len(label) - 1], comfy_name
                break
        translated = _A1111_SAMPLERS.get(lowered, lowered)
        if translated not in samplers:
            raise UnsupportedJob(
                f"sampler {name!r} is neither a ComfyUI sampler ({', '.join(samplers)}) nor an A1111 name with one"
            )
        return translated, scheduler

    def _upload(self, data: bytes, *, resize_to: tuple[int, int] | None = None) -> str:
        """Store an init image in ComfyUI's input folder; returns the name LoadImage takes.

        The name is the content's hash: a retried job re-uploads the same file under the same name
        (ComfyUI has no delete: its input folder grows by one file per distinct image).
        """
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                if resize_to is not None and image.size != resize_to:
                    image = image.convert("RGB").resize(resize_to, Image.Resampling.LANCZOS)
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    data, extension = buffer.getvalue(), "png"
                else:
                    extension = (image.format or "png").lower()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise BackendError(f"init_image is not an image Pillow can read: {exc}") from None
        name = f"{hashlib.sha256(data).hexdigest()[:32]}.{extension}"
        body = self._call(
            "POST",
            "/upload/image",
            files={"image": (name, data, _MEDIA_TYPES.get(extension, "application/octet-stream"))},
            data={"type": "input", "subfolder": "sdagent", "overwrite": "true"},
        )
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise BackendError("POST /upload/image answered without the stored name")
        subfolder = body.get("subfolder") or ""
        return f"{subfolder}/{body['name']}" if subfolder else body["name"]

    # --- queueing and following ------------------------------------------------------------------------

    def _submit(self, graph: dict[str, Any]) -> str:
        prompt_id = str(uuid.uuid4())
        payload = {"prompt": graph, "client_id": self._client_id, "prompt_id": prompt_id}
        what = "POST /prompt"
        try:
            response = self._request("POST", "/prompt", json=payload)
        except BackendUnavailable as exc:
            if not isinstance(exc.__cause__, (httpx.ConnectError, httpx.ConnectTimeout)):
                self._stop_prompt(prompt_id)  # the request went out: it may be queued though the answer was lost
            raise
        body = json_of(response)
        if response.status_code == 400:
            raise _rejected(body)
        self._check(response, what)
        if not isinstance(body, dict) or not isinstance(body.get("prompt_id"), str):
            raise BackendError(f"{what} answered without a prompt_id")
        prompt_id = body["prompt_id"]
        if body.get("node_errors"):
            self._stop_prompt(prompt_id)
            raise BackendError(
                f"ComfyUI queued the graph without some of its outputs: {_summarise_node_errors(body['node_errors'])}"
            )
        log.debug("comfyui.queued", prompt_id=prompt_id, number=body.get("number"))
        return prompt_id

    def _open_socket(self, closing: contextlib.ExitStack) -> MessageSocket | None:
        """The websocket for this client id, opened before queueing so no message is missed."""
        url = f"{self._ws_url}/ws?clientId={self._client_id}"
        try:
            return closing.enter_context(self._ws_connect(url, self._request_timeout_s))
        except Exception as exc:  # noqa: BLE001 - any failure means: follow by polling instead
            log.warning("comfyui.websocket_unavailable", error=f"{type(exc).__name__}: {exc}", fallback="history")
            return None

    def _follow(
        self, watch: _Watch, socket: MessageSocket | None, progress: ProgressCallback, abort: threading.Event
    ) -> dict[str, Any]:
        """Wait for the prompt to end; returns its history entry. Raises on error or abort."""
        quiet_since = time.monotonic()
        while True:
            if abort.is_set():
                self._abort(watch, socket)
                raise JobAborted("interrupted")
            if socket is None:
                entry = self._history(watch.prompt_id)
                if entry is not None:
                    watch.ended = True
                    return entry
                abort.wait(self._progress_poll_s)
                continue
            try:
                raw = socket.recv(timeout=RECV_SLICE_S)
            except TimeoutError:
                if time.monotonic() - quiet_since >= QUIET_HISTORY_CHECK_S:
                    quiet_since = time.monotonic()
                    entry = self._history(watch.prompt_id)
                    if entry is not None:
                        watch.ended = True
                        return entry
                continue
            except Exception as exc:  # noqa: BLE001 - closed, reset, protocol error: poll instead
                log.warning("comfyui.websocket_lost", prompt_id=watch.prompt_id, error=f"{type(exc).__name__}: {exc}")
                _close_quietly(socket)
                socket = None
                continue
            quiet_since = time.monotonic()
            step = watch.on_message(raw, self._clock())
            if step is not None:
                progress(*step)
            if watch.error is not None:
                watch.ended = True
                raise _execution_error(watch.error)
            if watch.interrupted:
                watch.ended = True
                raise JobAborted("interrupted")
            if watch.ended:
                return self._history_after_end(watch.prompt_id)

    def _abort(self, watch: _Watch, socket: MessageSocket | None) -> None:
        """Stop the prompt and wait, bounded, until ComfyUI no longer runs or queues it."""
        deadline = time.monotonic() + ABORT_WAIT_S
        next_stop = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_stop:
                self._stop_prompt(watch.prompt_id)  # repeated: one that lands before the start is lost
                next_stop = time.monotonic() + self._progress_poll_s
            if socket is not None:
                try:
                    watch.on_message(socket.recv(timeout=RECV_SLICE_S), self._clock())
                except TimeoutError:
                    pass
                except Exception:  # noqa: BLE001 - gone: the queue check below decides
                    _close_quietly(socket)
                    socket = None
            else:
                time.sleep(RECV_SLICE_S)
            if watch.ended or watch.interrupted or watch.error is not None:
                break
            try:
                if not self._in_queue(watch.prompt_id):
                    break
            except BackendError as exc:
                log.warning("comfyui.abort_unconfirmed", prompt_id=watch.prompt_id, error=str(exc))
                break
        else:
            log.warning("comfyui.abort_unconfirmed", prompt_id=watch.prompt_id, waited_s=ABORT_WAIT_S)
        watch.ended = True
        log.info("comfyui.aborted", prompt_id=watch.prompt_id)

    def _stop_prompt(self, prompt_id: str) -> None:
        """Take the prompt off the queue if it waits there, interrupt it if it runs; never raises."""
        try:  # one failure ends the attempt: a wedged ComfyUI would make each call wait its timeout
            self._call("POST", "/queue", json={"delete": [prompt_id]})
            self._call("POST", "/interrupt", json={"prompt_id": prompt_id})
        except BackendError as exc:
            log.warning("comfyui.stop_failed", prompt_id=prompt_id, error=str(exc))

    def _in_queue(self, prompt_id: str) -> bool:
        body = self._get_json("/queue")
        for key in ("queue_running", "queue_pending"):
            for item in body.get(key) or []:
                if isinstance(item, list) and len(item) > 1 and item[1] == prompt_id:
                    return True
        return False

    def _history(self, prompt_id: str) -> dict[str, Any] | None:
        body = self._get_json(f"/history/{prompt_id}")
        entry = body.get(prompt_id)
        return entry if isinstance(entry, dict) else None

    def _history_after_end(self, prompt_id: str) -> dict[str, Any]:
        """The entry of a prompt the websocket said ended: written a moment after some messages."""
        deadline = time.monotonic() + self._request_timeout_s
        while True:
            entry = self._history(prompt_id)
            if entry is not None:
                return entry
            if time.monotonic() >= deadline:
                raise BackendError(f"prompt {prompt_id} ended but has no history entry")
            time.sleep(RECV_SLICE_S)

    # --- outputs -------------------------------------------------------------------------------------

    def _artifacts(self, job: Job, plan: _Plan, entry: dict[str, Any], prompt_id: str) -> list[Artifact]:
        outputs = entry.get("outputs")
        outputs = outputs if isinstance(outputs, dict) else {}
        nodes = plan.output_nodes if plan.output_nodes is not None else [node for node in plan.graph if node in outputs]
        files: list[dict[str, Any]] = []
        for node in nodes:
            for value in (outputs.get(node) or {}).values():
                if not isinstance(value, list):
                    continue
                for item in value:
                    # Every file list (images, gifs...) has {filename, subfolder, type}; previews are temp.
                    is_file = isinstance(item, dict) and isinstance(item.get("filename"), str)
                    if is_file and item.get("type") == "output" and item not in files:
                        files.append(item)
        if not files:
            raise BackendError(
                f"prompt {prompt_id} saved no output file "
                "(a workflow needs a saving node such as SaveImage; previews are not outputs)"
            )
        expected = {JobKind.TXT2IMG: job.batch_size, JobKind.IMG2IMG: 1, JobKind.TXT2VID: 1}.get(job.kind)
        if expected is not None and len(files) != expected:
            raise BackendError(f"ComfyUI saved {len(files)} files where the {job.kind.value} template makes {expected}")
        artifacts = []
        for item in files:
            data = self._view(item)
            extension = _extension(item["filename"])
            if plan.convert_to is not None and extension != plan.convert_to.value:
                data, extension = _convert(data, item["filename"], plan.convert_to)
            content_type = _MEDIA_TYPES.get(extension) or mimetypes.guess_type(f"x.{extension}")[0]
            artifacts.append(Artifact(data, content_type or "application/octet-stream", extension, plan.seed))
        return artifacts

    def _view(self, item: dict[str, Any]) -> bytes:
        params = {"filename": item["filename"], "subfolder": item.get("subfolder") or "", "type": "output"}
        response = self._request("GET", "/view", params=params)
        self._check(response, f"GET /view {item['filename']}")
        return response.content

    # --- models -----------------------------------------------------------------------------------------

    def _fetch_checkpoints(self) -> tuple[str, ...]:
        body = self._get_json(f"/object_info/{CHECKPOINT_LOADER}")
        names = _combo(body, CHECKPOINT_LOADER, "ckpt_name")
        if names is None:
            raise BackendError(f"GET /object_info/{CHECKPOINT_LOADER} has no ckpt_name list (is the node missing?)")
        self._checkpoints = names
        return names

    def _checkpoint_for(self, model: str) -> str:
        """ComfyUI's spelling of a job's model; one rescan before ModelNotFound."""
        names = self._checkpoints if self._checkpoints is not None else self._fetch_checkpoints()
        found = _resolve(model, names)
        if found is None:
            found = _resolve(model, self._fetch_checkpoints())
        if found is None:
            raise ModelNotFound(f"model {model!r} is not among ComfyUI's checkpoints {list(self._checkpoints or ())}")
        return found

    def _fetch_sampler_lists(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if self._sampler_lists is None:
            body = self._get_json("/object_info/KSampler")
            samplers = _combo(body, "KSampler", "sampler_name")
            schedulers = _combo(body, "KSampler", "scheduler")
            if samplers is None or schedulers is None:
                raise BackendError("GET /object_info/KSampler lists no sampler_name/scheduler")
            self._sampler_lists = (samplers, schedulers)
        return self._sampler_lists

    # --- HTTP -------------------------------------------------------------------------------------------

    def _get_json(self, path: str) -> dict[str, Any]:
        body = self._call("GET", path)
        if not isinstance(body, dict):
            raise BackendError(f"GET {path} answered {type(body).__name__}, not an object")
        return body

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send, check the status, return the JSON body (None when there is none)."""
        what = f"{method} {path}"
        response = self._request(method, path, **kwargs)
        self._check(response, what)
        return json_of(response)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return send(self._client, method, f"{self._url}{path}", what=f"{method} {path}", timeout=self._timeout,
                        **kwargs)  # fmt: skip
        except BackendUnavailable:
            self._forget()
            raise

    def _check(self, response: httpx.Response, what: str) -> None:
        try:
            _raise_for_status(response, what)
        except BackendUnavailable:
            self._forget()
            raise

    def _forget(self) -> None:
        """Drop what ComfyUI said: a restarted one is read afresh."""
        self._checkpoints = None
        self._sampler_lists = None


# --- following one prompt ---------------------------------------------------------------------------------


@dataclass
class _Watch:
    """What the websocket told about one prompt."""

    prompt_id: str
    ended: bool = False
    interrupted: bool = False
    error: dict[str, Any] | None = None
    via_websocket: bool = False
    cached: list[str] = field(default_factory=list)
    node_ms: dict[str, float] = field(default_factory=dict)
    last_progress: tuple[int, int] | None = None
    _node: tuple[str, float] | None = None  # the node executing and since when

    def on_message(self, raw: str | bytes, now: float) -> tuple[int, int] | None:
        """Take one message in; returns (step, steps) for a new progress report."""
        if isinstance(raw, bytes):
            return None  # a preview image
        try:
            message = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
            return None
        kind, data = message.get("type"), message["data"]
        if data.get("prompt_id", self.prompt_id) != self.prompt_id:
            return None  # another client's prompt, broadcast
        self.via_websocket = True
        if kind == "execution_cached":
            self.cached = [str(node) for node in data.get("nodes") or []]
        elif kind == "executing":
            if self._node is not None:
                node, since = self._node
                self.node_ms[node] = round(self.node_ms.get(node, 0.0) + (now - since) * 1000.0, 1)
                self._node = None
            if data.get("node") is not None:
                self._node = (str(data["node"]), now)
            elif data.get("prompt_id") == self.prompt_id:
                self.ended = True
        elif kind == "execution_success":
            self.ended = True
        elif kind == "execution_error":
            self.error = data
        elif kind == "execution_interrupted":
            self.interrupted = True
        elif kind == "progress":
            step = (data.get("value"), data.get("max"))
            if isinstance(step[0], int) and isinstance(step[1], int) and step[1] > 0 and step != self.last_progress:
                self.last_progress = (step[0], step[1])
                return self.last_progress
        return None

    def timings(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Node timings seen on the websocket, and the execution time from the history's messages."""
        result: dict[str, Any] = {}
        if self.node_ms:
            result["node_ms"] = dict(self.node_ms)
        if self.cached:
            result["cached_nodes"] = list(self.cached)
        stamps = {}
        for message in _status(entry).get("messages") or []:
            if isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict):
                stamps[message[0]] = message[1].get("timestamp")
        start, end = stamps.get("execution_start"), stamps.get("execution_success")
        if isinstance(start, (int, float)) and isinstance(end, (int, float)):
            result["execution_ms"] = end - start
        return result


# --- mapping helpers ------------------------------------------------------------------------------------


def _load_templates(workflows_dir: Path | None) -> dict[JobKind, Template]:
    """Every pinned template, overrides included, checked at start-up (a bad file fails it)."""
    templates = {}
    for kind, (name, version) in TEMPLATES.items():
        try:
            template = load_template(name, version, workflows_dir)
        except TemplateError as exc:
            raise ConfigError("backend.workflows_dir", str(exc)) from None
        missing = REQUIRED_PARAMETERS[kind] - set(template.parameters)
        if missing:
            raise ConfigError(
                "backend.workflows_dir",
                f"{template.source}: a {kind.value} template needs parameters {sorted(missing)}",
            )
        if template.source != BUILTIN:
            log.info("comfyui.template_overridden", template=template.ref, path=template.source)
        templates[kind] = template
    return templates


def _saved_format(template: Template, job: Job) -> tuple[str, OutputFormat | None]:
    """(the format the graph saves, the format to convert stills into or None)."""
    wanted = job.output_format
    if wanted.value in template.outputs:
        return wanted.value, None
    if wanted in _STILL_FORMATS and not wanted.is_video and "png" in template.outputs:
        return "png", wanted  # ComfyUI's SaveImage writes PNG only: stills are re-encoded, as A1111's are
    raise UnsupportedJob(
        f"output format {wanted.value}: ComfyUI template {template.ref} saves "
        f"{', '.join(template.outputs)}; ask for one of those"
    )


def _filename_prefix(job: Job) -> str:
    return f"sdagent/{_UNSAFE_PREFIX.sub('_', job.job_id)}"


def _literal(graph: dict[str, Any], template: Template, parameter: str) -> Any:
    """What the filled graph has for a parameter the job left alone (for the result's info)."""
    targets = template.parameters.get(parameter)
    if not targets or targets[0].node not in graph:
        return None
    return graph[targets[0].node]["inputs"].get(targets[0].input)


def _nodes_of(graph: dict[str, Any], class_type: str) -> list[str]:
    return [node for node, spec in graph.items() if spec.get("class_type") == class_type]


def _linked(graph: dict[str, Any], node: str, input_name: str) -> str | None:
    """The node linked into ``node.input_name``, if that input is a link to a node of the graph."""
    value = graph[node]["inputs"].get(input_name)
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in graph:
        return str(value[0])
    return None


def _put(graph: dict[str, Any], node: str, input_name: str, value: Any, job_field: str) -> None:
    if isinstance(graph[node]["inputs"].get(input_name), list):
        raise UnsupportedJob(
            f"workflow: {job_field} has no place: {node}.{input_name} ({graph[node].get('class_type')}) is a link"
        )
    graph[node]["inputs"][input_name] = value


def _job_name(name: str) -> str:
    """A checkpoint as jobs name it: ComfyUI lists nested files with the OS's separator."""
    return name.replace("\\", "/")


def _resolve(model: str, names: Iterable[str]) -> str | None:
    """ComfyUI's name for a job's model: the same path, or the same path without its extension."""
    names = tuple(names)
    for name in names:
        if _job_name(name) == model:
            return name
    stem = os.path.splitext(model)[0]
    matches = [name for name in names if os.path.splitext(_job_name(name))[0] == stem]
    return matches[0] if len(matches) == 1 else None


def _combo(body: dict[str, Any], node: str, input_name: str) -> tuple[str, ...] | None:
    """The choices of a list input in an ``/object_info`` entry: ``[[choices], {...}]`` or
    ``["COMBO", {"options": [choices]}]`` (the newer node schema)."""
    entry = body.get(node)
    inputs = entry.get("input") if isinstance(entry, dict) else None
    spec = None
    if isinstance(inputs, dict):
        for section in ("required", "optional"):
            candidates = inputs.get(section)
            if isinstance(candidates, dict) and input_name in candidates:
                spec = candidates[input_name]
                break
    if not isinstance(spec, list) or not spec:
        return None
    if isinstance(spec[0], list):
        return tuple(str(choice) for choice in spec[0])
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict) and isinstance(spec[1].get("options"), list):
        return tuple(str(choice) for choice in spec[1]["options"])
    return None


def _init_image_bytes(job: Job) -> bytes:
    init = job.init_image
    assert init is not None
    if init.base64 is None:
        raise BackendError("init_image has no base64: the agent inlines S3 images before the backend")
    text = init.base64.partition(",")[2] if init.base64.startswith("data:") else init.base64
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BackendError(f"init_image.base64 is not valid base64: {exc}") from None


def _extension(filename: str) -> str:
    extension = os.path.splitext(filename)[1].lower().lstrip(".")
    return "jpeg" if extension == "jpg" else extension


def _convert(data: bytes, filename: str, fmt: OutputFormat) -> tuple[bytes, str]:
    """A still image re-encoded into ``fmt``; anything else cannot honestly become it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if fmt not in _STILL_FORMATS or getattr(image, "n_frames", 1) > 1:
                raise UnsupportedJob(f"the graph saved {filename}, which cannot be made into {fmt.value}")
            image.load()
            if fmt is not OutputFormat.PNG and image.mode not in ("RGB", "L"):
                image = image.convert("RGB")  # JPEG has no alpha
            buffer = io.BytesIO()
            quality = {OutputFormat.JPEG: {"quality": JPEG_QUALITY}, OutputFormat.WEBP: {"quality": WEBP_QUALITY}}
            image.save(buffer, format=_STILL_FORMATS[fmt], **quality.get(fmt, {}))
    except (UnidentifiedImageError, OSError) as exc:
        raise UnsupportedJob(f"the graph saved {filename}, which is no image to make {fmt.value} of: {exc}") from None
    return buffer.getvalue(), fmt.value


def _status(entry: dict[str, Any]) -> dict[str, Any]:
    status = entry.get("status")
    return status if isinstance(status, dict) else {}


def _raise_for_outcome(entry: dict[str, Any], prompt_id: str) -> None:
    """Raise for a history entry of a prompt that did not succeed (polling and after the websocket)."""
    status = _status(entry)
    for message in status.get("messages") or []:
        if not (isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict)):
            continue
        if message[0] == "execution_error":
            raise _execution_error(message[1])
        if message[0] == "execution_interrupted":
            raise JobAborted("interrupted")
    if status and not status.get("completed", False):
        raise BackendError(f"ComfyUI ended prompt {prompt_id} with status {status.get('status_str')!r}")


def _execution_error(data: dict[str, Any]) -> BackendError:
    """An ``execution_error``: a node raised while the prompt ran."""
    exception_type = str(data.get("exception_type") or "")
    said = str(data.get("exception_message") or "").strip().splitlines()
    first = said[0] if said else ""
    where = f"node {data.get('node_id')} ({data.get('node_type')})"
    if "OutOfMemoryError" in exception_type or "out of memory" in first.lower():
        return BackendError(f"ComfyUI ran out of GPU memory at {where}: {first}")
    return BackendError(f"ComfyUI failed at {where}: {exception_type}: {first}")


def _rejected(body: Any) -> BackendError:
    """A 400 from ``POST /prompt``: the graph did not validate."""
    body = body if isinstance(body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    message = str(error.get("message") or "invalid prompt")
    node_errors = body.get("node_errors") if isinstance(body.get("node_errors"), dict) else {}
    # Current ComfyUI says missing_node_type; older ones invalid_prompt "... node X does not exist."
    if error.get("type") == "missing_node_type" or "does not exist" in message:
        return UnsupportedJob(f"ComfyUI has no such node class (custom node not installed?): {message}")
    for node in node_errors.values():
        if isinstance(node, dict) and node.get("class_type") == CHECKPOINT_LOADER:
            for reason in node.get("errors") or []:
                if isinstance(reason, dict) and reason.get("type") == "value_not_in_list":
                    return ModelNotFound(f"ComfyUI does not have the checkpoint: {reason.get('details')}")
    summary = _summarise_node_errors(node_errors) if node_errors else str(error.get("details") or "")
    return BackendError(f"ComfyUI rejected the graph: {message}: {summary}")


def _summarise_node_errors(node_errors: Any, limit: int = 5) -> str:
    """``node 3 (KSampler): Value 0 smaller than min of 1: steps; ...``, a few nodes at most."""
    if not isinstance(node_errors, dict):
        return str(node_errors)
    parts = []
    for node_id, node in list(node_errors.items())[:limit]:
        reasons = node.get("errors") if isinstance(node, dict) else None
        texts = [
            f"{reason.get('message')}: {reason.get('details')}" for reason in reasons or [] if isinstance(reason, dict)
        ]
        class_type = node.get("class_type") if isinstance(node, dict) else "?"
        parts.append(f"node {node_id} ({class_type}): {'; '.join(texts) or 'invalid'}")
    if len(node_errors) > limit:
        parts.append(f"and {len(node_errors) - limit} more nodes")
    return "; ".join(parts)


def _raise_for_status(response: httpx.Response, what: str) -> None:
    """ComfyUI answers its own errors in plain text or ``{error}``; 5xx and 429 are transient."""
    status = response.status_code
    if status < 400:
        return
    said = response.text[:300].strip()
    if status >= 500 or status == 429:
        raise BackendUnavailable(f"{what}: ComfyUI answered {status}: {said}")
    raise BackendError(f"{what}: ComfyUI answered {status}: {said}")


def _close_quietly(socket: MessageSocket) -> None:
    with contextlib.suppress(Exception):  # closing a dead socket may fail any way
        socket.close()
