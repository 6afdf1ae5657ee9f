"""The A1111 backend against the WebUI simulator over real HTTP: mapping, models, progress, abort, faults."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import ExifTags, Image

from sdagent.backends.a1111 import A1111Backend
from sdagent.backends.simulated import model_hash
from sdagent.errors import BackendError, BackendUnavailable, JobAborted, ModelNotFound, UnsupportedJob
from sdagent.jobs import InitImage, Job, JobKind, OutputFormat, OutputSpec, VideoSpec
from sdagent.sim.options import SimOptions
from sdagent.sim.thread import SimulatorThread

MODEL = "sd15.safetensors"
NESTED = "styles/dreamy.safetensors"
STEP_S = 0.01


class Recorder:
    """An httpx request hook: what the backend sent, in order (method, path, JSON body)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any]] = []

    def __call__(self, request: httpx.Request) -> None:
        body = json.loads(request.content) if request.content else None
        self.sent.append((request.method, request.url.path, body))

    def bodies(self, method: str, path: str) -> list[Any]:
        return [body for sent_method, sent_path, body in self.sent if (sent_method, sent_path) == (method, path)]

    def count(self, method: str, path: str) -> int:
        return len(self.bodies(method, path))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def running(models_dir: Path) -> Iterator[SimulatorThread]:
    options = SimOptions(
        models=(MODEL, NESTED), models_dir=models_dir, step_latency_s=STEP_S, load_latency_s=0.0,
        switch_latency_s=0.0, seed=7,
    )  # fmt: skip
    with SimulatorThread(options) as sim:
        yield sim


@pytest.fixture
def sim(running: SimulatorThread) -> Iterator[SimulatorThread]:
    """The module's simulator, with no fault left armed after the test."""
    yield running
    httpx.delete(f"{running.url}/sim/faults")


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_backend() -> Iterator[Callable[..., A1111Backend]]:
    """Backends with test settings, each on a client that records what it sends when asked to."""
    clients: list[httpx.Client] = []

    def make(url: str, recorder: Recorder | None = None, **options: Any) -> A1111Backend:
        clients.append(httpx.Client(event_hooks={"request": [recorder]} if recorder is not None else {}))
        settings: dict[str, Any] = {"request_timeout_s": 5.0, "progress_poll_s": 0.02, "generation_timeout_s": 10.0}
        return A1111Backend(url, models=[MODEL], client=clients[-1], **{**settings, **options})

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def backend(sim: SimulatorThread, recorder: Recorder, make_backend) -> A1111Backend:
    backend = make_backend(sim.url, recorder)
    if backend.loaded_model() != MODEL:
        backend.switch_model(MODEL)
    recorder.sent.clear()
    return backend


def job(**fields: Any) -> Job:
    return Job(**{"model": MODEL, "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3, **fields})


def run(backend: A1111Backend, job: Job, abort: threading.Event | None = None, progress: Any = None):
    return backend.generate(job, progress or (lambda step, steps: None), abort or threading.Event())


def arm(url: str, **fault: Any) -> None:
    response = httpx.post(f"{url}/sim/faults", json={"api": "a1111", **fault})
    assert response.status_code == 200, response.text


def stats(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/sim/stats").json()


def png_base64(color: str, size: tuple[int, int] = (64, 64)) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


# --- txt2img and img2img ----------------------------------------------------------------------------


def test_txt2img_sends_the_job_fields_as_they_are_and_reports_the_seeds(
    backend: A1111Backend, recorder: Recorder
) -> None:
    generation = run(backend, job(negative_prompt="fog", width=64, height=96, steps=3, cfg_scale=5.5,
                                  sampler="DPM++ 2M Karras", seed=1234, batch_size=2))  # fmt: skip

    assert recorder.bodies("POST", "/sdapi/v1/txt2img") == [
        {"prompt": "a lighthouse", "negative_prompt": "fog", "seed": 1234, "width": 64, "height": 96, "steps": 3,
         "cfg_scale": 5.5, "batch_size": 2, "n_iter": 1, "send_images": True, "save_images": False,
         "sampler_name": "DPM++ 2M Karras"}
    ]  # fmt: skip
    assert [(a.seed, a.content_type, a.extension) for a in generation.artifacts] == [
        (1234, "image/png", "png"), (1235, "image/png", "png")
    ]  # fmt: skip
    assert Image.open(io.BytesIO(generation.artifacts[0].data)).size == (64, 96)
    assert generation.info == {
        "seed": 1234, "all_seeds": [1234, 1235], "model": MODEL, "sd_model_name": "sd15",
        "sd_model_hash": model_hash(MODEL), "sampler": "DPM++ 2M", "steps": 3, "cfg_scale": 5.5, "width": 64,
        "height": 96, "version": "v1.10.1-simulated", "simulator": True,
    }  # fmt: skip
    assert generation.inference_ms >= 3 * STEP_S * 1000 * 0.5


def test_a_random_seed_stays_minus_one_and_the_seed_drawn_is_reported(
    backend: A1111Backend, recorder: Recorder
) -> None:
    generation = run(backend, job(seed=-1, batch_size=3))

    assert recorder.bodies("POST", "/sdapi/v1/txt2img")[0]["seed"] == -1
    seed = generation.info["seed"]
    assert seed >= 0 and generation.info["all_seeds"] == [seed, seed + 1, seed + 2]
    assert [artifact.seed for artifact in generation.artifacts] == [seed, seed + 1, seed + 2]


def test_img2img_sends_the_init_image_and_the_denoising_strength(backend: A1111Backend, recorder: Recorder) -> None:
    init = png_base64("red")
    generation = run(backend, job(kind=JobKind.IMG2IMG, init_image=InitImage(base64=init), denoising_strength=0.4,
                                  seed=9))  # fmt: skip

    (body,) = recorder.bodies("POST", "/sdapi/v1/img2img")
    assert body["init_images"] == [init] and body["denoising_strength"] == 0.4 and body["seed"] == 9
    assert recorder.count("POST", "/sdapi/v1/txt2img") == 0
    assert generation.info["denoising_strength"] == 0.4 and generation.artifacts[0].seed == 9
    assert Image.open(io.BytesIO(generation.artifacts[0].data)).format == "PNG"


@pytest.mark.parametrize(("fmt", "pil_format"), [(OutputFormat.JPEG, "JPEG"), (OutputFormat.WEBP, "WEBP")])
def test_jpeg_and_webp_are_converted_from_the_png_with_the_parameters_in_exif(
    backend: A1111Backend, fmt: OutputFormat, pil_format: str
) -> None:
    generation = run(backend, job(output=OutputSpec(format=fmt), seed=5))

    artifact = generation.artifacts[0]
    assert (artifact.content_type, artifact.extension) == (f"image/{fmt.value}", fmt.value)
    image = Image.open(io.BytesIO(artifact.data))
    assert image.format == pil_format and image.size == (64, 64)
    comment = image.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
    assert comment.startswith(b"UNICODE\0") and "Seed: 5" in comment[8:].decode("utf-16-be")


def test_an_unknown_sampler_is_unsupported_and_the_sampler_list_is_read_once(
    backend: A1111Backend, recorder: Recorder
) -> None:
    with pytest.raises(UnsupportedJob, match="'Euler z' is not one of A1111's samplers: .*DPM\\+\\+ 2M, .*Euler a"):
        run(backend, job(sampler="Euler z"))
    run(backend, job(sampler="Euler a"))

    assert recorder.count("GET", "/sdapi/v1/samplers") == 1
    assert recorder.count("POST", "/sdapi/v1/txt2img") == 1  # the unknown one never went out


@pytest.mark.parametrize(
    ("unsupported", "reason"),
    [
        (job(kind=JobKind.TXT2VID, video=VideoSpec(frames=4)), "no video.*AnimateDiff"),
        (job(kind=JobKind.WORKFLOW, workflow={"1": {}}), "ComfyUI"),
    ],
)
def test_video_and_workflow_jobs_are_unsupported_before_any_request(
    backend: A1111Backend, recorder: Recorder, unsupported: Job, reason: str
) -> None:
    with pytest.raises(UnsupportedJob, match=reason):
        run(backend, unsupported)
    assert recorder.sent == []


# --- models -----------------------------------------------------------------------------------------


def test_switch_model_sets_the_checkpoint_option_and_loaded_model_follows(
    backend: A1111Backend, recorder: Recorder, sim: SimulatorThread
) -> None:
    backend.switch_model(NESTED)

    assert recorder.bodies("POST", "/sdapi/v1/options") == [{"sd_model_checkpoint": f"{NESTED} [{model_hash(NESTED)}]"}]
    sent = len(recorder.sent)
    assert backend.loaded_model() == NESTED and len(recorder.sent) == sent  # cached
    assert stats(sim.url)["loaded_model"] == NESTED
    generation = run(backend, job(model=NESTED))
    assert generation.info["sd_model_name"] == "dreamy"
    assert all("override_settings" not in body for body in recorder.bodies("POST", "/sdapi/v1/txt2img"))


def test_a_model_named_without_its_extension_switches_once_and_runs(backend: A1111Backend, recorder: Recorder) -> None:
    name = backend.canonical_model("styles/dreamy")
    assert name == NESTED
    backend.switch_model("styles/dreamy")  # was: "accepted the switch ... but has ... loaded"
    assert backend.loaded_model() == name
    assert run(backend, job(model="styles/dreamy")).info["sd_model_name"] == "dreamy"
    assert recorder.count("POST", "/sdapi/v1/options") == 1


def test_a_fresh_backend_reads_the_loaded_model_from_the_options(
    sim: SimulatorThread, backend: A1111Backend, make_backend
) -> None:
    other = make_backend(sim.url)
    assert other.loaded_model() == MODEL


def test_an_unknown_model_is_not_found_after_one_rescan(backend: A1111Backend, recorder: Recorder) -> None:
    with pytest.raises(ModelNotFound, match="'nope.safetensors' is not among A1111's checkpoints"):
        backend.switch_model("nope.safetensors")

    assert recorder.count("POST", "/sdapi/v1/refresh-checkpoints") == 1
    assert recorder.count("POST", "/sdapi/v1/options") == 0
    assert backend.loaded_model() == MODEL


def test_a_model_staged_into_the_models_dir_is_listed_after_refresh_and_loads(
    backend: A1111Backend, models_dir: Path
) -> None:
    (models_dir / "staged").mkdir()
    (models_dir / "staged" / "fresh.safetensors").write_bytes(b"")
    assert "staged/fresh.safetensors" not in backend.health().models  # A1111 scans on request only

    assert "staged/fresh.safetensors" in backend.refresh_models()
    assert "staged/fresh.safetensors" in backend.health().models
    backend.switch_model("staged/fresh.safetensors")  # its title gains a hash on this first load
    assert backend.loaded_model() == "staged/fresh.safetensors"
    assert backend.health().loaded_model == "staged/fresh.safetensors"


def test_switch_model_rescans_once_for_a_model_staged_since_the_last_scan(
    backend: A1111Backend, models_dir: Path, recorder: Recorder
) -> None:
    backend.health()
    (models_dir / "late.safetensors").write_bytes(b"")

    backend.switch_model("late.safetensors")

    assert recorder.count("POST", "/sdapi/v1/refresh-checkpoints") == 1
    assert backend.loaded_model() == "late.safetensors"


# --- progress and abort -----------------------------------------------------------------------------


def test_progress_is_reported_while_the_generation_runs(backend: A1111Backend) -> None:
    seen: list[tuple[int, int]] = []
    run(backend, job(steps=20), progress=lambda step, steps: seen.append((step, steps)))

    assert len(seen) >= 3 and seen[-1] == (20, 20)
    assert all(steps == 20 for _, steps in seen)
    assert [step for step, _ in seen] == sorted({step for step, _ in seen})  # changes only, in order


def test_abort_mid_run_interrupts_and_raises_job_aborted_quickly(backend: A1111Backend, sim: SimulatorThread) -> None:
    abort = threading.Event()
    interrupts = stats(sim.url)["events"].get("interrupts", 0)

    def progress(step: int, steps: int) -> None:
        if step >= 2:
            abort.set()

    started = time.monotonic()
    with pytest.raises(JobAborted):
        run(backend, job(steps=500), abort, progress)  # 5 s if it ran to the end

    assert time.monotonic() - started < 1.0
    assert stats(sim.url)["events"]["interrupts"] == interrupts + 1


def test_an_interrupt_from_elsewhere_still_discards_the_partial_images(backend: A1111Backend) -> None:
    def progress(step: int, steps: int) -> None:
        threading.Thread(target=backend.interrupt).start()  # e.g. the supervisor on a hang

    with pytest.raises(JobAborted):
        run(backend, job(steps=500), progress=progress)


def test_an_abort_before_the_start_sends_nothing(backend: A1111Backend, recorder: Recorder) -> None:
    abort = threading.Event()
    abort.set()
    with pytest.raises(JobAborted):
        run(backend, job(), abort)
    assert recorder.sent == []


# --- faults -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503])
def test_a_server_error_is_transient(backend: A1111Backend, sim: SimulatorThread, status: int) -> None:
    arm(sim.url, kind="error", status=status)
    with pytest.raises(BackendUnavailable, match=f"answered {status}: RuntimeError"):
        run(backend, job())
    assert len(run(backend, job()).artifacts) == 1  # what the job loop's retry meets


def test_a_slow_answer_within_the_timeout_still_succeeds(backend: A1111Backend, sim: SimulatorThread) -> None:
    arm(sim.url, kind="slow", delay_s=0.3)
    assert len(run(backend, job()).artifacts) == 1


def test_a_slow_answer_past_the_timeout_is_transient(sim: SimulatorThread, make_backend) -> None:
    backend = make_backend(sim.url, generation_timeout_s=0.2)
    arm(sim.url, kind="slow", delay_s=0.6)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="no answer in time"):
        run(backend, job())
    assert time.monotonic() - started < 0.6  # it did not wait for the answer
    time.sleep(0.6)  # let the abandoned request finish before the next test


def test_a_hung_generation_ends_with_job_aborted_when_aborted(backend: A1111Backend, sim: SimulatorThread) -> None:
    arm(sim.url, kind="hang")
    abort = threading.Event()
    threading.Timer(0.2, abort.set).start()
    started = time.monotonic()
    with pytest.raises(JobAborted):
        run(backend, job(), abort)
    assert time.monotonic() - started < 1.0


def test_out_of_memory_is_a_backend_error_not_a_transient_one(backend: A1111Backend, sim: SimulatorThread) -> None:
    oom_before = backend.memory()["cuda"]["events"]["oom"]
    arm(sim.url, kind="oom")
    with pytest.raises(BackendError, match="out of memory") as raised:
        run(backend, job())
    assert not isinstance(raised.value, BackendUnavailable)

    with pytest.raises(BackendError, match="out of memory"):  # a batch the simulated 24 GB cannot hold
        run(backend, job(width=2048, height=2048, batch_size=8))
    assert backend.memory()["cuda"]["events"]["oom"] == oom_before + 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_crash_mid_generation_is_transient_and_health_says_down(make_backend) -> None:
    port = _free_port()
    command = [sys.executable, "-m", "sdagent.sim", "--port", str(port), "--log-format", "json",
               "--step-latency-s", str(STEP_S), "--load-latency-s", "0", "--fault", "crash"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backend = make_backend(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 15
        while not backend.health().ready:
            assert time.monotonic() < deadline, "the simulator never became ready"
            time.sleep(0.05)
        with pytest.raises(BackendUnavailable):
            run(backend, job())
        process.wait(timeout=10)
        health = backend.health()
        assert not health.ready and "ConnectError" in health.detail
        assert backend.loaded_model() is None
    finally:
        process.kill()
        process.wait()


# --- health and warm-up -----------------------------------------------------------------------------


def test_health_lists_the_models_by_job_name_and_the_loaded_one(backend: A1111Backend) -> None:
    health = backend.health()
    assert health.ready and health.detail == "ok"
    assert {MODEL, NESTED} <= set(health.models) and health.loaded_model == MODEL


def test_health_is_not_ready_when_nothing_listens(make_backend) -> None:
    health = make_backend(f"http://127.0.0.1:{_free_port()}").health()
    assert not health.ready and "GET /sdapi/v1/sd-models" in health.detail


def test_health_is_not_ready_while_the_api_fails_or_stalls(sim: SimulatorThread, make_backend) -> None:
    arm(sim.url, kind="error", scope="all")
    assert "answered 500" in make_backend(sim.url).health().detail
    arm(sim.url, kind="slow", scope="all", delay_s=0.5)
    health = make_backend(sim.url, request_timeout_s=0.1).health()
    assert not health.ready and "no answer in time" in health.detail
    time.sleep(0.5)


def test_health_is_not_ready_without_any_checkpoint(tmp_path: Path, make_backend) -> None:
    options = SimOptions(models=(), models_dir=tmp_path, load_latency_s=0.0)
    with SimulatorThread(options) as empty:
        health = make_backend(empty.url).health()
    assert not health.ready and health.models == () and "no checkpoint" in health.detail


def test_health_names_expected_models_that_are_missing(sim: SimulatorThread) -> None:
    backend = A1111Backend(sim.url, models=[MODEL, "absent.safetensors"])
    try:
        health = backend.health()
    finally:
        backend.close()
    assert health.ready and health.detail == "missing expected models: absent.safetensors"


def test_warm_up_runs_one_tiny_generation(backend: A1111Backend, recorder: Recorder) -> None:
    assert backend.warm_up() > 0
    (body,) = recorder.bodies("POST", "/sdapi/v1/txt2img")
    assert (body["steps"], body["width"], body["height"], body["send_images"]) == (1, 64, 64, False)
