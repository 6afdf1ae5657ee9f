"""The ComfyUI backend against the WebUI simulator over real HTTP and a real websocket."""

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

import av
import httpx
import pytest
from PIL import Image
from structlog.testing import capture_logs

from sdagent.backends.comfyui import ComfyUIBackend
from sdagent.errors import BackendError, BackendUnavailable, JobAborted, ModelNotFound, UnsupportedJob
from sdagent.jobs import Job
from sdagent.sim.options import SimOptions
from sdagent.sim.thread import SimulatorThread

MODEL = "sd15.safetensors"
STEP_S = 0.02


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("comfy-data")


@pytest.fixture(scope="module")
def running(models_dir: Path, data_dir: Path) -> Iterator[SimulatorThread]:
    options = SimOptions(
        models=(MODEL, "sdxl_base.safetensors"), models_dir=models_dir, data_dir=data_dir, initial_model=None,
        step_latency_s=STEP_S, load_latency_s=0.0, switch_latency_s=0.0, seed=7,
    )  # fmt: skip
    with SimulatorThread(options) as sim:
        yield sim


@pytest.fixture
def sim(running: SimulatorThread) -> Iterator[SimulatorThread]:
    """The module's simulator, with no fault left armed after the test."""
    yield running
    httpx.delete(f"{running.url}/sim/faults")


@pytest.fixture
def make_backend(sim: SimulatorThread) -> Iterator[Callable[..., ComfyUIBackend]]:
    made: list[ComfyUIBackend] = []

    def make(url: str | None = None, **kwargs: Any) -> ComfyUIBackend:
        kwargs.setdefault("request_timeout_s", 5.0)
        kwargs.setdefault("progress_poll_s", 0.05)
        backend = ComfyUIBackend(url or sim.url, **kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make_backend) -> ComfyUIBackend:
    backend = make_backend()
    backend.switch_model(MODEL)
    return backend


class Steps:
    """A progress callback that keeps (step, steps, when)."""

    def __init__(self, on_first: Callable[[], None] | None = None) -> None:
        self.seen: list[tuple[int, int, float]] = []
        self._on_first = on_first

    def __call__(self, step: int, steps: int) -> None:
        self.seen.append((step, steps, time.monotonic()))
        if len(self.seen) == 1 and self._on_first is not None:
            self._on_first()

    @property
    def steps(self) -> list[tuple[int, int]]:
        return [(step, steps) for step, steps, _ in self.seen]


def job(**fields: Any) -> Job:
    values: dict[str, Any] = {"model": MODEL, "prompt": "a red fox", "steps": 3, "width": 64, "height": 64, "seed": 1}
    values.update(fields)
    return Job(**values)


def run(backend: ComfyUIBackend, the_job: Job, progress: Callable[[int, int], None] | None = None,
        abort: threading.Event | None = None):  # fmt: skip
    return backend.generate(the_job, progress or (lambda step, steps: None), abort or threading.Event())


def arm(url: str, **fault: Any) -> None:
    httpx.post(f"{url}/sim/faults", json={"api": "comfyui", **fault}).raise_for_status()


def history_graph(url: str, prompt_id: str) -> dict[str, Any]:
    """The graph ComfyUI ran, as its history keeps it."""
    return httpx.get(f"{url}/history/{prompt_id}").json()[prompt_id]["prompt"][2]


def queue_is_empty(url: str, within_s: float = 2.0) -> bool:
    """Whether the queue empties soon: a prompt ends a moment after its last message, as in ComfyUI."""
    deadline = time.monotonic() + within_s
    while True:
        body = httpx.get(f"{url}/queue").json()
        if not body["queue_running"] and not body["queue_pending"]:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def png_base64(width: int, height: int, colour: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def workflow(size: int = 64, **sampler: Any) -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl_base.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "graph prompt", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "graph negative", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 5, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], **sampler}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "wf", "images": ["8", 0]}},
    }  # fmt: skip


# --- happy paths ---------------------------------------------------------------------------------------


def test_txt2img_makes_real_pngs_of_the_job_size_and_reports_every_step(backend: ComfyUIBackend) -> None:
    steps = Steps()
    generation = run(backend, job(steps=4, width=64, height=96, batch_size=2, seed=42), steps)
    assert steps.steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert len(generation.artifacts) == 2
    for artifact in generation.artifacts:
        image = Image.open(io.BytesIO(artifact.data))
        assert (image.format, image.size) == ("PNG", (64, 96))
        assert (artifact.content_type, artifact.extension, artifact.seed) == ("image/png", "png", 42)
    info = generation.info
    assert (info["seed"], info["ckpt_name"], info["template"]) == (42, MODEL, "txt2img.v1")
    assert info["template_source"] == "builtin"
    assert info["prompt_id"] and info["node_ms"]["sampler"] >= 3 * STEP_S * 1000 * 0.8
    assert generation.inference_ms >= 4 * STEP_S * 1000


def test_progress_is_reported_live_as_the_steps_run(backend: ComfyUIBackend) -> None:
    steps = Steps()
    started = time.monotonic()
    run(backend, job(steps=8, seed=2), steps)
    finished = time.monotonic()
    times = [when for _, _, when in steps.seen]
    assert [step for step, _ in steps.steps] == list(range(1, 9))
    assert times == sorted(times)
    assert times[0] - started < finished - started - 5 * STEP_S  # the first step came long before the end
    assert times[-1] - times[0] >= 6 * STEP_S


def test_jpeg_is_converted_from_comfyuis_png(backend: ComfyUIBackend) -> None:
    artifact = run(backend, job(output={"format": "jpeg"})).artifacts[0]
    image = Image.open(io.BytesIO(artifact.data))
    assert (image.format, image.size, artifact.content_type) == ("JPEG", (64, 64), "image/jpeg")


def test_img2img_uploads_the_init_image_and_denoises_from_it(backend: ComfyUIBackend, data_dir: Path) -> None:
    the_job = job(kind="img2img", init_image={"base64": png_base64(100, 50, "blue")}, width=64, height=64,
                  denoising_strength=0.0)  # fmt: skip
    generation = run(backend, the_job)
    image = Image.open(io.BytesIO(generation.artifacts[0].data)).convert("RGB")
    assert image.size == (64, 64)
    assert image.getpixel((32, 32)) == (0, 0, 255)  # denoise 0 keeps the (resized) init image
    assert len(list((data_dir / "input" / "sdagent").iterdir())) == 1
    assert generation.info["denoising_strength"] == 0.0


def test_txt2vid_makes_a_webm_with_every_frame(backend: ComfyUIBackend) -> None:
    generation = run(backend, job(kind="txt2vid", video={"frames": 6, "fps": 8}, output={"format": "webm"}))
    (artifact,) = generation.artifacts
    assert (artifact.content_type, artifact.extension) == ("video/webm", "webm")
    with av.open(io.BytesIO(artifact.data)) as container:
        frames = list(container.decode(video=0))
        stream = container.streams.video[0]
        assert stream.codec_context.name in ("vp9", "libvpx-vp9", "vp8", "libvpx")
    assert len(frames) == 6 and (frames[0].width, frames[0].height) == (64, 64)
    assert generation.info["frames"] == 6 and generation.info["fps"] == 8.0


def test_txt2vid_without_a_format_makes_the_default_mp4(backend: ComfyUIBackend) -> None:
    generation = run(backend, job(kind="txt2vid", video={"frames": 5, "fps": 10}))  # mp4 is the video default
    (artifact,) = generation.artifacts
    assert (artifact.content_type, artifact.extension) == ("video/mp4", "mp4")
    with av.open(io.BytesIO(artifact.data)) as container:
        frames = list(container.decode(video=0))
        assert container.streams.video[0].codec_context.name in ("h264", "libx264", "libopenh264")
    assert len(frames) == 5 and generation.info["fps"] == 10.0


# --- workflow jobs ---------------------------------------------------------------------------------------


def test_a_workflow_runs_with_the_jobs_explicit_fields_written_in(backend: ComfyUIBackend, sim) -> None:
    the_job = Job(model=MODEL, kind="workflow", workflow=workflow(), seed=11, width=128, prompt="job prompt",
                  sampler="DPM++ 2M Karras")  # fmt: skip
    generation = run(backend, the_job)
    assert Image.open(io.BytesIO(generation.artifacts[0].data)).size == (128, 64)
    ran = history_graph(sim.url, generation.info["prompt_id"])
    assert ran["4"]["inputs"]["ckpt_name"] == MODEL
    assert {key: ran["3"]["inputs"][key] for key in ("seed", "steps", "sampler_name", "scheduler")} == {
        "seed": 11, "steps": 2, "sampler_name": "dpmpp_2m", "scheduler": "karras"}  # fmt: skip
    assert (ran["6"]["inputs"]["text"], ran["7"]["inputs"]["text"]) == ("job prompt", "graph negative")
    assert generation.artifacts[0].seed == 11


def test_a_workflow_field_without_a_place_is_unsupported_and_nothing_is_queued(backend, sim) -> None:
    graph = workflow()
    graph["5"] = {"class_type": "LoadImage", "inputs": {"image": "nothing.png"}}
    graph["3"]["inputs"]["latent_image"] = ["10", 0]
    graph["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["4", 2]}}
    before = httpx.get(f"{sim.url}/sim/stats").json()["requests"].get("POST /prompt", 0)
    with pytest.raises(UnsupportedJob, match="width have no place"):
        run(backend, Job(model=MODEL, kind="workflow", workflow=graph, width=128))
    assert httpx.get(f"{sim.url}/sim/stats").json()["requests"].get("POST /prompt", 0) == before


def test_an_invalid_graph_is_a_backend_error_naming_the_node(backend: ComfyUIBackend) -> None:
    with pytest.raises(BackendError, match=r"node 3 \(KSampler\): Value 0 smaller than min of 1: steps") as error:
        run(backend, Job(model=MODEL, kind="workflow", workflow=workflow(steps=0)))
    assert type(error.value) is BackendError


def test_an_unknown_node_class_is_unsupported(backend: ComfyUIBackend) -> None:
    graph = workflow()
    graph["9"]["class_type"] = "FancyUpscaleSave"
    with pytest.raises(UnsupportedJob, match="FancyUpscaleSave"):
        run(backend, Job(model=MODEL, kind="workflow", workflow=graph))


# --- following a prompt without the websocket ----------------------------------------------------------------


def test_a_dropped_websocket_falls_back_to_the_history(backend: ComfyUIBackend, sim) -> None:
    arm(sim.url, kind="ws_drop")
    steps = Steps()
    with capture_logs() as logs:
        generation = run(backend, job(steps=5, seed=3), steps)
    assert any(entry["event"] == "comfyui.websocket_lost" for entry in logs)
    assert steps.steps[0] == (1, 5) and steps.steps[-1] == (5, 5)  # the end is reported after the fallback
    assert Image.open(io.BytesIO(generation.artifacts[0].data)).size == (64, 64)


def test_without_a_websocket_the_history_is_polled(make_backend) -> None:
    def refuse(url: str, timeout: float):
        raise ConnectionRefusedError("blocked by a proxy")

    backend = make_backend(ws_connect=refuse)
    generation = run(backend, job(steps=3))
    assert len(generation.artifacts) == 1 and "node_ms" not in generation.info


# --- abort, interrupt, faults ------------------------------------------------------------------------------


def test_an_abort_mid_run_interrupts_comfyui_and_raises_quickly(backend: ComfyUIBackend, sim) -> None:
    abort = threading.Event()
    steps = Steps(on_first=abort.set)
    started = time.monotonic()
    with pytest.raises(JobAborted):
        run(backend, job(steps=500), steps, abort)
    assert time.monotonic() - started < 2.0  # 500 steps would take 10 s
    assert queue_is_empty(sim.url)
    assert len(run(backend, job(steps=2, seed=9)).artifacts) == 1  # the next job is not hit by the interrupt


def test_interrupt_from_another_thread_ends_the_job_as_aborted(backend: ComfyUIBackend) -> None:
    steps = Steps(on_first=lambda: threading.Thread(target=backend.interrupt).start())
    started = time.monotonic()
    with pytest.raises(JobAborted):
        run(backend, job(steps=500), steps)
    assert time.monotonic() - started < 2.0


def test_a_5xx_from_comfyui_is_transient(backend: ComfyUIBackend, sim) -> None:
    arm(sim.url, kind="error")
    with pytest.raises(BackendUnavailable, match="POST /prompt: ComfyUI answered 500"):
        run(backend, job())


def test_out_of_memory_is_a_backend_error_that_says_so(backend: ComfyUIBackend, sim) -> None:
    arm(sim.url, kind="oom")
    with pytest.raises(BackendError, match="ran out of GPU memory at node sampler") as error:
        run(backend, job())
    assert not isinstance(error.value, BackendUnavailable)


def test_a_hung_prompt_is_ended_by_the_abort(backend: ComfyUIBackend, sim) -> None:
    arm(sim.url, kind="hang")
    abort = threading.Event()
    threading.Timer(0.3, abort.set).start()
    started = time.monotonic()
    with pytest.raises(JobAborted):
        run(backend, job(), abort=abort)
    assert time.monotonic() - started < 1.5
    assert queue_is_empty(sim.url)


def test_an_abort_is_honoured_while_polling_the_history_too(make_backend, sim) -> None:
    def refuse(url: str, timeout: float):
        raise ConnectionRefusedError("blocked by a proxy")

    backend = make_backend(ws_connect=refuse)
    arm(sim.url, kind="hang")
    abort = threading.Event()
    threading.Timer(0.3, abort.set).start()
    started = time.monotonic()
    with pytest.raises(JobAborted):
        run(backend, job(), abort=abort)
    assert time.monotonic() - started < 1.5
    assert queue_is_empty(sim.url)
    backend.interrupt()  # idle: harmless, never raises


def test_an_abort_before_the_start_queues_nothing(backend: ComfyUIBackend, sim) -> None:
    before = httpx.get(f"{sim.url}/sim/stats").json()["requests"].get("POST /prompt", 0)
    abort = threading.Event()
    abort.set()
    with pytest.raises(JobAborted):
        run(backend, job(), abort=abort)
    assert httpx.get(f"{sim.url}/sim/stats").json()["requests"].get("POST /prompt", 0) == before


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
        backend.switch_model(MODEL)
        with pytest.raises(BackendUnavailable):
            run(backend, job(steps=20))
        process.wait(timeout=10)
        health = backend.health()
        assert not health.ready and "ConnectError" in health.detail
        assert health.loaded_model == MODEL  # ComfyUI keeps no model setting: the agent's choice stands
    finally:
        process.kill()
        process.wait()


# --- models, templates, health -----------------------------------------------------------------------------


def test_an_unknown_model_is_model_not_found(make_backend) -> None:
    backend = make_backend()
    with pytest.raises(ModelNotFound, match=r"missing\.safetensors"):
        backend.switch_model("missing.safetensors")
    assert backend.loaded_model() is None


def test_a_checkpoint_staged_in_the_models_folder_is_seen_at_once(make_backend, models_dir: Path) -> None:
    backend = make_backend()
    staged = models_dir / "styles" / "fresh.safetensors"
    staged.parent.mkdir(exist_ok=True)
    staged.write_bytes(b"")
    assert "styles/fresh.safetensors" in backend.refresh_models()
    backend.switch_model("styles/fresh.safetensors")
    generation = run(backend, job(model="styles/fresh.safetensors", steps=1))
    assert generation.info["ckpt_name"] == "styles/fresh.safetensors"


def test_a_template_in_workflows_dir_overrides_the_builtin(make_backend, tmp_path: Path, sim) -> None:
    from importlib import resources

    document = json.loads(resources.files("sdagent.backends.workflows").joinpath("txt2img.v1.json").read_text())
    document["graph"]["sampler"]["inputs"].update(sampler_name="dpmpp_2m", scheduler="karras")
    (tmp_path / "txt2img.v1.json").write_text(json.dumps(document))
    backend = make_backend(workflows_dir=tmp_path)
    generation = run(backend, job())
    info = generation.info
    assert info["template_source"] == str(tmp_path / "txt2img.v1.json")
    assert (info["sampler"], info["scheduler"]) == ("dpmpp_2m", "karras")
    assert history_graph(sim.url, info["prompt_id"])["sampler"]["inputs"]["scheduler"] == "karras"


def test_health_lists_models_and_the_selected_one(backend: ComfyUIBackend) -> None:
    health = backend.health()
    assert health.ready and health.detail == "ok (device SIMULATED)"
    assert {MODEL, "sdxl_base.safetensors"} <= set(health.models) and health.loaded_model == MODEL


def test_health_is_not_ready_when_comfyui_fails_or_is_gone(make_backend, sim) -> None:
    assert not make_backend(f"http://127.0.0.1:{_free_port()}").health().ready
    arm(sim.url, kind="error", scope="all")
    health = make_backend().health()
    assert not health.ready and "answered 500" in health.detail


def test_free_unloads_the_model(backend: ComfyUIBackend, sim) -> None:
    run(backend, job(steps=1))
    assert httpx.get(f"{sim.url}/sim/stats").json()["loaded_model"] == MODEL
    backend.free()
    deadline = time.monotonic() + 2
    while httpx.get(f"{sim.url}/sim/stats").json()["loaded_model"] is not None:
        assert time.monotonic() < deadline, "the model stayed loaded"
        time.sleep(0.02)


def test_previews_and_a_late_history_entry_do_not_disturb_a_job(make_backend, models_dir: Path, tmp_path: Path) -> None:
    # Real ComfyUI writes the entry up to ~0.9 s after execution_success and, with a preview
    # method, sends a binary frame per step: the adapter waits for the one and skips the other.
    options = SimOptions(
        models=(MODEL,), models_dir=models_dir, data_dir=tmp_path, initial_model=None, step_latency_s=STEP_S,
        load_latency_s=0.0, switch_latency_s=0.0, history_delay_s=0.8, previews=True,
    )  # fmt: skip
    with SimulatorThread(options) as late:
        backend = make_backend(late.url)
        backend.switch_model(MODEL)
        steps = Steps()
        generation = run(backend, job(steps=3, seed=21), steps)
    assert len(generation.artifacts) == 1 and [seen[:2] for seen in steps.seen] == [(1, 3), (2, 3), (3, 3)]
