"""The A1111 backend's mapping of answers the simulator does not give: error bodies, grids, odd formats."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from sdagent.backends.a1111 import A1111Backend
from sdagent.errors import BackendError, BackendUnavailable, ModelNotFound, UnsupportedJob
from sdagent.jobs import Job

URL = "http://webui.test:7861"
SD_MODELS = [
    {"title": "sd15.safetensors [6ce0161689]", "model_name": "sd15", "hash": "6ce0161689"},
    {"title": "sdxl/base.safetensors [31e35c80fc]", "model_name": "sdxl_base", "hash": "31e35c80fc"},
    {"title": "staged/new.safetensors", "model_name": "staged_new", "hash": None},
]
IDLE = {"state": {"job_count": 0, "interrupted": False, "skipped": False, "sampling_step": 0, "sampling_steps": 0}}

Route = Callable[[httpx.Request], httpx.Response]


def image(fmt: str = "PNG") -> str:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(out, format=fmt)
    return base64.b64encode(out.getvalue()).decode()


def answer(body: Any, status: int = 200) -> Route:
    return lambda request: httpx.Response(status, json=body)


def a1111_error(status: int, error: str, *, detail: str = "", errors: str = "") -> Route:
    return answer({"error": error, "detail": detail, "body": "", "errors": errors}, status)


def generated(images: list[str], **info: Any) -> Route:
    document = {"seed": 11, "all_seeds": [11, 12], "sd_model_name": "sd15", "sd_model_hash": "6ce0161689", **info}
    return answer({"images": images, "parameters": {}, "info": json.dumps(document)})


def backend_with(routes: dict[str, Route]) -> tuple[A1111Backend, list[str]]:
    """A backend over a fake A1111 answering ``routes`` ("METHOD /path"); returns what was asked."""
    asked: list[str] = []
    defaults: dict[str, Route] = {
        "GET /sdapi/v1/sd-models": answer(SD_MODELS),
        "GET /sdapi/v1/options": answer({"sd_model_checkpoint": "sd15.safetensors [6ce0161689]"}),
        "GET /sdapi/v1/progress": answer(IDLE),
        "POST /sdapi/v1/interrupt": answer({}),
    }
    defaults.update(routes)

    def handle(request: httpx.Request) -> httpx.Response:
        key = f"{request.method} {request.url.path}"
        asked.append(key)
        if key not in defaults:
            return httpx.Response(404, json={"detail": "Not Found"})
        return defaults[key](request)

    client = httpx.Client(transport=httpx.MockTransport(handle))
    return A1111Backend(URL, models=["sd15.safetensors"], progress_poll_s=0.01, client=client), asked


def job(**fields: Any) -> Job:
    return Job(**{"model": "sd15.safetensors", "width": 64, "height": 64, "steps": 2, **fields})


def generate(backend: A1111Backend, job: Job):
    return backend.generate(job, lambda step, steps: None, threading.Event())


@pytest.mark.parametrize(
    ("route", "raised", "message"),
    [
        (
            answer(
                {
                    "detail": [
                        {"loc": ["body", "width"], "msg": "value is not a valid integer", "type": "type_error.integer"}
                    ]
                },
                422,
            ),
            BackendError,
            "rejected the request: width: value is not a valid integer",
        ),  # fmt: skip
        (a1111_error(404, "HTTPException", detail="Model not found"), ModelNotFound, "does not know the model"),
        (a1111_error(404, "HTTPException", detail="Sampler not found"), UnsupportedJob, "sampler"),
        (a1111_error(500, "HTTPException", detail="Invalid encoded image"), BackendError, "Invalid encoded image"),
        (
            a1111_error(500, "OutOfMemoryError", errors="CUDA out of memory. Tried to allocate 2.00 GiB"),
            BackendError,
            "ran out of memory: CUDA out of memory",
        ),  # fmt: skip
        (a1111_error(500, "RuntimeError", errors="boom"), BackendUnavailable, "answered 500: RuntimeError: boom"),
        (lambda request: httpx.Response(502, text="<html>Bad Gateway</html>"), BackendUnavailable, "Bad Gateway"),
        (answer({"detail": "Not authenticated"}, 401), BackendError, "not authorised"),
    ],
)
def test_error_answers_map_onto_the_error_hierarchy(route: Route, raised: type[Exception], message: str) -> None:
    backend, _ = backend_with({"POST /sdapi/v1/txt2img": route})
    with pytest.raises(raised, match=message) as caught:
        generate(backend, job())
    if raised is BackendError:
        assert type(caught.value) is BackendError  # permanent: never retried


def test_a_connection_failure_is_transient_and_forgets_the_loaded_model() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    backend, _ = backend_with({"POST /sdapi/v1/txt2img": refuse})
    assert backend.loaded_model() == "sd15.safetensors"
    with pytest.raises(BackendUnavailable, match="ConnectError"):
        generate(backend, job())
    assert backend._loaded is None


def test_an_unknown_checkpoint_refused_by_the_options_is_model_not_found() -> None:
    backend, _ = backend_with(
        {"POST /sdapi/v1/options": a1111_error(500, "RuntimeError", errors="model 'sd15.safetensors' not found")}
    )
    with pytest.raises(ModelNotFound, match="not found"):
        backend.switch_model("sd15.safetensors")


def test_checkpoint_titles_map_to_the_names_jobs_use() -> None:
    selected = {"sd_model_checkpoint": "sdxl/base.safetensors [31e35c80fc]"}
    backend, _ = backend_with({"GET /sdapi/v1/options": answer(selected)})
    assert backend.health().models == ("sd15.safetensors", "sdxl/base.safetensors", "staged/new.safetensors")
    assert backend.loaded_model() == "sdxl/base.safetensors"
    assert backend._resolve("sdxl/base") == backend._resolve("sdxl/base.safetensors")
    assert backend._resolve("staged/new.safetensors").title == "staged/new.safetensors"  # not hashed yet
    # Once hashed, the title gains its hash; a title the listing does not know yet is stripped of it.
    assert backend._name_of("other/model.ckpt [0123456789]") == "other/model.ckpt"


def test_a_grid_image_in_front_is_skipped_and_seeds_follow_the_images() -> None:
    grid, first, second = image(), image(), image()
    backend, _ = backend_with({"POST /sdapi/v1/txt2img": generated([grid, first, second], index_of_first_image=1)})
    generation = generate(backend, job(batch_size=2))
    assert [artifact.data for artifact in generation.artifacts] == [base64.b64decode(first), base64.b64decode(second)]
    assert [artifact.seed for artifact in generation.artifacts] == [11, 12]


def test_fewer_images_than_the_batch_is_an_error_not_a_short_success() -> None:
    backend, _ = backend_with({"POST /sdapi/v1/txt2img": generated([image()])})
    with pytest.raises(BackendError, match="1 images for a batch of 2"):
        generate(backend, job(batch_size=2))


def test_images_in_another_samples_format_are_converted_to_the_format_asked() -> None:
    backend, _ = backend_with({"POST /sdapi/v1/txt2img": generated([image("JPEG")], all_seeds=[11])})
    data = generate(backend, job()).artifacts[0].data
    assert Image.open(io.BytesIO(data)).format == "PNG"


def test_another_model_having_run_is_transient_and_forgets_the_loaded_model() -> None:
    backend, _ = backend_with({"POST /sdapi/v1/txt2img": generated([image()], all_seeds=[11], sd_model_name="sdxl")})
    assert backend.loaded_model() == "sd15.safetensors"
    with pytest.raises(BackendUnavailable, match="ran model 'sdxl'"):
        generate(backend, job())
    assert backend._loaded is None


def test_an_answer_whose_interruption_cannot_be_checked_is_not_trusted() -> None:
    backend, _ = backend_with(
        {"POST /sdapi/v1/txt2img": generated([image()]), "GET /sdapi/v1/progress": answer({}, 503)}
    )
    with pytest.raises(BackendUnavailable, match="progress"):
        generate(backend, job())


def test_a1111_before_1_9_without_schedulers_still_checks_sampler_names() -> None:
    backend, asked = backend_with(
        {
            "GET /sdapi/v1/samplers": answer([{"name": "Euler a"}, {"name": "DPM++ 2M Karras"}]),
            "POST /sdapi/v1/txt2img": generated([image()], all_seeds=[11]),
        }
    )
    generate(backend, job(sampler="DPM++ 2M Karras"))
    with pytest.raises(UnsupportedJob, match="DPM\\+\\+ 2M Karras, Euler a"):
        generate(backend, job(sampler="DPM++ 2M Exponential"))
    assert asked.count("GET /sdapi/v1/schedulers") == 1


def test_progress_is_reported_in_the_jobs_steps_and_a_stale_step_count_is_ignored() -> None:
    # A1111 keeps the last job's sampling_steps until sampling starts, and img2img at denoise 0.5
    # samples t_enc + 1 = 11 of 20 steps: callers see steps out of the 20 they asked for.
    states = [(0, 30), (3, 11), (11, 11)]
    served = threading.Event()

    def progress(request: httpx.Request) -> httpx.Response:
        step, steps = states.pop(0) if states else (11, 11)
        if not states:
            served.set()
        return httpx.Response(
            200, json={"state": {**IDLE["state"], "job_count": 1, "sampling_step": step, "sampling_steps": steps}}
        )

    def sample(request: httpx.Request) -> httpx.Response:
        served.wait(5)
        return generated([image()], all_seeds=[11])(request)

    backend, _ = backend_with({"GET /sdapi/v1/progress": progress, "POST /sdapi/v1/img2img": sample})
    reported: list[tuple[int, int]] = []
    img2img = job(kind="img2img", steps=20, denoising_strength=0.5, init_image={"base64": image()})
    backend.generate(img2img, lambda step, steps: reported.append((step, steps)), threading.Event())
    assert reported[:2] == [(5, 20), (20, 20)]


@pytest.mark.parametrize(
    ("body", "raised", "message"),
    [
        ({"detail": "Invalid encoded image"}, BackendError, "Invalid encoded image"),
        ({"message": "Invalid encoded image"}, BackendError, "Invalid encoded image"),
        ({"detail": "model 'nope.safetensors' not found"}, ModelNotFound, "not found"),
        ({"error": "RuntimeError", "detail": "", "body": "", "errors": "model 'nope' not found"}, ModelNotFound, "nope"),
        ({"detail": "CUDA error: an illegal memory access"}, BackendUnavailable, "illegal memory access"),
    ],
)  # fmt: skip
def test_error_bodies_without_errors_are_still_classified(
    body: dict[str, Any], raised: type[Exception], message: str
) -> None:
    backend, _ = backend_with({"POST /sdapi/v1/txt2img": answer(body, 500)})
    with pytest.raises(raised, match=message) as caught:
        generate(backend, job())
    if raised is BackendError:
        assert type(caught.value) is BackendError  # permanent: a bad image is never retried


def test_a_server_that_loads_on_the_next_generation_loads_during_the_switch() -> None:
    # Forge: POST /options records the checkpoint (its options carry forge_preset); the weights
    # load in the next generation, which the switch runs itself so switch_ms is the load.
    selected = {"sd_model_checkpoint": "sd15.safetensors [6ce0161689]", "forge_preset": "sd"}

    def record(request: httpx.Request) -> httpx.Response:
        selected["sd_model_checkpoint"] = json.loads(request.content)["sd_model_checkpoint"]
        return httpx.Response(200, json=None)

    routes = {"GET /sdapi/v1/options": lambda request: httpx.Response(200, json=selected),
              "POST /sdapi/v1/options": record, "POST /sdapi/v1/txt2img": generated([image()], all_seeds=[11])}  # fmt: skip
    backend, asked = backend_with(routes)
    backend.switch_model("sdxl/base.safetensors")
    assert asked[-3:] == ["POST /sdapi/v1/options", "GET /sdapi/v1/options", "POST /sdapi/v1/txt2img"]
    assert backend.loaded_model() == "sdxl/base.safetensors"
    del selected["forge_preset"]  # A1111: the POST itself loads; no generation in the switch
    backend.switch_model("sd15.safetensors")
    assert asked[-2:] == ["POST /sdapi/v1/options", "GET /sdapi/v1/options"]
