"""The A1111 adapter against the real Forge (lllyasviel/stable-diffusion-webui-forge dfdcbab6) on CPU.

Forge serves A1111's API but loads a checkpoint chosen by ``POST /options`` only in the next
generation, and answers some errors without ``errors`` (``{"detail": ...}``, ``{..., "message":
...}``). The image does not offer Forge (no launcher branch); these tests start it by hand with
the flags the launcher gives A1111, and drive it with the adapter the agent uses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from sdagent.backends.a1111 import A1111Backend
from sdagent.devstack.kafka import free_loopback_port
from sdagent.errors import BackendError, ModelNotFound
from sdagent.jobs import Job
from tests.conformance.conftest import CPU_ARGS, MODELS, READY_TIMEOUT_S, link_models
from tests.conformance.differential import launched

# Forge detects SD 1.5 from the state dict's shapes as ComfyUI does: the shallow checkpoints serve.
SHALLOW_A, SHALLOW_B = MODELS["comfyui"]


@pytest.fixture(scope="module")
def forge(webui_root, tiny_models, tmp_path_factory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("forge")
    checkpoints = workdir / "models/checkpoints"
    link_models((SHALLOW_A, SHALLOW_B), tiny_models / "comfyui")(checkpoints)
    port = free_loopback_port()
    command = [str(webui_root / "forge/venv/bin/python"), "launch.py", "--nowebui", "--server-name", "127.0.0.1",
               "--port", str(port), "--skip-prepare-environment", "--skip-install", "--skip-version-check",
               "--no-download-sd-model", "--no-hashing", "--data-dir", str(workdir / "webui-state"),
               "--ckpt-dir", str(checkpoints), *CPU_ARGS["forge"].split()]  # fmt: skip
    with launched("forge", webui_root, workdir, port, "/sdapi/v1/sd-models", READY_TIMEOUT_S, command) as url:
        yield url


@pytest.fixture
def backend(forge: str) -> Iterator[A1111Backend]:
    adapter = A1111Backend(forge, models=[SHALLOW_A, SHALLOW_B], generation_timeout_s=300, progress_poll_s=0.05)
    yield adapter
    adapter.close()


def small(model: str, **fields) -> Job:
    return Job(model=model, width=64, height=64, steps=3, seed=5, **fields)


def test_a_switch_loads_the_model_itself_so_the_job_does_not(backend: A1111Backend, forge: str) -> None:
    started = time.monotonic()
    backend.switch_model(SHALLOW_B.removesuffix(".safetensors"))
    switch_s = time.monotonic() - started
    record_only_s = _time_post_options(forge, SHALLOW_B)  # already selected: Forge only records it
    assert backend.loaded_model() == SHALLOW_B
    steps: list[tuple[int, int]] = []
    generation = backend.generate(small(SHALLOW_B), lambda step, total: steps.append((step, total)), threading.Event())
    assert len(generation.artifacts) == 1 and steps and steps[-1][1] == 3
    # The load happened in the switch: it took far longer than Forge's own POST /options.
    assert switch_s > 10 * record_only_s, (switch_s, record_only_s)


def test_an_invalid_image_is_a_permanent_refusal(backend: A1111Backend) -> None:
    backend.switch_model(SHALLOW_A)
    job = small(SHALLOW_A, kind="img2img", init_image={"base64": "bm90IGFuIGltYWdl"})
    with pytest.raises(BackendError, match="Invalid encoded image") as caught:
        backend.generate(job, lambda step, total: None, threading.Event())
    assert type(caught.value) is BackendError  # not BackendUnavailable: never retried


def test_an_unknown_checkpoint_in_the_options_is_model_not_found(backend: A1111Backend) -> None:
    answer = httpx.post(backend._url + "/sdapi/v1/options", json={"sd_model_checkpoint": "nope.safetensors"})
    assert answer.status_code == 500 and "errors" not in answer.json()  # Forge's body: {..., "message"}
    with pytest.raises(ModelNotFound, match="not found"):
        backend._call("POST", "/options", json={"sd_model_checkpoint": "nope.safetensors"})


def _time_post_options(url: str, model: str) -> float:
    started = time.monotonic()
    httpx.post(url + "/sdapi/v1/options", json={"sd_model_checkpoint": model}, timeout=60).raise_for_status()
    return time.monotonic() - started
