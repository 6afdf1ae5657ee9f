"""An in-process simulated backend: real, deterministic outputs without a model or a GPU.

It stands in for a GPU WebUI in unit tests, benchmarks and the local demo. A job costs
``steps * step_latency_s`` of interruptible waiting and returns real files (PNG, JPEG, WebP images;
GIF, animated WebP, MP4, WebM videos) drawn from the seed and the prompt, so the agent's upload and
result paths run exactly as in production. :class:`FaultPlan` injects the failures a real WebUI
has: unreachable, out of memory, hung.
"""

from __future__ import annotations

import base64
import binascii
import collections
import enum
import functools
import hashlib
import io
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import structlog
from PIL import Image, ImageChops, ImageDraw

from sdagent.backends.base import Artifact, Backend, Generation, Health, ProgressCallback
from sdagent.errors import BackendError, BackendUnavailable, JobAborted, ModelNotFound, UnsupportedJob
from sdagent.jobs import Job, JobKind, OutputFormat

# Initial values, not .bind(): binding at import would freeze structlog's configuration before
# the command line sets it up.
log = structlog.get_logger(__name__, simulator=True)

Clock = Callable[[], float]
Wait = Callable[[threading.Event, float], bool]
"""Block on an event for at most ``timeout`` seconds; ``threading.Event.wait`` unless a test fakes time."""

# A thread cannot wait on two Events at once: the sleep waits on the interrupt event (woken at
# once by interrupt(), which the agent calls after setting abort) and looks at the caller's abort
# event at least this often, so an abort alone is noticed within this delay.
ABORT_POLL_S = 0.01

DEFAULT_SAMPLER = "Euler a"  # what AUTOMATIC1111 reports when the job names none

# Bounded so a long benchmark with random seeds cannot grow memory without limit; 64 images of
# 512x512 PNG are a few MiB.
IMAGE_CACHE_SIZE = 64
VIDEO_CACHE_SIZE = 8

_MEDIA_TYPES: dict[OutputFormat, tuple[str, str]] = {
    OutputFormat.PNG: ("image/png", "png"),
    OutputFormat.JPEG: ("image/jpeg", "jpeg"),
    OutputFormat.WEBP: ("image/webp", "webp"),
    OutputFormat.GIF: ("image/gif", "gif"),
    OutputFormat.MP4: ("video/mp4", "mp4"),
    OutputFormat.WEBM: ("video/webm", "webm"),
}
_IMAGE_FORMATS = frozenset({OutputFormat.PNG, OutputFormat.JPEG, OutputFormat.WEBP})
# WebP is an image format in the job schema; should a txt2vid job ever carry it, it is animated.
_VIDEO_FORMATS = frozenset({OutputFormat.GIF, OutputFormat.WEBP, OutputFormat.MP4, OutputFormat.WEBM})


@dataclass(frozen=True)
class _AvEncoder:
    codec: str
    options: dict[str, str]
    bit_rate: int | None = None


# Encoder preference per container: the first one this PyAV build has wins. Settings trade size
# for speed: 16 frames of 512x512 take about 60 ms with libx264 ultrafast and 70 ms with VP9 in
# realtime mode at 1 Mb/s; VP8 measured slower and far less steady (50 to 800 ms) on a busy host.
_AV_ENCODERS: dict[OutputFormat, tuple[_AvEncoder, ...]] = {
    OutputFormat.MP4: (
        _AvEncoder("libx264", {"preset": "ultrafast", "tune": "zerolatency", "crf": "28"}),
        _AvEncoder("mpeg4", {}),
    ),
    OutputFormat.WEBM: (
        _AvEncoder("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8"}, bit_rate=1_000_000),
        _AvEncoder("libvpx", {"deadline": "realtime", "cpu-used": "8"}),
    ),
}


# --- fault injection -----------------------------------------------------------------------------


class FaultKind(str, enum.Enum):
    UNAVAILABLE = "unavailable"  # BackendUnavailable: the agent retries with backoff
    ERROR = "error"  # BackendError: the job fails for good
    HANG = "hang"  # blocks until the job is aborted or interrupted


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    message: str


@dataclass
class FaultPlan:
    """Failures the next :meth:`SimulatedBackend.generate` calls meet, in order; thread-safe.

    Tests set it at runtime, e.g. ``backend.faults.fail_next(2)`` then ``.hang_next()``.
    """

    calls: int = field(default=0, init=False)  # generate calls so far, faulted or not
    _pending: collections.deque[Fault] = field(default_factory=collections.deque, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def fail_next(self, n: int = 1, *, transient: bool = True, message: str | None = None) -> FaultPlan:
        """Make the next ``n`` calls raise BackendUnavailable (transient) or BackendError."""
        if transient:
            fault = Fault(FaultKind.UNAVAILABLE, message or "simulated backend unreachable (injected fault)")
        else:
            fault = Fault(FaultKind.ERROR, message or "CUDA out of memory (simulated, injected fault)")
        return self._add(fault, n)

    def hang_next(self, n: int = 1) -> FaultPlan:
        """Make the next ``n`` calls block until aborted or interrupted, like a stuck WebUI."""
        return self._add(Fault(FaultKind.HANG, "simulated hang (injected fault)"), n)

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def next_call(self) -> Fault | None:
        """Count one generate call and return the fault it meets, if any."""
        with self._lock:
            self.calls += 1
            return self._pending.popleft() if self._pending else None

    def _add(self, fault: Fault, n: int) -> FaultPlan:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        with self._lock:
            self._pending.extend([fault] * n)
        return self


# --- the backend ---------------------------------------------------------------------------------


class SimulatedBackend(Backend):
    """A simulated WebUI: fixed model list, configurable latencies, deterministic outputs.

    ``clock`` and ``wait`` are the time seams: tests pass a fake clock and a ``wait`` that advances
    it. ``rng`` picks the seed of ``seed: -1`` jobs.
    """

    name = "simulated"

    def __init__(
        self,
        models: Iterable[str],
        *,
        step_latency_s: float = 0.0,
        switch_latency_s: float = 0.0,
        initial_model: str | None = None,
        clock: Clock = time.monotonic,
        wait: Wait = threading.Event.wait,
        rng: random.Random | None = None,
        faults: FaultPlan | None = None,
        models_dir: Path | None = None,
    ) -> None:
        self._declared = tuple(dict.fromkeys(models))  # keeps order, drops duplicates
        self._models_dir = models_dir
        self._models = self._declared
        if initial_model is not None and initial_model not in self._models:
            raise ValueError(f"initial_model {initial_model!r} is not one of {list(self._models)}")
        if step_latency_s < 0 or switch_latency_s < 0:
            raise ValueError("latencies must be >= 0")
        self._step_latency_s = step_latency_s
        self._switch_latency_s = switch_latency_s
        self._loaded: str | None = initial_model
        self._clock = clock
        self._wait = wait
        self._rng = rng or random.Random()
        self.faults = faults or FaultPlan()
        self._lock = threading.Lock()
        self._interrupt: threading.Event | None = None  # the running generation's, else None
        self._never = threading.Event()  # model switches are not interruptible

    # --- models and health ---

    def health(self) -> Health:
        return Health(ready=True, detail="simulator", models=self._models, loaded_model=self._loaded)

    def loaded_model(self) -> str | None:
        return self._loaded

    def refresh_models(self) -> tuple[str, ...]:
        """The declared models plus the files under ``models_dir``, as a WebUI's rescan finds them."""
        staged: tuple[str, ...] = ()
        if self._models_dir is not None and self._models_dir.is_dir():
            staged = tuple(sorted(p.relative_to(self._models_dir).as_posix()
                                  for p in self._models_dir.rglob("*") if p.is_file()))  # fmt: skip
        self._models = tuple(dict.fromkeys((*self._declared, *staged)))
        return self._models

    def switch_model(self, model: str) -> None:
        if model not in self._models:
            raise ModelNotFound(f"model {model!r} is not one of the simulator's models {list(self._models)}")
        if model == self._loaded:
            return
        started = self._clock()
        if self._switch_latency_s > 0:
            self._wait(self._never, self._switch_latency_s)
        previous, self._loaded = self._loaded, model
        log.info("sim.model_switched", model=model, previous=previous, ms=_ms_since(started, self._clock))

    # --- generation ---

    def interrupt(self) -> None:
        with self._lock:
            if self._interrupt is not None:
                self._interrupt.set()
                log.info("sim.interrupted")

    def close(self) -> None:
        self.interrupt()

    def generate(self, job: Job, progress: ProgressCallback, abort: threading.Event) -> Generation:
        fault = self.faults.next_call()
        interrupted = threading.Event()  # per generation, so an interrupt() while idle is a no-op
        with self._lock:
            self._interrupt = interrupted
        try:
            started = self._clock()
            if fault is not None:
                self._apply(fault, abort, interrupted)
            self._check_runnable(job)
            init_image = _decode_init_image(job) if job.kind is JobKind.IMG2IMG else None
            self._run_steps(job.steps, progress, abort, interrupted)
            seed = job.seed if job.seed != -1 else self._rng.randrange(2**32 - 1)
            artifacts = _render_artifacts(job, seed, init_image)
            inference_ms = _ms_since(started, self._clock)
        finally:
            with self._lock:
                self._interrupt = None
        log.info(
            "sim.generated",
            job_id=job.job_id,
            kind=job.kind.value,
            model=job.model,
            seed=seed,
            batch_size=job.batch_size,
            format=job.output_format.value,
            inference_ms=round(inference_ms, 3),
        )
        return Generation(artifacts, info=self._info(job, seed), inference_ms=inference_ms)

    def _apply(self, fault: Fault, abort: threading.Event, interrupted: threading.Event) -> None:
        log.info("sim.fault_injected", fault=fault.kind.value, calls=self.faults.calls)
        if fault.kind is FaultKind.UNAVAILABLE:
            raise BackendUnavailable(fault.message)
        if fault.kind is FaultKind.ERROR:
            raise BackendError(fault.message)
        self._sleep(math.inf, abort, interrupted)  # only an abort or an interrupt ends it

    def _check_runnable(self, job: Job) -> None:
        if job.kind is JobKind.WORKFLOW:
            raise UnsupportedJob("workflow jobs are raw ComfyUI graphs; only the ComfyUI backend runs them")
        if job.model != self._loaded:
            raise BackendError(f"model {job.model!r} is not loaded (loaded: {self._loaded!r}); switch_model first")
        fmt = job.output_format
        if fmt not in (_VIDEO_FORMATS if job.kind is JobKind.TXT2VID else _IMAGE_FORMATS):
            raise UnsupportedJob(f"output format {fmt.value} does not fit kind {job.kind.value}")
        if fmt in _AV_ENCODERS:
            _pick_av_encoder(fmt)  # fails before the steps run, not after

    def _run_steps(
        self, steps: int, progress: ProgressCallback, abort: threading.Event, interrupted: threading.Event
    ) -> None:
        if self._step_latency_s <= 0:
            self._sleep(0.0, abort, interrupted)  # still honours an abort set before the start
            progress(steps, steps)
            return
        for step in range(1, steps + 1):
            self._sleep(self._step_latency_s, abort, interrupted)
            progress(step, steps)

    def _sleep(self, seconds: float, abort: threading.Event, interrupted: threading.Event) -> None:
        """Wait ``seconds``, raising JobAborted as soon as the job is aborted or interrupted."""
        deadline = self._clock() + seconds
        while True:
            if abort.is_set() or interrupted.is_set():
                raise JobAborted("interrupted")
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            self._wait(interrupted, min(remaining, ABORT_POLL_S))

    def _info(self, job: Job, seed: int) -> dict[str, object]:
        return {
            "seed": seed,
            "all_seeds": [seed + index for index in range(job.batch_size)],
            "model": job.model,
            "model_hash": model_hash(job.model),
            "sampler": job.sampler or DEFAULT_SAMPLER,
            "steps": job.steps,
            "simulator": True,
        }


def model_hash(model: str) -> str:
    """A stable stand-in for the checkpoint hash A1111 reports: 10 hex digits of sha256(name)."""
    return hashlib.sha256(model.encode()).hexdigest()[:10]


def clear_output_cache() -> None:
    """Drop cached encodings, so a benchmark or a test can measure or check a cold render."""
    _encoded_image.cache_clear()
    _encoded_video.cache_clear()


def _ms_since(started: float, clock: Clock) -> float:
    return (clock() - started) * 1000.0


# --- outputs -------------------------------------------------------------------------------------


def _render_artifacts(job: Job, seed: int, init_image: Image.Image | None) -> list[Artifact]:
    """One artifact per batch item; item ``i`` is drawn from seed ``seed + i``, as in A1111."""
    fmt = job.output_format
    key = _prompt_key(job)
    artifacts = []
    for index in range(job.batch_size):
        item_seed = seed + index
        if job.kind is JobKind.TXT2VID:
            assert job.video is not None  # the schema requires it for txt2vid
            data = _encoded_video(job.width, job.height, item_seed, key, fmt, job.video.frames, job.video.fps)
        else:
            if init_image is None:
                data = _encoded_image(job.width, job.height, item_seed, key, fmt)
            else:
                data = _blended_image(init_image, job, item_seed, key)
        content_type, extension = _MEDIA_TYPES[fmt]
        artifacts.append(Artifact(data, content_type, extension, seed=item_seed))
    return artifacts


def _prompt_key(job: Job) -> str:
    digest = hashlib.sha256(f"{job.prompt}\0{job.negative_prompt}".encode())
    return digest.hexdigest()[:16]


# The cache keys are all the inputs of a pure function, so a hit returns the very bytes a cold
# render would: a benchmark with a zero-latency simulator then measures the agent, not Pillow.
@functools.lru_cache(maxsize=IMAGE_CACHE_SIZE)
def _encoded_image(width: int, height: int, seed: int, prompt_key: str, fmt: OutputFormat) -> bytes:
    return _encode_image(_render(width, height, seed, prompt_key), fmt)


@functools.lru_cache(maxsize=VIDEO_CACHE_SIZE)
def _encoded_video(
    width: int, height: int, seed: int, prompt_key: str, fmt: OutputFormat, frames: int, fps: int
) -> bytes:
    base = _render(width, height, seed, prompt_key)
    if fmt in _AV_ENCODERS:
        return _encode_av(_frames(base, frames), width, height, fps, fmt)
    if fmt is OutputFormat.GIF:
        # One fast palette for every frame: Pillow would otherwise quantize each RGB frame with
        # median cut, about 50x slower (4 s instead of 50 ms for 16 frames of 512x512).
        base = base.quantize(256, method=Image.Quantize.FASTOCTREE)
    return _encode_animation(list(_frames(base, frames)), fps, fmt)


def _blended_image(init_image: Image.Image, job: Job, seed: int, prompt_key: str) -> bytes:
    # denoising_strength plays its A1111 role: 0 keeps the init image, 1 replaces it.
    source = init_image.resize((job.width, job.height))
    pattern = _render(job.width, job.height, seed, prompt_key)
    return _encode_image(Image.blend(source, pattern, job.denoising_strength), job.output_format)


def _render(width: int, height: int, seed: int, prompt_key: str) -> Image.Image:
    """A colourful picture that only depends on its arguments: gradients, discs and the seed."""
    rng = random.Random(f"{seed}/{prompt_key}")  # str seeds are hashed with sha512: stable across runs
    vertical = Image.linear_gradient("L").resize((width, height))
    horizontal = Image.linear_gradient("L").rotate(90).resize((width, height))
    diagonal = ImageChops.add(vertical, horizontal, scale=2.0)
    image = Image.merge("RGB", [band.point(_wave(rng)) for band in (horizontal, vertical, diagonal)])
    draw = ImageDraw.Draw(image)
    short_side = min(width, height)
    for _ in range(3):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(short_side // 8, short_side // 3)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    draw.text((4, 4), f"simulated seed {seed}", fill=(255, 255, 255))
    return image


def _wave(rng: random.Random) -> list[int]:
    """A lookup table folding 0..255 into a triangle wave, so the gradients band smoothly."""
    gain, phase = rng.randrange(1, 4), rng.randrange(512)
    table = []
    for value in range(256):
        folded = (value * gain + phase) % 512
        table.append(folded if folded < 256 else 511 - folded)
    return table


def _frames(base: Image.Image, count: int) -> Iterator[Image.Image]:
    """The base picture scrolling sideways; consecutive frames always differ."""
    step = max(1, base.width // count)
    for index in range(count):
        yield ImageChops.offset(base, (index * step) % base.width, 0)


def _encode_image(image: Image.Image, fmt: OutputFormat) -> bytes:
    buffer = io.BytesIO()
    if fmt is OutputFormat.PNG:
        # The fastest zlib level: 5 ms instead of 9 ms for 512x512, for a file 1.6x larger.
        image.save(buffer, format="PNG", compress_level=1)
    elif fmt is OutputFormat.JPEG:
        image.save(buffer, format="JPEG", quality=85)
    elif fmt is OutputFormat.WEBP:
        image.save(buffer, format="WEBP", quality=80, method=0)  # method 0: fastest encoder effort
    else:
        raise UnsupportedJob(f"output format {fmt.value} is not an image format")
    return buffer.getvalue()


def _encode_animation(frames: list[Image.Image], fps: int, fmt: OutputFormat) -> bytes:
    """GIF or animated WebP through Pillow; both loop forever like an A1111 animation."""
    buffer = io.BytesIO()
    duration_ms = round(1000 / fps)
    options: dict[str, object] = {
        "save_all": True,
        "append_images": frames[1:],
        "duration": duration_ms,
        "loop": 0,
    }
    if fmt is OutputFormat.WEBP:
        options.update(quality=60, method=0)
    else:
        options.update(optimize=False)  # the shared palette is already final
    frames[0].save(buffer, format=fmt.value.upper(), **options)
    return buffer.getvalue()


def _encode_av(frames: Iterator[Image.Image], width: int, height: int, fps: int, fmt: OutputFormat) -> bytes:
    """MP4 (H.264) or WebM (VP8) through PyAV; frames are encoded as they are drawn."""
    av = _import_av()
    encoder = _pick_av_encoder(fmt)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt.value) as container:
        stream = container.add_stream(encoder.codec, rate=fps, options=dict(encoder.options))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if encoder.bit_rate is not None:
            stream.bit_rate = encoder.bit_rate
        stream.time_base = Fraction(1, fps)
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_image(image)
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames
    return buffer.getvalue()


def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:
        raise UnsupportedJob(
            f"mp4 and webm outputs need PyAV (pip install 'sdagent[sim]'), which is not importable: {exc}"
        ) from None
    return av


@functools.cache
def _available_av_encoder(fmt: OutputFormat) -> _AvEncoder | None:
    av = _import_av()
    for encoder in _AV_ENCODERS[fmt]:
        try:
            av.codec.Codec(encoder.codec, "w")
        except Exception:  # PyAV raises its own UnknownCodecError, a ValueError on some versions
            continue
        return encoder
    return None


def _pick_av_encoder(fmt: OutputFormat) -> _AvEncoder:
    _import_av()  # outside the cache below, so a missing PyAV is reported on every job
    found = _available_av_encoder(fmt)
    if found is None:
        names = ", ".join(encoder.codec for encoder in _AV_ENCODERS[fmt])
        raise UnsupportedJob(f"this PyAV build has no {fmt.value} encoder (tried {names})")
    return found


# --- img2img input -------------------------------------------------------------------------------


def _decode_init_image(job: Job) -> Image.Image:
    init = job.init_image
    assert init is not None  # the schema requires it for img2img
    if init.base64 is None:
        raise UnsupportedJob(
            "init_image.s3_uri is resolved by the agent before the backend; the simulator takes base64"
        )
    text = init.base64
    if text.startswith("data:"):  # a data URL, as browsers and the A1111 API accept
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BackendError(f"init_image.base64 is not valid base64: {exc}") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")  # convert() loads the pixels, so a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BackendError(f"init_image.base64 is not an image Pillow can read: {exc}") from None
