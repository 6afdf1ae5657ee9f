"""The ComfyUI adapter: queue a job's graph, follow it, fetch its files (facts in the package docstring)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import mimetypes
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import structlog
from PIL import Image, UnidentifiedImageError

from sdagent.backends.base import Artifact, Backend, Generation, Health, ProgressCallback
from sdagent.backends.comfyui.errors import (
    execution_error,
    raise_for_outcome,
    raise_for_status,
    rejected,
    summarise_node_errors,
)
from sdagent.backends.comfyui.graph import (
    CHECKPOINT_LOADER,
    GraphPlanner,
    Plan,
    combo,
    job_name,
    load_templates,
    resolve,
)
from sdagent.backends.comfyui.images import MEDIA_TYPES, convert, extension_of
from sdagent.backends.comfyui.transport import (
    MessageSocket,
    PromptWatch,
    SocketFactory,
    close_quietly,
    connect_websocket,
)
from sdagent.backends.http import json_of, send
from sdagent.errors import (
    BackendError,
    BackendUnavailable,
    JobAborted,
    ModelNotFound,
)
from sdagent.jobs import Job, JobKind

log = structlog.get_logger(__name__)

Clock = Callable[[], float]

# The follower waits for websocket messages in slices this long, so an abort is seen at once.
RECV_SLICE_S = 0.05
# With the websocket up but silent this long, the history is read once in case a message was lost.
QUIET_HISTORY_CHECK_S = 5.0
# How long an aborted job waits for ComfyUI to confirm the prompt stopped. Samplers check the
# interrupt flag between steps, so a healthy GPU stops within one step; a wedged one is the
# supervisor's to restart, and the job is given back either way.
ABORT_WAIT_S = 10.0


# --- the backend ---------------------------------------------------------------------------------------


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
        self._client_id = uuid.uuid4().hex
        self._planner = GraphPlanner(
            load_templates(workflows_dir), self._fetch_sampler_lists, self._upload, rng or random.Random()
        )
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
        models = tuple(job_name(name) for name in names)
        devices = stats.get("devices") if isinstance(stats, dict) else None
        first = devices[0] if isinstance(devices, list) and devices else None
        device = first.get("name") if isinstance(first, dict) else None
        if not models:
            return Health(ready=False, detail="ComfyUI is up but lists no checkpoint", loaded_model=self._loaded)
        missing = [model for model in self._expected if resolve(model, names) is None]
        detail = f"missing expected models: {', '.join(missing)}" if missing else "ok"
        if device:
            detail += f" (device {device})"
        return Health(ready=True, detail=detail, models=models, loaded_model=self._loaded)

    def loaded_model(self) -> str | None:
        return self._loaded

    def canonical_model(self, model: str) -> str:
        found = resolve(model, self._checkpoints if self._checkpoints is not None else self._fetch_checkpoints())
        return job_name(found) if found is not None else model

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
        found = resolve(model, names)
        if found is None:
            raise ModelNotFound(f"model {model!r} is not among ComfyUI's checkpoints {list(names)}")
        previous, self._loaded = self._loaded, job_name(found)
        log.info("comfyui.model_selected", model=model, previous=previous)

    def refresh_models(self) -> tuple[str, ...]:
        """Re-read ComfyUI's checkpoint list (it rescans folders by mtime); returns the job names."""
        return tuple(job_name(name) for name in self._fetch_checkpoints())

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
        plan = self._planner.plan(job, checkpoint)
        if abort.is_set():
            raise JobAborted("interrupted")
        with contextlib.ExitStack() as closing:
            socket = self._open_socket(closing)
            started = self._clock()
            prompt_id = self._submit(plan.graph)
            watch = PromptWatch(prompt_id)
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
        raise_for_outcome(entry, prompt_id)
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

    def _upload(self, data: bytes, *, resize_to: tuple[int, int] | None = None) -> str:
        """Store an init image in ComfyUI's input folder; returns the name LoadImage takes.

        The name is the content's hash: a retried job re-uploads the same file under the same name
        (ComfyUI has no delete: its input folder grows by one file per distinct image).
        """
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                if resize_to is not None and image.size != resize_to:
                    # Pillow types open() as ImageFile, convert() as Image.
                    image = image.convert("RGB").resize(resize_to, Image.Resampling.LANCZOS)  # type: ignore[assignment]
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
            files={"image": (name, data, MEDIA_TYPES.get(extension, "application/octet-stream"))},
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
            raise rejected(body)
        self._check(response, what)
        if not isinstance(body, dict) or not isinstance(body.get("prompt_id"), str):
            raise BackendError(f"{what} answered without a prompt_id")
        prompt_id = body["prompt_id"]
        if body.get("node_errors"):
            self._stop_prompt(prompt_id)
            raise BackendError(
                f"ComfyUI queued the graph without some of its outputs: {summarise_node_errors(body['node_errors'])}"
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
        self, watch: PromptWatch, socket: MessageSocket | None, progress: ProgressCallback, abort: threading.Event
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
                close_quietly(socket)
                socket = None
                continue
            quiet_since = time.monotonic()
            step = watch.on_message(raw, self._clock())
            if step is not None:
                progress(*step)
            if watch.error is not None:
                watch.ended = True
                raise execution_error(watch.error)
            if watch.interrupted:
                watch.ended = True
                raise JobAborted("interrupted")
            if watch.ended:
                return self._history_after_end(watch.prompt_id)

    def _abort(self, watch: PromptWatch, socket: MessageSocket | None) -> None:
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
                    close_quietly(socket)
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

    def _artifacts(self, job: Job, plan: Plan, entry: dict[str, Any], prompt_id: str) -> list[Artifact]:
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
            extension = extension_of(item["filename"])
            if plan.convert_to is not None and extension != plan.convert_to.value:
                data, extension = convert(data, item["filename"], plan.convert_to)
            content_type = MEDIA_TYPES.get(extension) or mimetypes.guess_type(f"x.{extension}")[0]
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
        names = combo(body, CHECKPOINT_LOADER, "ckpt_name")
        if names is None:
            raise BackendError(f"GET /object_info/{CHECKPOINT_LOADER} has no ckpt_name list (is the node missing?)")
        self._checkpoints = names
        return names

    def _checkpoint_for(self, model: str) -> str:
        """ComfyUI's spelling of a job's model; one rescan before ModelNotFound."""
        names = self._checkpoints if self._checkpoints is not None else self._fetch_checkpoints()
        found = resolve(model, names)
        if found is None:
            found = resolve(model, self._fetch_checkpoints())
        if found is None:
            raise ModelNotFound(f"model {model!r} is not among ComfyUI's checkpoints {list(self._checkpoints or ())}")
        return found

    def _fetch_sampler_lists(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if self._sampler_lists is None:
            body = self._get_json("/object_info/KSampler")
            samplers = combo(body, "KSampler", "sampler_name")
            schedulers = combo(body, "KSampler", "scheduler")
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
            raise_for_status(response, what)
        except BackendUnavailable:
            self._forget()
            raise

    def _forget(self) -> None:
        """Drop what ComfyUI said: a restarted one is read afresh."""
        self._checkpoints = None
        self._sampler_lists = None


# --- following one prompt ---------------------------------------------------------------------------------


# --- mapping helpers ------------------------------------------------------------------------------------
