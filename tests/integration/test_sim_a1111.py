"""The simulator's AUTOMATIC1111 API over real HTTP: shapes, timing, progress, interrupt, VRAM."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sdagent.sim.options import SimOptions
from sdagent.sim.thread import SimulatorThread

FAST = SimOptions(step_latency_s=0.002, load_latency_s=0.0, switch_latency_s=0.0, seed=1)


def call(url: str, method: str = "GET", body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    assert image.format == "PNG"
    return image


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(FAST) as running:
        yield running


@pytest.fixture
def slow_sim(request: pytest.FixtureRequest) -> Iterator[SimulatorThread]:
    """A fresh simulator with the options a test passes through ``indirect`` parametrization or defaults."""
    options = getattr(request, "param", SimOptions(step_latency_s=0.03, load_latency_s=0.0, switch_latency_s=0.0))
    with SimulatorThread(options) as running:
        yield running


def txt2img(url: str, **fields: Any) -> tuple[int, Any]:
    body = {"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64, **fields}
    return call(f"{url}/sdapi/v1/txt2img", "POST", body)


def test_sd_models_lists_titles_with_short_hashes(sim: SimulatorThread) -> None:
    status, models = call(f"{sim.url}/sdapi/v1/sd-models")
    assert status == 200
    assert [model["model_name"] for model in models] == ["sd15", "sdxl_base"]
    first = models[0]
    assert set(first) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert first["title"] == f"sd15.safetensors [{first['hash']}]" and first["sha256"].startswith(first["hash"])


def test_txt2img_returns_png_images_the_parameters_echo_and_info(sim: SimulatorThread) -> None:
    status, body = txt2img(sim.url, seed=1234, batch_size=2, n_iter=2, negative_prompt="fog")
    assert status == 200
    assert len(body["images"]) == 4 and png(body["images"][0]).size == (64, 64)
    assert body["parameters"]["seed"] == 1234 and body["parameters"]["cfg_scale"] == 7.0
    assert body["parameters"]["override_settings_restore_afterwards"] is True
    info = json.loads(body["info"])
    assert info["seed"] == 1234 and info["all_seeds"] == [1234, 1235, 1236, 1237]
    assert info["sd_model_name"] == "sd15" and len(info["sd_model_hash"]) == 10
    assert info["sampler_name"] == "Euler" and info["negative_prompt"] == "fog"
    assert info["infotexts"][0].startswith("a lighthouse\nNegative prompt: fog\nSteps: 3, Sampler: Euler")


def test_seed_minus_one_is_replaced_and_equal_seeds_draw_equal_images(sim: SimulatorThread) -> None:
    _, first = txt2img(sim.url, seed=-1)
    seed = json.loads(first["info"])["seed"]
    assert 0 <= seed < 2**32
    _, again = txt2img(sim.url, seed=seed)
    assert again["images"] == first["images"]
    _, other = txt2img(sim.url, seed=seed, prompt="something else")
    assert other["images"] != first["images"]


def test_send_images_false_returns_no_images(sim: SimulatorThread) -> None:
    status, body = txt2img(sim.url, send_images=False)
    assert status == 200 and body["images"] == []


def test_img2img_blends_the_init_image_and_drops_it_from_the_echo(sim: SimulatorThread) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(buffer, format="PNG")
    init = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"init_images": [init], "denoising_strength": 0.0, "steps": 10, "width": 64, "height": 64}
    status, result = call(f"{sim.url}/sdapi/v1/img2img", "POST", body)
    assert status == 200
    assert png(result["images"][0]).convert("RGB").getpixel((32, 32)) == (255, 0, 0)  # strength 0 keeps it
    assert result["parameters"]["init_images"] is None and result["parameters"]["include_init_images"] is False
    assert json.loads(result["info"])["denoising_strength"] == 0.0


def test_img2img_errors_take_the_a1111_shapes(sim: SimulatorThread) -> None:
    assert call(f"{sim.url}/sdapi/v1/img2img", "POST", {"prompt": "x"}) == (
        404, {"error": "HTTPException", "detail": "Init image not found", "body": "", "errors": ""},
    )  # fmt: skip
    status, body = call(f"{sim.url}/sdapi/v1/img2img", "POST", {"init_images": ["bm90IGFuIGltYWdl"]})
    assert (status, body["detail"]) == (500, "Invalid encoded image")
    status, body = call(f"{sim.url}/sdapi/v1/img2img", "POST", {"init_images": []})  # reaches the VAE
    assert (status, body["error"]) == (500, "RuntimeError")


def test_validation_errors_are_422_in_fastapi_shape(sim: SimulatorThread) -> None:
    status, body = txt2img(sim.url, steps="many", width=4)
    assert status == 422
    assert {"loc": ["body", "steps"], "msg": "value is not a valid integer", "type": "type_error.integer"} in body[
        "detail"
    ]
    assert any(
        entry["loc"] == ["body", "width"] and entry["type"] == "value_error.number.not_ge" for entry in body["detail"]
    )
    status, body = call(f"{sim.url}/sdapi/v1/txt2img", "POST", [1, 2])
    assert status == 422 and body["detail"][0]["type"] == "type_error.dict"


def test_an_unknown_sampler_is_replaced_and_legacy_names_carry_the_scheduler(sim: SimulatorThread) -> None:
    status, body = txt2img(sim.url, sampler_name="Nope")  # A1111 1.10 autocorrects it, silently
    info = json.loads(body["info"])
    assert (status, info["sampler_name"], info["extra_generation_params"]) == (
        200,
        "DPM++ 2M",
        {"Schedule type": "Karras"},
    )
    assert json.loads(txt2img(sim.url, sampler_name="Euler")[1]["info"])["extra_generation_params"] == {}
    status, body = txt2img(sim.url, sampler_name="DPM++ 2M Karras")
    info = json.loads(body["info"])
    assert (status, info["sampler_name"], info["extra_generation_params"]) == (
        200,
        "DPM++ 2M",
        {"Schedule type": "Karras"},
    )
    status, samplers = call(f"{sim.url}/sdapi/v1/samplers")
    assert (
        status == 200
        and {"name": "Euler a", "aliases": ["k_euler_a", "k_euler_ancestral"], "options": {"uses_ensd": "True"}}
        in samplers
    )
    status, schedulers = call(f"{sim.url}/sdapi/v1/schedulers")
    assert status == 200 and schedulers[0]["label"] == "Automatic"


def test_options_and_cmd_flags(sim: SimulatorThread) -> None:
    status, options = call(f"{sim.url}/sdapi/v1/options")
    assert status == 200 and options["sd_model_checkpoint"].startswith("sd15.safetensors [")
    assert call(f"{sim.url}/sdapi/v1/options", "POST", {"sd_model_checkpoint": "nope"}) == (
        500, {"error": "RuntimeError", "detail": "", "body": "", "errors": "model 'nope' not found"},
    )  # fmt: skip
    assert call(f"{sim.url}/sdapi/v1/options", "POST", {"samples_format": "png"}) == (200, None)
    status, flags = call(f"{sim.url}/sdapi/v1/cmd-flags")
    assert status == 200 and flags["nowebui"] is True and flags["simulator"] is True


def test_unknown_routes_answer_like_fastapi(sim: SimulatorThread) -> None:
    assert call(f"{sim.url}/sdapi/v1/nothing-here") == (404, {"detail": "Not Found"})
    assert call(f"{sim.url}/sdapi/v1/txt2img") == (405, {"detail": "Method Not Allowed"})


@pytest.mark.parametrize(
    "slow_sim", [SimOptions(step_latency_s=0.0, load_latency_s=0.2, switch_latency_s=0.02)], indirect=True
)
def test_switching_through_options_blocks_until_loaded_and_a_warm_model_switches_faster(
    slow_sim: SimulatorThread,
) -> None:
    url = slow_sim.url
    assert txt2img(url)[0] == 200  # waits for the start-up load of sd15
    started = time.monotonic()
    assert call(f"{url}/sdapi/v1/options", "POST", {"sd_model_checkpoint": "sdxl_base"}) == (200, None)
    cold = time.monotonic() - started
    assert call(f"{url}/sdapi/v1/options")[1]["sd_model_checkpoint"].startswith("sdxl_base.safetensors [")
    started = time.monotonic()
    call(f"{url}/sdapi/v1/options", "POST", {"sd_model_checkpoint": "sd15.safetensors"})
    warm = time.monotonic() - started
    assert cold >= 0.2 and warm < 0.15
    assert call(f"{url}/sim/stats")[1]["events"]["model_loads"] == 2


@pytest.mark.parametrize(
    "slow_sim", [SimOptions(step_latency_s=0.0, load_latency_s=0.0, switch_latency_s=0.2)], indirect=True
)
def test_override_restores_the_option_but_the_next_job_pays_the_switch_back(slow_sim: SimulatorThread) -> None:
    url = slow_sim.url
    txt2img(url)
    status, body = txt2img(url, override_settings={"sd_model_checkpoint": "sdxl_base.safetensors"})
    assert status == 200 and json.loads(body["info"])["sd_model_name"] == "sdxl_base"
    assert call(f"{url}/sdapi/v1/options")[1]["sd_model_checkpoint"].startswith("sd15.safetensors")
    assert call(f"{url}/sim/stats")[1]["loaded_model"] == "sdxl_base.safetensors"  # weights did not move back
    started = time.monotonic()
    _, body = txt2img(url)
    assert json.loads(body["info"])["sd_model_name"] == "sd15" and time.monotonic() - started >= 0.2


def test_progress_answers_during_a_generation(slow_sim: SimulatorThread) -> None:
    url = slow_sim.url
    assert call(f"{url}/sdapi/v1/progress")[1]["progress"] == 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(txt2img, url, steps=8, n_iter=2)
        deadline = time.monotonic() + 5
        while True:
            _, progress = call(f"{url}/sdapi/v1/progress?skip_current_image=true")
            if progress["state"]["sampling_step"] >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        _, with_image = call(f"{url}/sdapi/v1/progress")
        assert job.result()[0] == 200
    state = progress["state"]
    assert state["job"] == "scripts_txt2img" and state["job_count"] == 2 and state["sampling_steps"] == 8
    assert 0.01 < progress["progress"] < 1 and progress["eta_relative"] > 0 and progress["current_image"] is None
    assert png(with_image["current_image"]).size == (16, 16)
    assert call(f"{url}/sdapi/v1/progress")[1]["state"]["job_count"] == 0


def test_interrupt_ends_the_job_with_the_images_of_its_current_batch(slow_sim: SimulatorThread) -> None:
    url = slow_sim.url
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(txt2img, url, steps=50, n_iter=3, batch_size=2)
        _wait_for_step(url, 2)
        assert call(f"{url}/sdapi/v1/interrupt", "POST") == (200, {})
        status, body = job.result()
    assert status == 200 and len(body["images"]) == 2
    assert len(json.loads(body["info"])["all_seeds"]) == 6


def test_skip_ends_the_current_batch_and_runs_the_next(slow_sim: SimulatorThread) -> None:
    url = slow_sim.url
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        job = pool.submit(txt2img, url, steps=10, n_iter=2)
        _wait_for_step(url, 2)
        assert call(f"{url}/sdapi/v1/skip", "POST") == (200, None)
        status, body = job.result()
    assert status == 200 and len(body["images"]) == 2
    assert time.monotonic() - started >= 10 * 0.03  # the second batch ran in full


def test_generations_run_one_at_a_time(slow_sim: SimulatorThread) -> None:
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: txt2img(slow_sim.url, steps=5), range(2)))
    assert [status for status, _ in results] == [200, 200]
    assert time.monotonic() - started >= 2 * 5 * 0.03


@pytest.mark.parametrize(
    "slow_sim",
    [
        SimOptions(
            step_latency_s=0.0, load_latency_s=0.0, switch_latency_s=0.0, vram_total_mb=4096, vram_per_megapixel_mb=1024
        )
    ],
    indirect=True,
)
def test_a_batch_beyond_free_vram_is_an_out_of_memory_error(slow_sim: SimulatorThread) -> None:
    url = slow_sim.url
    status, body = txt2img(url, width=1024, height=1024, batch_size=4)  # ~4.2 GB on top of a 2 GB model
    assert status == 500 and body["error"] == "OutOfMemoryError" and "CUDA out of memory" in body["errors"]
    _, memory = call(f"{url}/sdapi/v1/memory")
    assert memory["cuda"]["events"]["oom"] == 1
    assert memory["cuda"]["system"]["total"] == 4096 * 1024 * 1024
    assert memory["cuda"]["system"]["used"] == 2048 * 1024 * 1024 and memory["ram"]["used"] > 0
    assert txt2img(url, width=512, height=512)[0] == 200


def test_unload_and_reload_checkpoint_move_the_weights(sim: SimulatorThread) -> None:
    url = sim.url
    txt2img(url)
    assert call(f"{url}/sdapi/v1/unload-checkpoint", "POST") == (200, {})
    assert call(f"{url}/sim/stats")[1]["loaded_model"] is None
    assert call(f"{url}/sdapi/v1/reload-checkpoint", "POST") == (200, {})
    assert call(f"{url}/sim/stats")[1]["loaded_model"] == "sd15.safetensors"


def test_refresh_checkpoints_picks_up_a_staged_file_hashed_on_first_load(tmp_path: Path) -> None:
    options = SimOptions(models=("sd15.safetensors",), models_dir=tmp_path, step_latency_s=0.0, load_latency_s=0.0)
    with SimulatorThread(options) as running:
        url = running.url
        (tmp_path / "fresh.safetensors").write_bytes(b"")
        assert [m["title"] for m in call(f"{url}/sdapi/v1/sd-models")[1]] == ["sd15.safetensors [" + _hash(url) + "]"]
        assert call(f"{url}/sdapi/v1/refresh-checkpoints", "POST") == (200, None)
        fresh = call(f"{url}/sdapi/v1/sd-models")[1][0]
        assert (fresh["title"], fresh["hash"], fresh["filename"]) == (
            "fresh.safetensors", None, str(tmp_path / "fresh.safetensors"),
        )  # fmt: skip
        assert call(f"{url}/sdapi/v1/options", "POST", {"sd_model_checkpoint": "fresh.safetensors"})[0] == 200
        assert call(f"{url}/sdapi/v1/sd-models")[1][0]["hash"] is not None


def _hash(url: str) -> str:
    return call(f"{url}/sdapi/v1/sd-models")[1][-1]["hash"]


def _wait_for_step(url: str, step: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if call(f"{url}/sdapi/v1/progress?skip_current_image=true")[1]["state"]["sampling_step"] >= step:
            return
        time.sleep(0.005)
    raise AssertionError(f"the generation never reached step {step}")
