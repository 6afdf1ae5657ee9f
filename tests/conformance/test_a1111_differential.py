"""The simulator against the real AUTOMATIC1111 v1.10.1: the same requests to both, the same answers.

Compared: status codes, the shapes of the bodies, the values a client acts on (sampler lists,
the sampler and schedule a job ran with, error types), and how ``/progress`` moves through a
job. Images and timings are not: the simulator draws its own and runs on a clock of its own.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from sdagent.devstack.kafka import free_loopback_port
from sdagent.sim.options import SimOptions
from sdagent.sim.thread import SimulatorThread
from tests.conformance.conftest import MODELS, READY_TIMEOUT_S, link_models
from tests.conformance.differential import answer, assert_same_shape, both, launched

TINY_A, TINY_B = MODELS["a1111"]
SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 5}
# The options a client reads; the real server has ~400 more the simulator has no use for.
READ_OPTIONS = ("sd_model_checkpoint", "sd_checkpoint_hash", "samples_format", "CLIP_stop_at_last_layers")
# The generation info a client reads, with values that do not depend on the weights.
READ_INFO = ("prompt", "negative_prompt", "seed", "all_seeds", "width", "height", "sampler_name",
             "cfg_scale", "steps", "batch_size", "index_of_first_image", "sd_model_name", "sd_model_hash",
             "extra_generation_params", "denoising_strength", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning")  # fmt: skip


@pytest.fixture(scope="module")
def servers(webui_root, tiny_models, tmp_path_factory) -> Iterator[dict[str, str]]:
    """The real server and the simulator, both with the two tiny checkpoints, the first loaded."""
    workdir = tmp_path_factory.mktemp("a1111-differential")
    link_models((TINY_A, TINY_B), tiny_models / "a1111")(workdir / "models/checkpoints")
    real = launched("a1111", webui_root, workdir, free_loopback_port(), "/sdapi/v1/sd-models", READY_TIMEOUT_S)
    # --no-hashing as the launcher passes it; a step slow enough that /progress sees each one.
    simulated = SimulatorThread(SimOptions(models=(TINY_A, TINY_B), hashing=False, step_latency_s=0.02,
                                           load_latency_s=0.0, switch_latency_s=0.0, seed=1))  # fmt: skip
    with real as real_url, simulated as sim:
        for url in (real_url, sim.url):  # the first generation waits for the initial model to load
            assert post(url, "/sdapi/v1/txt2img", SMALL).status_code == 200
        yield {"real": real_url, "sim": sim.url}


def post(url: str, path: str, body: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def image_b64() -> str:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def info_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    info = json.loads(body["info"])
    return {key: info.get(key) for key in READ_INFO} | {"images": len(body["images"]), "keys": sorted(body)}


def test_the_sampler_and_scheduler_lists_are_the_real_ones(servers: dict[str, str]) -> None:
    for path in ("/sdapi/v1/samplers", "/sdapi/v1/schedulers"):
        answers = both(servers, "GET", path)
        assert answers["real"].status_code == answers["sim"].status_code == 200
        assert answers["sim"].json() == answers["real"].json(), path


def test_listings_and_idle_progress_have_the_real_shapes(servers: dict[str, str]) -> None:
    models = both(servers, "GET", "/sdapi/v1/sd-models")
    assert [m["title"] for m in models["sim"].json()] == [m["title"] for m in models["real"].json()]
    assert_same_shape(models["real"].json(), models["sim"].json())
    options = {name: response.json() for name, response in both(servers, "GET", "/sdapi/v1/options").items()}
    assert {key: options["sim"].get(key) for key in READ_OPTIONS} == {
        key: options["real"].get(key) for key in READ_OPTIONS
    }
    common = options["real"].keys() & options["sim"].keys()
    assert_same_shape({key: options["real"][key] for key in common}, {key: options["sim"][key] for key in common})
    progress = both(servers, "GET", "/sdapi/v1/progress?skip_current_image=true")
    assert_same_shape(progress["real"].json(), progress["sim"].json())
    assert progress["sim"].json()["state"] | {"job_timestamp": None} == progress["real"].json()["state"] | {
        "job_timestamp": None
    }


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/sdapi/v1/txt2img", SMALL, id="txt2img"),
        pytest.param("/sdapi/v1/txt2img", {**SMALL, "batch_size": 2, "n_iter": 2}, id="batch-and-iterations"),
        pytest.param("/sdapi/v1/txt2img", {**SMALL, "sampler_name": "NoSuch"}, id="unknown-sampler-replaced"),
        pytest.param("/sdapi/v1/txt2img", {**SMALL, "sampler_name": "DPM++ 2M Karras"}, id="legacy-sampler-name"),
        pytest.param("/sdapi/v1/txt2img", {**SMALL, "sampler_name": "Euler", "scheduler": "karras"}, id="scheduler"),
        pytest.param("/sdapi/v1/txt2img", {**SMALL, "cfg_scale": -3}, id="negative-cfg"),
        pytest.param("/sdapi/v1/img2img", {**SMALL, "init_images": [image_b64()], "denoising_strength": 0.5}, id="img2img"),
    ],
)  # fmt: skip
def test_generations_answer_alike(servers: dict[str, str], path: str, body: dict[str, Any]) -> None:
    answers = both(servers, "POST", path, json=body)
    assert answers["real"].status_code == answers["sim"].status_code == 200
    real, simulated = info_of(answers["real"]), info_of(answers["sim"])
    real.pop("job_timestamp"), simulated.pop("job_timestamp")  # when it ran
    assert simulated == real
    assert_same_shape(answers["real"].json(), answers["sim"].json())


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/sdapi/v1/txt2img", {**SMALL, "steps": 0}, id="zero-steps"),
        pytest.param("/sdapi/v1/txt2img", {**SMALL, "batch_size": 0}, id="zero-batch"),
        pytest.param("/sdapi/v1/txt2img", {**SMALL, "width": 63}, id="width-not-a-multiple-of-8"),
        pytest.param("/sdapi/v1/txt2img", {**SMALL, "steps": "two"}, id="steps-not-a-number"),
        pytest.param("/sdapi/v1/txt2img", ["not", "an", "object"], id="body-not-an-object"),
        pytest.param("/sdapi/v1/img2img", {**SMALL, "init_images": ["notbase64!!"]}, id="invalid-base64"),
        pytest.param("/sdapi/v1/img2img", {**SMALL, "init_images": []}, id="no-init-image"),
        pytest.param("/sdapi/v1/options", {"sd_model_checkpoint": "nope.safetensors"}, id="unknown-model"),
        pytest.param("/sdapi/v1/nosuch", {}, id="unknown-route"),
    ],
)  # fmt: skip
def test_refusals_answer_alike(servers: dict[str, str], path: str, body: Any) -> None:
    answers = both(servers, "POST", path, json=body)
    assert answers["sim"].status_code == answers["real"].status_code
    real, simulated = answer(answers["real"]), answer(answers["sim"])
    if answers["real"].status_code == 200:
        assert_same_shape(real, simulated)
        return
    assert_same_shape(real, simulated)
    if isinstance(real, dict) and "error" in real:  # A1111's api_middleware: the exception's type
        assert simulated["error"] == real["error"]
    if isinstance(real, dict) and isinstance(real.get("detail"), list):  # FastAPI's 422
        assert [(e["loc"], e["type"]) for e in simulated["detail"]] == [(e["loc"], e["type"]) for e in real["detail"]]


def test_switching_by_a_name_without_extension_and_back(servers: dict[str, str]) -> None:
    try:
        switched = both(
            servers, "POST", "/sdapi/v1/options", json={"sd_model_checkpoint": TINY_B.removesuffix(".safetensors")}
        )
        assert switched["sim"].status_code == switched["real"].status_code == 200
        assert switched["sim"].json() == switched["real"].json()
        loaded = {
            name: r.json()["sd_model_checkpoint"] for name, r in both(servers, "GET", "/sdapi/v1/options").items()
        }
        assert loaded["sim"] == loaded["real"]
        ran = both(servers, "POST", "/sdapi/v1/txt2img", json=SMALL)
        assert info_of(ran["sim"])["sd_model_name"] == info_of(ran["real"])["sd_model_name"]
    finally:
        both(servers, "POST", "/sdapi/v1/options", json={"sd_model_checkpoint": TINY_A})


def test_interrupt_refresh_and_unload_answer_alike(servers: dict[str, str]) -> None:
    for method, path in (("POST", "/sdapi/v1/interrupt"), ("POST", "/sdapi/v1/skip"),
                         ("POST", "/sdapi/v1/refresh-checkpoints"), ("GET", "/sdapi/v1/memory")):  # fmt: skip
        answers = both(servers, method, path)
        assert answers["sim"].status_code == answers["real"].status_code, path
        if path != "/sdapi/v1/memory":  # the simulator has no process memory to report
            assert answer(answers["sim"]) == answer(answers["real"]), path


def progress_during(url: str, path: str, body: dict[str, Any]) -> list[tuple[int, int, int, str]]:
    """The distinct (job_count, sampling_step, sampling_steps, job) /progress showed while ``body`` ran."""
    seen: list[tuple[int, int, int, str]] = []
    runner = threading.Thread(target=post, args=(url, path, body))
    runner.start()
    while runner.is_alive():
        state = httpx.get(url + "/sdapi/v1/progress?skip_current_image=true", timeout=30).json()["state"]
        now = (state["job_count"], state["sampling_step"], state["sampling_steps"], state["job"])
        if not seen or seen[-1] != now:
            seen.append(now)
        time.sleep(0.005)
    runner.join()
    return seen


@pytest.mark.parametrize(
    ("path", "body", "sampled"),
    [
        pytest.param("/sdapi/v1/txt2img", {**SMALL, "width": 128, "height": 128, "steps": 30}, 30, id="txt2img"),
        # t_enc = int(0.5 * 20) = 10: img2img samples t_enc + 1 steps
        pytest.param(
            "/sdapi/v1/img2img",
            {
                **SMALL,
                "width": 128,
                "height": 128,
                "steps": 20,
                "denoising_strength": 0.5,
                "init_images": [image_b64()],
            },
            11,
            id="img2img",
        ),  # fmt: skip
    ],
)
def test_progress_moves_through_a_job_alike(
    servers: dict[str, str], path: str, body: dict[str, Any], sampled: int
) -> None:
    for name, url in servers.items():
        seen = progress_during(url, path, body)
        running = [entry for entry in seen if entry[0] > 0]
        assert running, f"{name}: /progress never showed the job: {seen}"
        steps_reported = {steps for _, step, steps, _ in running if step > 0}
        assert steps_reported == {sampled}, f"{name}: {seen}"
        # sampling_step is the index of the step being taken: the last one is sampled - 1
        # (a poll may miss the last one: it lasts as long as decoding takes)
        assert sampled - 2 <= max(step for _, step, _, _ in running) <= sampled - 1, f"{name}: {seen}"
        assert all(job == "scripts_" + path.rsplit("/", 1)[1] for count, _, _, job in running if count), (
            f"{name}: {seen}"
        )
        state = httpx.get(url + "/sdapi/v1/progress?skip_current_image=true", timeout=30).json()["state"]
        # Over: no job, the last one's counters kept (a client must not read them as progress).
        assert (state["job_count"], state["job"], state["sampling_steps"]) == (0, "", sampled), f"{name}: {state}"
