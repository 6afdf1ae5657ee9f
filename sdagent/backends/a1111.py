"""AUTOMATIC1111's Stable Diffusion WebUI driven through its HTTP API (``/sdapi/v1``).

Facts this adapter relies on (AUTOMATIC1111/stable-diffusion-webui ``modules/api/api.py``,
``modules/shared_state.py``, ``modules/sd_samplers.py``):

* Generations run one at a time under A1111's queue lock; the agent sends one job at a time.
* The checkpoint is switched through ``POST /options {sd_model_checkpoint}``, which blocks until the
  weights are loaded and is saved to ``config.json``, so a restarted WebUI comes back on it. A
  per-request ``override_settings`` checkpoint is never used: with
  ``override_settings_restore_afterwards`` (default true) the option snaps back after the job while
  the weights stay, and the next job pays a switch nobody asked for.
* ``/interrupt`` is checked between steps and the interrupted call still answers 200 with the
  partly denoised images: those are never returned as a success.
* ``state.begin()`` clears the interrupt flag, so an interrupt sent while the request still waits
  for the lock (a model load, a slow proxy) is lost; the poller sends it again while the call runs.
* A1111 1.9+ silently replaces an unknown sampler name by its default sampler, so the job's sampler
  is checked against ``GET /samplers`` here.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import structlog
from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from sdagent.backends.base import Artifact, Backend, Generation, Health, ProgressCallback
from sdagent.backends.http import json_of, send
from sdagent.errors import BackendError, BackendUnavailable, JobAborted, ModelNotFound, UnsupportedJob
from sdagent.jobs import Job, JobKind, OutputFormat
from sdagent.modelnames import is_listed, match_model

log = structlog.get_logger(__name__)

Clock = Callable[[], float]

API = "/sdapi/v1"

# The poller sleeps in slices this long so that an abort is acted on at once and the poller is
# gone right after the generation call returns, whatever progress_poll_s is.
POLL_SLICE_S = 0.02

# A1111 encodes JPEG and WebP with its jpeg_quality option (default 80); 90 keeps detail at about
# a third of the PNG's size.
JPEG_QUALITY = 90
WEBP_QUALITY = 90

# The smallest generation A1111 accepts: loads the weights onto the GPU and runs the extension
# scripts once, so the first real job does not pay for it (Forge answers before its scripts are ready).
WARM_UP_REQUEST = {
    "prompt": "",
    "steps": 1,
    "width": 64,
    "height": 64,
    "batch_size": 1,
    "n_iter": 1,
    "send_images": False,
    "save_images": False,
}

# A checkpoint title is "<name> [<shorthash>]" once A1111 has hashed the file, "<name>" before.
_HASH_SUFFIX = re.compile(r" \[[0-9a-fA-F]{8,64}\]$")
# A1111's own answer to an unknown sd_model_checkpoint in POST /options (a RuntimeError, so 500).
_UNKNOWN_MODEL = re.compile(r"^model .* not found$")
# The HTTPException details A1111 and Forge answer 500 with for a request that cannot succeed.
_REFUSALS = frozenset({"Invalid encoded image", "Requests not allowed", "Request to local resource not allowed"})

_MEDIA_TYPES: dict[OutputFormat, tuple[str, str]] = {
    OutputFormat.PNG: ("image/png", "png"),
    OutputFormat.JPEG: ("image/jpeg", "jpeg"),
    OutputFormat.WEBP: ("image/webp", "webp"),
}
_PIL_FORMATS = {OutputFormat.PNG: "PNG", OutputFormat.JPEG: "JPEG", OutputFormat.WEBP: "WEBP"}


@dataclass(frozen=True)
class _Checkpoint:
    """One entry of ``GET /sd-models``: ``name`` is what jobs call it (its path under the models dir)."""

    name: str
    title: str
    shorthash: str | None


class A1111Backend(Backend):
    """AUTOMATIC1111 (and API-compatible forks such as Forge) at ``url``.

    ``request_timeout_s`` bounds the connect phase of every call and the whole of the calls that
    answer at once (probes, progress, interrupt). Calls that wait for the GPU (txt2img, img2img,
    a model switch, refresh-checkpoints, which waits for the queue lock) wait up to
    ``generation_timeout_s``; None waits as long as it takes, leaving hangs to the supervisor's
    job timeout, which aborts the job. ``models`` are the names the deployment expects; a missing
    one is named in :meth:`health`'s detail. ``client`` and ``clock`` are seams for tests.
    """

    name = "a1111"

    def __init__(
        self,
        url: str,
        *,
        models: Iterable[str] = (),
        request_timeout_s: float = 30.0,
        progress_poll_s: float = 0.5,
        generation_timeout_s: float | None = None,
        client: httpx.Client | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if request_timeout_s <= 0 or progress_poll_s <= 0:
            raise ValueError("request_timeout_s and progress_poll_s must be > 0")
        if generation_timeout_s is not None and generation_timeout_s <= 0:
            raise ValueError("generation_timeout_s must be > 0 or None")
        self._url = url.rstrip("/")
        self._expected = tuple(dict.fromkeys(models))
        self._timeout = httpx.Timeout(request_timeout_s)
        self._long_timeout = httpx.Timeout(request_timeout_s, read=generation_timeout_s)
        self._progress_poll_s = progress_poll_s
        self._owns_client = client is None
        self._client = client or httpx.Client(timeout=self._timeout)
        self._clock = clock
        # Caches. health() runs on another thread than the jobs: each is replaced whole, never
        # mutated, and dropped when A1111 stops answering (a restarted WebUI is read afresh).
        self._checkpoints: tuple[_Checkpoint, ...] | None = None
        self._loaded: str | None = None
        self._samplers: tuple[frozenset[str], frozenset[str]] | None = None  # (names, schedule labels)

    # --- models and health -----------------------------------------------------------------------

    def health(self) -> Health:
        """Ready when the API lists checkpoints and one is selected; never raises.

        Under ``--nowebui`` the API answers before the start-up model is loaded: a selected
        checkpoint is the best the probe can see, :meth:`warm_up` waits for the load itself.
        """
        try:
            checkpoints = self._fetch_checkpoints()
            selected = self._get("/options").get("sd_model_checkpoint")
        except BackendError as exc:
            return Health(ready=False, detail=str(exc))
        models = tuple(checkpoint.name for checkpoint in checkpoints)
        if not selected:
            return Health(ready=False, detail="API up, no checkpoint selected (none found?)", models=models)
        self._loaded = loaded = self._name_of(selected)
        missing = [model for model in self._expected if not is_listed(model, models)]
        detail = f"missing expected models: {', '.join(missing)}" if missing else "ok"
        return Health(ready=True, detail=detail, models=models, loaded_model=loaded)

    def loaded_model(self) -> str | None:
        if self._loaded is None:
            try:
                self._loaded = self._name_of(self._get("/options").get("sd_model_checkpoint"))
            except BackendError as exc:
                log.warning("a1111.loaded_model_unknown", error=str(exc))
                return None
        return self._loaded

    def canonical_model(self, model: str) -> str:
        checkpoint = self._resolve(model)
        return checkpoint.name if checkpoint is not None else model

    def switch_model(self, model: str) -> None:
        checkpoint = self._resolve(model)
        if checkpoint is None:
            self.refresh_models()  # a file staged since the last scan
            checkpoint = self._resolve(model)
        if checkpoint is None:
            names = [entry.name for entry in self._checkpoints or ()]
            raise ModelNotFound(f"model {model!r} is not among A1111's checkpoints {names}, even after a rescan")
        previous, started = self._loaded, self._clock()
        self._loaded = None  # unknown while loading, and after a failed switch
        self._call("POST", "/options", json={"sd_model_checkpoint": checkpoint.title}, timeout=self._long_timeout)
        options = self._get("/options")
        loaded = self._name_of(options.get("sd_model_checkpoint"))
        if loaded != checkpoint.name:
            raise BackendError(f"A1111 accepted the switch to {checkpoint.name!r} but has {loaded!r} loaded")
        lazy = _loads_on_next_generation(options)
        if lazy:  # the load belongs to the switch, not to the next job's inference (or its stall timer)
            self.warm_up()
        self._loaded = loaded
        log.info("a1111.model_switched", model=model, previous=previous, ms=round((self._clock() - started) * 1000, 1),
                 forced_load=lazy)  # fmt: skip

    def refresh_models(self) -> tuple[str, ...]:
        """Rescan A1111's model folders (after the model cache staged a file); returns the names.

        A1111 rescans under its queue lock, so this waits for a running job to end.
        """
        self._call("POST", "/refresh-checkpoints", timeout=self._long_timeout)
        return tuple(checkpoint.name for checkpoint in self._fetch_checkpoints())

    def warm_up(self) -> float:
        """Run a 1-step 64x64 txt2img (waits for the start-up model load); returns its milliseconds."""
        started = self._clock()
        self._call("POST", "/txt2img", json=WARM_UP_REQUEST, timeout=self._long_timeout)
        return (self._clock() - started) * 1000.0

    def memory(self) -> dict[str, Any]:
        """``GET /memory``: RAM and CUDA figures; ``cuda.events.oom`` counts out-of-memory errors."""
        return self._get("/memory")

    # --- generation -------------------------------------------------------------------------------

    def interrupt(self) -> None:
        """Ask A1111 to stop the running generation; never raises (it is called from other threads)."""
        try:
            self._call("POST", "/interrupt")
        except BackendError as exc:
            log.warning("a1111.interrupt_failed", error=str(exc))

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def generate(self, job: Job, progress: ProgressCallback, abort: threading.Event) -> Generation:
        route = _route(job)
        content_type, extension = _media_type(job.output_format)
        if abort.is_set():
            raise JobAborted("interrupted")
        payload = self._payload(job)
        poller = _ProgressPoller(self, progress, abort, self._progress_poll_s, job.steps)
        started = self._clock()
        poller.start()
        try:
            body = self._call("POST", route, json=payload, timeout=self._long_timeout)
        except BackendError as exc:
            if abort.is_set():
                raise JobAborted("interrupted") from exc
            if isinstance(exc.__cause__, httpx.TimeoutException):
                self.interrupt()  # do not leave it generating for nobody while the job is retried
            raise
        finally:
            poller.stop(timeout=self._timeout.read)
        inference_ms = (self._clock() - started) * 1000.0
        if abort.is_set() or poller.interrupted or self._was_interrupted():
            raise JobAborted("interrupted")  # A1111 answered 200 with partly denoised images
        if not isinstance(body, dict):
            raise BackendError(f"{route} answered {type(body).__name__}, not an object")
        info = _parse_info(body.get("info"))
        self._check_model_ran(job, info)
        if poller.last is not None and poller.last[0] < poller.last[1]:
            progress(poller.last[1], poller.last[1])  # the last steps fell between two polls
        artifacts = self._artifacts(job, body.get("images"), info, content_type, extension)
        log.info(
            "a1111.generated",
            job_id=job.job_id,
            kind=job.kind.value,
            model=job.model,
            seed=info.get("seed"),
            images=len(artifacts),
            format=job.output_format.value,
            inference_ms=round(inference_ms, 1),
        )
        return Generation(artifacts, info=_result_info(job, info), inference_ms=inference_ms)

    def _payload(self, job: Job) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "seed": job.seed,  # -1: A1111 draws one and reports it in info
            "width": job.width,
            "height": job.height,
            "steps": job.steps,
            "cfg_scale": job.cfg_scale,
            "batch_size": job.batch_size,
            "n_iter": 1,  # one batch: all_seeds, progress and interruption then cover the whole job
            "send_images": True,
            "save_images": False,  # also stops the grid image a batch would add
        }
        if job.sampler is not None:
            self._check_sampler(job.sampler)
            payload["sampler_name"] = job.sampler
        if job.kind is JobKind.IMG2IMG:
            assert job.init_image is not None  # the schema requires it for img2img
            if job.init_image.base64 is None:
                raise BackendError("img2img init_image has no base64: the agent inlines S3 images before the backend")
            payload["init_images"] = [job.init_image.base64]
            payload["denoising_strength"] = job.denoising_strength
        return payload

    def _check_sampler(self, sampler: str) -> None:
        if self._samplers is None:
            entries = self._get_list("/samplers")
            names = frozenset(str(entry["name"]) for entry in entries if isinstance(entry, dict) and entry.get("name"))
            self._samplers = (names, self._schedule_labels())
        names, labels = self._samplers
        if sampler in names:
            return
        # "DPM++ 2M Karras": A1111 1.9+ splits a legacy name into sampler and schedule type.
        if any(sampler.endswith(f" {label}") and sampler[: -len(label) - 1] in names for label in labels):
            return
        raise UnsupportedJob(f"sampler {sampler!r} is not one of A1111's samplers: {', '.join(sorted(names))}")

    def _schedule_labels(self) -> frozenset[str]:
        """Schedule type labels and aliases; none before A1111 1.9, which has no /schedulers."""
        try:
            entries = self._get_list("/schedulers")
        except BackendError as exc:
            if isinstance(exc, BackendUnavailable):
                raise
            return frozenset()
        labels: set[str] = set()
        for entry in entries:
            if isinstance(entry, dict):
                labels.update(label for label in [entry.get("label"), *(entry.get("aliases") or [])] if label)
        return frozenset(labels)

    def _was_interrupted(self) -> bool:
        """Whether the call that just answered was interrupted or skipped by anyone.

        The flags stay set after the job ends (only the next ``state.begin()`` clears them). An
        answer that cannot be checked is not trusted: its images may be partial.
        """
        state = self._progress_state()
        return bool(state.get("interrupted") or state.get("skipped"))

    def _progress_state(self) -> dict[str, Any]:
        body = self._get("/progress", params={"skip_current_image": "true"})
        state = body.get("state")
        if not isinstance(state, dict):
            raise BackendError("GET /sdapi/v1/progress answered without a state")
        return state

    def _check_model_ran(self, job: Job, info: dict[str, Any]) -> None:
        """A restarted or shared WebUI may have another model loaded than the agent last set."""
        ran = info.get("sd_model_name")
        expected = os.path.splitext(os.path.basename(job.model))[0]  # A1111's name_for_extra
        if ran and ran != expected:
            self._loaded = None
            raise BackendUnavailable(f"A1111 ran model {ran!r}, not {job.model!r}: it changed under the agent")

    def _artifacts(
        self, job: Job, images: Any, info: dict[str, Any], content_type: str, extension: str
    ) -> list[Artifact]:
        if not isinstance(images, list):
            raise BackendError("A1111 answered without an images list")
        first = info.get("index_of_first_image", 0)  # a grid image comes first when one was made
        first = first if isinstance(first, int) and first >= 0 else 0
        images = images[first : first + job.batch_size]
        if len(images) < job.batch_size:
            raise BackendError(f"A1111 returned {len(images)} images for a batch of {job.batch_size}")
        seeds = info.get("all_seeds")
        seeds = seeds if isinstance(seeds, list) else []
        infotexts = info.get("infotexts")
        infotexts = infotexts if isinstance(infotexts, list) else []
        artifacts = []
        for index, text in enumerate(images):
            infotext = infotexts[index] if index < len(infotexts) and isinstance(infotexts[index], str) else None
            data = _encode(_decode_image(text), job.output_format, infotext)
            seed = seeds[index] if index < len(seeds) and isinstance(seeds[index], int) else None
            artifacts.append(Artifact(data, content_type, extension, seed))
        return artifacts

    # --- checkpoints --------------------------------------------------------------------------------

    def _fetch_checkpoints(self) -> tuple[_Checkpoint, ...]:
        checkpoints = []
        for entry in self._get_list("/sd-models"):
            title = entry.get("title") if isinstance(entry, dict) else None
            if not isinstance(title, str) or not title:
                continue
            shorthash = entry.get("hash")
            name = _strip_hash(title, shorthash if isinstance(shorthash, str) else None)
            checkpoints.append(_Checkpoint(name, title, shorthash if isinstance(shorthash, str) else None))
        self._checkpoints = tuple(checkpoints)
        return self._checkpoints

    def _resolve(self, model: str) -> _Checkpoint | None:
        """The checkpoint a job's model names: same path, or the same path without its extension."""
        checkpoints = self._checkpoints if self._checkpoints is not None else self._fetch_checkpoints()
        by_name = {checkpoint.name: checkpoint for checkpoint in checkpoints}
        found = match_model(model, by_name)
        return by_name[found] if found is not None else None

    def _name_of(self, selected: Any) -> str | None:
        """The job-schema name of what ``sd_model_checkpoint`` holds (a title, usually)."""
        if not isinstance(selected, str) or not selected:
            return None
        for fresh in (False, True):  # a title changes once A1111 hashes a newly staged file
            if fresh or self._checkpoints is None:
                try:
                    self._fetch_checkpoints()
                except BackendError:
                    break
            for checkpoint in self._checkpoints or ():
                if selected in (checkpoint.title, checkpoint.name):
                    return checkpoint.name
        return _HASH_SUFFIX.sub("", selected)

    # --- HTTP ---------------------------------------------------------------------------------------

    def _get(self, path: str, **kwargs: Any) -> dict[str, Any]:
        body = self._call("GET", path, **kwargs)
        if not isinstance(body, dict):
            raise BackendError(f"GET {API}{path} answered {type(body).__name__}, not an object")
        return body

    def _get_list(self, path: str) -> list[Any]:
        body = self._call("GET", path)
        if not isinstance(body, list):
            raise BackendError(f"GET {API}{path} answered {type(body).__name__}, not a list")
        return body

    def _call(self, method: str, path: str, *, timeout: httpx.Timeout | None = None, **kwargs: Any) -> Any:
        what = f"{method} {API}{path}"
        url = f"{self._url}{API}{path}"
        try:
            response = send(self._client, method, url, what=what, timeout=timeout or self._timeout, **kwargs)
            _raise_for_status(response, what)
        except BackendUnavailable:
            self._checkpoints = None
            self._loaded = None
            raise
        return json_of(response)


class _ProgressPoller:
    """Follows one generation from its own thread: reports new steps, interrupts on abort.

    Waits are real time (not the backend's clock seam): they pace HTTP requests.
    """

    def __init__(
        self, backend: A1111Backend, progress: ProgressCallback, abort: threading.Event, interval_s: float,
        job_steps: int,
    ) -> None:  # fmt: skip
        self._backend = backend
        self._job_steps = job_steps
        self._progress = progress
        self._abort = abort
        self._interval_s = interval_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="a1111-progress", daemon=True)
        self.interrupted = False  # A1111's state said interrupted or skipped while the job ran
        self.last: tuple[int, int] | None = None  # the last (step, steps) reported

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None) -> None:
        """Stop and wait, so no interrupt of this job can reach the next one."""
        self._done.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        next_poll = time.monotonic() + self._interval_s
        next_interrupt = 0.0
        while not self._done.wait(min(POLL_SLICE_S, self._interval_s)):
            now = time.monotonic()
            if self._abort.is_set():
                # Sent again every interval: one that lands before A1111 starts the job is lost.
                if now >= next_interrupt:
                    self._backend.interrupt()
                    next_interrupt = now + self._interval_s
            elif now >= next_poll:
                self._poll()
                next_poll = time.monotonic() + self._interval_s

    def _poll(self) -> None:
        try:
            state = self._backend._progress_state()
        except BackendError as exc:
            log.debug("a1111.progress_failed", error=str(exc))
            return
        if state.get("job_count", 0) == 0:
            return  # not started yet (waiting for the lock) or over: the fields are stale
        if state.get("interrupted") or state.get("skipped"):
            self.interrupted = True
        step, steps = state.get("sampling_step"), state.get("sampling_steps")
        # Step 0 may come with the last job's sampling_steps (A1111 sets them once sampling starts).
        if not isinstance(step, int) or not isinstance(steps, int) or steps <= 0 or step < 1:
            return
        # Reported in the job's steps: img2img samples t_enc + 1 of them (11 for 20 at 0.5).
        step, steps = min(self._job_steps, round(step * self._job_steps / steps)), self._job_steps
        if (step, steps) == self.last or self._done.is_set():
            return
        self.last = (step, steps)
        try:
            self._progress(step, steps)
        except Exception:  # noqa: BLE001 - the caller's bug must not stop the interrupt duty
            log.exception("a1111.progress_callback_failed")


# --- mapping ----------------------------------------------------------------------------------------


def _route(job: Job) -> str:
    if job.kind is JobKind.TXT2IMG:
        return "/txt2img"
    if job.kind is JobKind.IMG2IMG:
        return "/img2img"
    if job.kind is JobKind.TXT2VID:
        raise UnsupportedJob(
            "txt2vid: A1111's API generates no video (AnimateDiff is an extension, out of scope "
            "for this backend); send video jobs to a ComfyUI fleet"
        )
    raise UnsupportedJob("workflow jobs are raw ComfyUI graphs; only the ComfyUI backend runs them")


def _media_type(fmt: OutputFormat) -> tuple[str, str]:
    if fmt not in _MEDIA_TYPES:
        raise UnsupportedJob(f"output format {fmt.value}: A1111 makes images (png, jpeg, webp)")
    return _MEDIA_TYPES[fmt]


def _strip_hash(title: str, shorthash: str | None) -> str:
    if shorthash and title.endswith(f" [{shorthash}]"):
        return title[: -len(shorthash) - 3]
    return title


def _parse_info(raw: Any) -> dict[str, Any]:
    """``info`` is ``Processed.js()``: a JSON document sent as a string."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        log.warning("a1111.info_unreadable", info=raw[:200])
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _result_info(job: Job, info: dict[str, Any]) -> dict[str, Any]:
    """What A1111 says it did, echoed in the job's result (same keys as the simulated backend)."""
    seeds = info.get("all_seeds")
    result = {
        "seed": info.get("seed"),
        "all_seeds": seeds[: job.batch_size] if isinstance(seeds, list) else None,
        "model": job.model,
        "sd_model_name": info.get("sd_model_name"),
        "sd_model_hash": info.get("sd_model_hash"),
        "sampler": info.get("sampler_name"),
        "steps": info.get("steps"),
        "cfg_scale": info.get("cfg_scale"),
        "width": info.get("width"),
        "height": info.get("height"),
        "denoising_strength": info.get("denoising_strength") if job.kind is JobKind.IMG2IMG else None,
        "version": info.get("version"),
        "simulator": info.get("simulator"),  # the simulator marks everything it makes
    }
    return {key: value for key, value in result.items() if value is not None}


def _decode_image(text: Any) -> bytes:
    if not isinstance(text, str):
        raise BackendError("A1111 answered an image that is not a base64 string")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BackendError(f"A1111 answered an image that is not valid base64: {exc}") from None


def _sniff(data: bytes) -> OutputFormat | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return OutputFormat.PNG
    if data.startswith(b"\xff\xd8\xff"):
        return OutputFormat.JPEG
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return OutputFormat.WEBP
    return None


def _encode(data: bytes, fmt: OutputFormat, infotext: str | None) -> bytes:
    """The image in ``fmt``, converted with Pillow when A1111 sent another format.

    A1111 encodes API images in its global ``samples_format`` option (PNG by default). Setting that
    option per job would need ``override_settings``, which are restored *before* the images are
    encoded, or a global change that also alters what the WebUI saves; so the agent converts. The
    generation parameters go where A1111 itself puts them: a PNG text chunk, an EXIF UserComment.
    """
    if _sniff(data) is fmt:
        return data
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise BackendError(f"A1111 answered an image Pillow cannot read: {exc}") from None
    out = io.BytesIO()
    if fmt is OutputFormat.PNG:
        pnginfo = PngImagePlugin.PngInfo()
        if infotext:
            pnginfo.add_text("parameters", infotext)
        image.save(out, format="PNG", pnginfo=pnginfo)
        return out.getvalue()
    if image.mode not in ("RGB", "L"):
        # JPEG has no alpha; A1111 drops it the same way. (Pillow types open() as ImageFile.)
        image = image.convert("RGB")  # type: ignore[assignment]
    exif = Image.Exif()
    if infotext:
        # EXIF UserComment: an 8-byte charset prefix, then the text (piexif's "unicode" = UTF-16BE).
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = b"UNICODE\0" + infotext.encode("utf-16-be")
    quality = JPEG_QUALITY if fmt is OutputFormat.JPEG else WEBP_QUALITY
    image.save(out, format=_PIL_FORMATS[fmt], quality=quality, exif=exif)
    return out.getvalue()


def _loads_on_next_generation(options: dict[str, Any]) -> bool:
    """Forge (same API) only records ``POST /options``' checkpoint and loads it in the next generation.

    Its options, unlike A1111's, carry ``forge_preset``.
    """
    return "forge_preset" in options


def _raise_for_status(response: httpx.Response, what: str) -> None:
    """Map a non-2xx answer of A1111 onto the error hierarchy.

    A1111 answers errors as ``{error: <exception class>, detail, body, errors: str(exception)}``
    (``api.py``, ``handle_exception``) and validation failures as FastAPI's 422 ``{detail: [...]}``.
    """
    status = response.status_code
    if status < 400:
        return
    body = json_of(response)
    body = body if isinstance(body, dict) else {}
    error = str(body.get("error") or "")
    detail = body.get("detail")
    errors = str(body.get("errors") or "")
    # What the server said, wherever it put it: forks and proxies drop ``errors`` or use ``message``.
    refusal = detail if isinstance(detail, str) and detail else str(body.get("message") or "")
    said = errors or refusal or response.text[:300]
    if error == "OutOfMemoryError" or "out of memory" in said.lower():
        raise BackendError(f"{what}: the GPU ran out of memory: {said}")
    if status == 422:
        raise BackendError(f"{what}: A1111 rejected the request: {_validation_detail(detail)}")
    if status == 404 and detail == "Model not found":
        raise ModelNotFound(f"{what}: A1111 does not know the model")
    if status == 404 and detail == "Not Found":
        raise BackendError(f"{what}: no such route (is the WebUI started with --api or --nowebui?)")
    if status == 404 and detail == "Sampler not found":
        raise UnsupportedJob(f"{what}: A1111 does not know the sampler")
    if status == 500 and any(_UNKNOWN_MODEL.match(text) for text in (errors, refusal)):
        raise ModelNotFound(f"{what}: {said}")
    if status in (401, 403):
        raise BackendError(f"{what}: {status} not authorised (does A1111 run with --api-auth?)")
    if status >= 500 and (error == "HTTPException" or refusal in _REFUSALS):
        # A deliberate refusal of this request ("Invalid encoded image"): retrying cannot help.
        raise BackendError(f"{what}: {status} {said}")
    if status >= 500 or status == 429:
        raise BackendUnavailable(f"{what}: A1111 answered {status}: {error + ': ' if error else ''}{said}")
    raise BackendError(f"{what}: A1111 answered {status}: {said}")


def _validation_detail(detail: Any) -> str:
    """FastAPI's ``[{loc: ["body", "width"], msg}]`` as ``width: msg; ...``."""
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for item in detail:
        if not isinstance(item, dict):
            parts.append(str(item))
            continue
        loc = [str(part) for part in item.get("loc", []) if part != "body"]
        parts.append(f"{'.'.join(loc) or '(body)'}: {item.get('msg', '')}")
    return "; ".join(parts)
