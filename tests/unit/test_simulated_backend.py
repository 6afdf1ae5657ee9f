"""The simulated backend: real outputs, deterministic seeds, interruptible steps, injected faults."""

from __future__ import annotations

import base64
import io
import random
import sys
import threading
import time
from typing import Any

import pytest
from PIL import Image

from sdagent.backends import simulated
from sdagent.backends.simulated import FaultPlan, SimulatedBackend, model_hash
from sdagent.errors import BackendError, BackendUnavailable, JobAborted, ModelNotFound, UnsupportedJob
from sdagent.jobs import Job, OutputFormat, OutputSpec

MODEL = "sd15/base.safetensors"
OTHER = "sdxl/base.safetensors"


class FakeTime:
    """A clock and an Event wait that advance virtual time instead of sleeping."""

    def __init__(self, on_wait: Any = None) -> None:
        self.now = 0.0
        self.waited: list[float] = []
        self.on_wait = on_wait

    def clock(self) -> float:
        return self.now

    def wait(self, event: threading.Event, timeout: float) -> bool:
        self.waited.append(timeout)
        self.now += timeout
        if self.on_wait is not None:
            self.on_wait(len(self.waited))
        return event.is_set()


def make_backend(**kwargs: Any) -> SimulatedBackend:
    kwargs.setdefault("initial_model", MODEL)
    return SimulatedBackend([MODEL, OTHER], **kwargs)


def make_job(**fields: Any) -> Job:
    fields.setdefault("model", MODEL)
    fields.setdefault("width", 64)
    fields.setdefault("height", 64)
    fields.setdefault("steps", 4)
    fields.setdefault("seed", 1234)
    return Job(**fields)


def run(backend: SimulatedBackend, job: Job, abort: threading.Event | None = None) -> Any:
    return backend.generate(job, lambda step, steps: None, abort or threading.Event())


def png_base64(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def real_wait_signalling(entered: threading.Event) -> Any:
    """A real Event wait that first tells the test the generation is now waiting."""

    def wait(event: threading.Event, timeout: float) -> bool:
        entered.set()
        return event.wait(timeout)

    return wait


def start_in_thread(
    backend: SimulatedBackend, job: Job, abort: threading.Event
) -> tuple[threading.Thread, dict[str, Any]]:
    """Run generate in a thread; ``first_step`` is set on progress, ``error`` and ``elapsed`` at the end."""
    outcome: dict[str, Any] = {"first_step": threading.Event()}

    def target() -> None:
        started = time.monotonic()
        try:
            backend.generate(job, lambda step, steps: outcome["first_step"].set(), abort)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc
        outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


# --- images ---


@pytest.mark.parametrize(
    ("fmt", "pillow_format", "content_type"),
    [("png", "PNG", "image/png"), ("jpeg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp")],
)
def test_txt2img_returns_batch_of_real_images_of_requested_size_and_format(fmt, pillow_format, content_type):
    generation = run(make_backend(), make_job(width=128, height=64, batch_size=2, output={"format": fmt}))

    assert len(generation.artifacts) == 2
    for artifact in generation.artifacts:
        image = open_image(artifact.data)
        assert (image.format, image.size) == (pillow_format, (128, 64))
        assert (artifact.content_type, artifact.extension) == (content_type, fmt)


def test_fixed_seed_gives_identical_bytes_even_after_the_cache_is_dropped():
    job = make_job(seed=77, prompt="a lighthouse")
    first = run(make_backend(), job).artifacts[0].data
    simulated.clear_output_cache()
    again = run(make_backend(), job).artifacts[0].data

    assert first == again
    assert run(make_backend(), make_job(seed=78, prompt="a lighthouse")).artifacts[0].data != first
    assert run(make_backend(), make_job(seed=77, prompt="a harbour")).artifacts[0].data != first


def test_batch_items_carry_consecutive_seeds_and_reproduce_alone_like_a1111():
    batch = run(make_backend(), make_job(seed=10, batch_size=3))
    single = run(make_backend(), make_job(seed=12))

    assert [artifact.seed for artifact in batch.artifacts] == [10, 11, 12]
    assert batch.info["all_seeds"] == [10, 11, 12]
    assert batch.artifacts[2].data == single.artifacts[0].data


def test_random_seed_is_picked_and_reported():
    generation = run(make_backend(rng=random.Random(5)), make_job(seed=-1, batch_size=2))

    seed = generation.info["seed"]
    assert 0 <= seed < 2**32 - 1
    assert [artifact.seed for artifact in generation.artifacts] == [seed, seed + 1]
    assert run(make_backend(), make_job(seed=seed)).artifacts[0].data == generation.artifacts[0].data


def test_info_names_model_hash_sampler_and_simulator():
    info = run(make_backend(), make_job(sampler="DPM++ 2M")).info
    default = run(make_backend(), make_job()).info

    assert info["model"] == MODEL
    assert info["model_hash"] == model_hash(MODEL) and len(info["model_hash"]) == 10
    assert info["simulator"] is True
    assert (info["sampler"], default["sampler"]) == ("DPM++ 2M", "Euler a")


# --- steps, progress, abort and interrupt ---


def test_steps_wait_step_latency_and_report_progress_each_step():
    fake = FakeTime()
    backend = make_backend(step_latency_s=0.5, clock=fake.clock, wait=fake.wait)
    calls: list[tuple[int, int]] = []

    generation = backend.generate(make_job(steps=4), lambda step, steps: calls.append((step, steps)), threading.Event())

    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert fake.now == pytest.approx(2.0)
    assert generation.inference_ms == pytest.approx(2000.0)


def test_zero_latency_reports_progress_once_at_the_end_without_waiting():
    fake = FakeTime()
    calls: list[tuple[int, int]] = []

    make_backend(clock=fake.clock, wait=fake.wait).generate(
        make_job(steps=30), lambda step, steps: calls.append((step, steps)), threading.Event()
    )

    assert calls == [(30, 30)]
    assert fake.waited == []


def test_abort_set_before_the_start_raises_without_output():
    abort = threading.Event()
    abort.set()

    with pytest.raises(JobAborted) as caught:
        run(make_backend(), make_job(), abort)
    assert caught.value.why == "interrupted"


def test_abort_stops_a_running_generation_quickly():
    backend = make_backend(step_latency_s=0.05)
    abort = threading.Event()
    thread, outcome = start_in_thread(backend, make_job(steps=200), abort)  # 10 s if never aborted

    assert outcome["first_step"].wait(2)
    abort.set()
    thread.join(1)

    assert not thread.is_alive()
    assert isinstance(outcome["error"], JobAborted)
    assert outcome["elapsed"] < 0.5


def test_interrupt_wakes_a_running_generation_at_once():
    waiting = threading.Event()
    backend = make_backend(step_latency_s=5.0, wait=real_wait_signalling(waiting))  # outlasts the test
    thread, outcome = start_in_thread(backend, make_job(steps=2), threading.Event())
    assert waiting.wait(2)

    started = time.monotonic()
    backend.interrupt()
    thread.join(1)

    assert isinstance(outcome["error"], JobAborted)
    assert time.monotonic() - started < 0.2


def test_interrupt_while_idle_does_not_abort_the_next_job():
    backend = make_backend()
    backend.interrupt()

    assert len(run(backend, make_job()).artifacts) == 1


# --- models and kinds ---


def test_health_lists_models_and_the_loaded_one():
    health = make_backend().health()

    assert health.ready
    assert health.models == (MODEL, OTHER)
    assert health.loaded_model == MODEL


def test_switch_model_waits_its_latency_and_loads_the_model():
    fake = FakeTime()
    backend = make_backend(switch_latency_s=3.0, clock=fake.clock, wait=fake.wait)

    backend.switch_model(OTHER)

    assert backend.loaded_model() == OTHER
    assert fake.now == pytest.approx(3.0)


def test_switch_to_an_unknown_model_raises_model_not_found():
    backend = make_backend()

    with pytest.raises(ModelNotFound, match="nope"):
        backend.switch_model("nope")
    assert backend.loaded_model() == MODEL


def test_no_model_is_loaded_unless_named_and_generate_does_not_switch_by_itself():
    backend = SimulatedBackend([MODEL, OTHER])
    assert backend.loaded_model() is None

    with pytest.raises(BackendError, match="not loaded"):
        run(backend, make_job())
    backend.switch_model(MODEL)
    assert run(backend, make_job()).info["model"] == MODEL


def test_workflow_jobs_are_unsupported():
    job = make_job(kind="workflow", workflow={"3": {"class_type": "KSampler", "inputs": {}}})

    with pytest.raises(UnsupportedJob, match="ComfyUI"):
        run(make_backend(), job)


# --- img2img ---


def img2img_job(init: str, strength: float) -> Job:
    return make_job(kind="img2img", init_image={"base64": init}, denoising_strength=strength)


def test_img2img_blends_the_init_image_into_the_output():
    red = png_base64((255, 0, 0))
    kept = run(make_backend(), img2img_job(red, 0.0))
    changed = run(make_backend(), img2img_job(red, 0.6))

    kept_image = open_image(kept.artifacts[0].data)
    assert kept_image.size == (64, 64)
    assert kept_image.getcolors() == [(64 * 64, (255, 0, 0))]
    assert open_image(changed.artifacts[0].data).getcolors(64 * 64) != kept_image.getcolors()
    again = run(make_backend(), img2img_job(red, 0.6))
    assert again.artifacts[0].data == changed.artifacts[0].data


def test_img2img_accepts_a_data_url():
    job = make_job(kind="img2img", init_image={"base64": "data:image/png;base64," + png_base64((0, 0, 255))})

    assert open_image(run(make_backend(), job).artifacts[0].data).size == (64, 64)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("not*base64!", "not valid base64"),
        (base64.b64encode(b"plain text, no image").decode(), "not an image"),
    ],
)
def test_img2img_with_a_bad_init_image_fails_with_the_reason(payload, reason):
    with pytest.raises(BackendError, match=reason) as caught:
        run(make_backend(), make_job(kind="img2img", init_image={"base64": payload}))
    assert not isinstance(caught.value, BackendUnavailable)


def test_img2img_from_s3_is_left_to_the_agent():
    job = make_job(kind="img2img", init_image={"s3_uri": "s3://bucket-name/in/cat.png"})

    with pytest.raises(UnsupportedJob, match="s3_uri is resolved by the agent"):
        run(make_backend(), job)


# --- faults ---


def test_transient_faults_hit_the_next_calls_then_clear():
    backend = make_backend()
    backend.faults.fail_next(2, transient=True)

    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            run(backend, make_job())
    assert len(run(backend, make_job()).artifacts) == 1
    assert backend.faults.calls == 3
    assert backend.faults.pending == 0


def test_permanent_fault_raises_backend_error_with_its_message():
    backend = make_backend(faults=FaultPlan().fail_next(transient=False, message="CUDA out of memory"))

    with pytest.raises(BackendError, match="CUDA out of memory") as caught:
        run(backend, make_job())
    assert not isinstance(caught.value, BackendUnavailable)


def test_hang_fault_blocks_until_the_job_is_aborted():
    abort = threading.Event()
    fake = FakeTime(on_wait=lambda waits: abort.set() if waits == 1000 else None)
    backend = make_backend(clock=fake.clock, wait=fake.wait)
    backend.faults.hang_next()

    with pytest.raises(JobAborted):
        run(backend, make_job(), abort)
    assert len(fake.waited) == 1000  # it waited 10 virtual seconds, then noticed the abort


def test_hang_fault_ends_on_interrupt_in_real_time():
    waiting = threading.Event()
    backend = make_backend(wait=real_wait_signalling(waiting))
    backend.faults.hang_next()
    thread, outcome = start_in_thread(backend, make_job(), threading.Event())
    assert waiting.wait(2)

    backend.interrupt()
    thread.join(1)

    assert isinstance(outcome["error"], JobAborted)


def test_clear_drops_pending_faults():
    backend = make_backend()
    backend.faults.fail_next(3).hang_next()
    backend.faults.clear()

    assert len(run(backend, make_job()).artifacts) == 1


# --- video ---


def video_job(fmt: str, frames: int = 5, fps: int = 10, **fields: Any) -> Job:
    return make_job(kind="txt2vid", video={"frames": frames, "fps": fps}, output={"format": fmt}, **fields)


def test_gif_video_has_the_requested_frames_and_rate():
    artifact = run(make_backend(), video_job("gif")).artifacts[0]

    image = Image.open(io.BytesIO(artifact.data))
    assert (image.format, image.size, image.n_frames) == ("GIF", (64, 64), 5)
    assert image.info["duration"] == 100
    assert (artifact.content_type, artifact.extension) == ("image/gif", "gif")


def test_animated_webp_has_the_requested_frames():
    # The schema pairs webp with image kinds; the simulator still animates it for a txt2vid job.
    job = video_job("gif").model_copy(update={"output": OutputSpec(format=OutputFormat.WEBP)})

    image = Image.open(io.BytesIO(run(make_backend(), job).artifacts[0].data))
    assert (image.format, image.n_frames) == ("WEBP", 5)


@pytest.mark.parametrize(
    ("fmt", "content_type", "codecs"),
    [("mp4", "video/mp4", {"h264", "mpeg4"}), ("webm", "video/webm", {"vp8", "vp9"})],
)
def test_av_video_has_the_requested_frames_size_and_rate(fmt, content_type, codecs):
    av = pytest.importorskip("av")
    artifact = run(make_backend(), video_job(fmt, frames=6, fps=12, width=96)).artifacts[0]

    with av.open(io.BytesIO(artifact.data)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert stream.codec_context.name in codecs
        assert stream.average_rate == 12
    assert len(frames) == 6
    assert (frames[0].width, frames[0].height) == (96, 64)
    assert (artifact.content_type, artifact.extension) == (content_type, fmt)


def test_mp4_without_pyav_is_unsupported_with_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError

    with pytest.raises(UnsupportedJob, match="PyAV"):
        run(make_backend(), video_job("mp4", seed=999_001))


def test_encoded_outputs_are_cached_per_seed_and_prompt():
    simulated.clear_output_cache()
    backend = make_backend()
    run(backend, make_job(seed=5))
    run(backend, make_job(seed=5))
    run(backend, make_job(seed=6))

    info = simulated._encoded_image.cache_info()
    assert (info.hits, info.misses) == (1, 2)
