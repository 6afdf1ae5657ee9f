"""The real ComfyUI 0.3.64 (CPU, SD1.5-shaped random-weight checkpoints) under ``sdagent run``:
templates and workflow jobs through Kafka and the gateway, outputs in S3 (moto)."""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import av
import psutil
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdagent.devstack.moto import aws_client
from sdagent.devstack.stack import settings_from
from sdagent.gateway.auth import hash_key
from sdagent.gateway.server import build_app
from sdagent.jobs import Status
from tests.conformance.conftest import MODELS, Stack, link_models, start_stack

SHALLOW_A, SHALLOW_B = MODELS["comfyui"]
SMALL = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}
LONG = {"prompt": "a long one", "width": 128, "height": 128, "steps": 60}
KEY = "sdk_conformance-key"


@pytest.fixture(scope="module")
def comfyui(webui_root, tiny_models, kafka_bootstrap, aws_endpoint, tmp_path_factory) -> Iterator[Stack]:
    models = (SHALLOW_A, SHALLOW_B)
    stack = start_stack("comfyui", webui_root, tmp_path_factory.mktemp("comfyui"), kafka_bootstrap, aws_endpoint,
                        models=list(models), install_models=link_models(models, tiny_models / "comfyui"))  # fmt: skip
    yield stack
    stack.stop()


def image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def graph(**sampler: Any) -> dict[str, Any]:
    """A caller's API-format graph with settings of its own (none of them the job defaults)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SHALLOW_B}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "graph prompt", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "graph negative", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 987, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], **sampler}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "caller", "images": ["8", 0]}},
    }  # fmt: skip


def last_graph_run(stack: Stack) -> dict[str, Any]:
    """The graph ComfyUI ran last, from its own history."""
    history = stack.get("/history?max_items=1")
    (entry,) = history.values()
    return entry["prompt"][2]


def test_txt2img_runs_on_the_real_webui_and_lands_in_s3(comfyui: Stack) -> None:
    answer = comfyui.run({"model": SHALLOW_A, "seed": 1234, **SMALL})
    assert answer.status is Status.SUCCEEDED, answer.message
    assert answer.info["seed"] == 1234 and answer.info["template"] == "txt2img.v1"
    assert image(comfyui.output(answer)).size == (64, 64)


def test_a_batch_answers_one_output_per_image(comfyui: Stack) -> None:
    answer = comfyui.run({"model": SHALLOW_A, "batch_size": 2, **SMALL})
    assert answer.status is Status.SUCCEEDED, answer.message
    assert [image(comfyui.output(answer, index)).size for index in range(2)] == [(64, 64)] * 2


def test_img2img_takes_a_base64_and_an_s3_init_image(comfyui: Stack) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), "blue").save(buffer, format="PNG")
    key = "inputs/blue.png"
    aws_client("s3", comfyui.aws_endpoint).put_object(Bucket=comfyui.bucket, Key=key, Body=buffer.getvalue())
    for init_image in ({"base64": base64.b64encode(buffer.getvalue()).decode()},
                       {"s3_uri": f"s3://{comfyui.bucket}/{key}"}):  # fmt: skip
        answer = comfyui.run({"model": SHALLOW_A, "kind": "img2img", "init_image": init_image,
                              "denoising_strength": 0.5, **SMALL})  # fmt: skip
        assert answer.status is Status.SUCCEEDED, answer.message
        assert image(comfyui.output(answer)).size == (64, 64)


def test_jobs_switch_between_two_checkpoints_with_and_without_extension(comfyui: Stack) -> None:
    on_b = comfyui.run({"model": SHALLOW_B, **SMALL})
    on_a = comfyui.run({"model": "shallow-a", **SMALL})
    on_a_again = comfyui.run({"model": SHALLOW_A, **SMALL})
    assert [answer.status for answer in (on_b, on_a, on_a_again)] == [Status.SUCCEEDED] * 3
    assert (on_b.info["ckpt_name"], on_a.info["ckpt_name"]) == (SHALLOW_B, SHALLOW_A)
    assert last_graph_run(comfyui)["checkpoint"]["inputs"]["ckpt_name"] == SHALLOW_A
    assert "switch_ms" not in on_a_again.timings_ms  # "shallow-a" and its file are one model


def test_an_unknown_model_fails_with_its_reason_and_the_next_job_runs(comfyui: Stack) -> None:
    answer = comfyui.run({"model": "no-such-model", **SMALL})
    assert answer.status is Status.FAILED and answer.reason == "model_not_found", answer
    assert comfyui.run({"model": SHALLOW_A, **SMALL}).status is Status.SUCCEEDED


def test_a_workflow_job_through_kafka_runs_the_graph_as_sent(comfyui: Stack) -> None:
    answer = comfyui.run({"model": SHALLOW_B, "kind": "workflow", "workflow": graph()})
    assert answer.status is Status.SUCCEEDED, answer.message
    assert image(comfyui.output(answer)).size == (64, 48)
    ran = last_graph_run(comfyui)
    assert {key: ran["3"]["inputs"][key] for key in ("seed", "steps", "cfg", "denoise")} == {
        "seed": 987, "steps": 2, "cfg": 5.0, "denoise": 1.0}  # fmt: skip
    assert (ran["6"]["inputs"]["text"], ran["7"]["inputs"]["text"]) == ("graph prompt", "graph negative")
    assert answer.info["seeds"] == [987]


def test_a_workflow_job_through_the_gateway_runs_the_graph_as_sent(comfyui: Stack) -> None:
    config = json.loads(json.dumps(comfyui.config))
    config["gateway"] = {"api_keys": [{"name": "conformance", "sha256": hash_key(KEY), "rate_per_s": 100}],
                         "max_wait_s": 120}  # fmt: skip
    body = {"model": SHALLOW_B, "kind": "workflow", "workflow": graph(seed=4321)}
    with TestClient(build_app(settings_from(config), gateway_id="conformance")) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        response = client.post("/v1/jobs?wait=120", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded" and response.json()["info"]["seeds"] == [4321]
    ran = last_graph_run(comfyui)
    assert (ran["3"]["inputs"]["steps"], ran["3"]["inputs"]["cfg"], ran["5"]["inputs"]["width"]) == (2, 5.0, 64)


def test_txt2vid_without_a_format_answers_an_mp4(comfyui: Stack) -> None:
    answer = comfyui.run({"model": SHALLOW_A, "kind": "txt2vid", "video": {"frames": 3, "fps": 8}, **SMALL})
    assert answer.status is Status.SUCCEEDED, answer.message
    assert answer.outputs[0].content_type == "video/mp4"
    with av.open(io.BytesIO(comfyui.output(answer))) as container:
        assert len(list(container.decode(video=0))) == 3


def test_progress_events_come_while_it_samples(comfyui: Stack) -> None:
    answer = comfyui.run({"model": SHALLOW_A, **LONG})
    assert answer.status is Status.SUCCEEDED, answer.message
    steps = [event.progress.step for event in comfyui.seen[answer.job_id] if event.progress is not None]
    assert len(steps) >= 2 and steps == sorted(steps) and 0 < steps[-1] <= LONG["steps"]


def test_a_queued_job_and_a_sampling_job_are_cancelled(comfyui: Stack) -> None:
    running: dict[str, Any] = {}
    started = threading.Event()
    job = {"model": SHALLOW_A, "job_id": "comfyui-cancel-running", **LONG}
    runner = threading.Thread(target=lambda: running.update(answer=comfyui.client.run(
        job, timeout_s=120, on_event=lambda e: e.progress and started.set())))  # fmt: skip
    runner.start()
    assert started.wait(60), "the long job never reported progress"
    queued = comfyui.client.submit({"model": SHALLOW_A, "job_id": "comfyui-cancel-queued", **SMALL})
    comfyui.client.cancel(queued.job_id)
    time.sleep(0.5)
    since = time.monotonic()
    comfyui.client.cancel(job["job_id"])
    runner.join(60)
    assert running["answer"].status is Status.CANCELLED, running["answer"]
    assert time.monotonic() - since < 10
    assert comfyui.run({"model": SHALLOW_A, **SMALL}).status is Status.SUCCEEDED


def test_the_api_listens_on_loopback_only(comfyui: Stack) -> None:
    listening = [conn.laddr for pid in comfyui.webui_pids() for conn in psutil.Process(pid).net_connections("inet")
                 if conn.status == psutil.CONN_LISTEN]  # fmt: skip
    assert listening and {address.ip for address in listening} == {"127.0.0.1"}, listening


def test_a_webui_killed_mid_job_is_restarted_and_the_job_still_succeeds(comfyui: Stack) -> None:
    result: dict[str, Any] = {}
    started = threading.Event()
    job = {"model": SHALLOW_A, "job_id": "comfyui-killed-mid-job", **LONG}
    runner = threading.Thread(target=lambda: result.update(answer=comfyui.client.run(
        job, timeout_s=300, on_event=lambda e: e.progress and started.set())))  # fmt: skip
    runner.start()
    assert started.wait(60)
    for pid in comfyui.webui_pids():
        psutil.Process(pid).send_signal(signal.SIGKILL)
    runner.join(300)
    assert result["answer"].status is Status.SUCCEEDED, result["answer"]
    names = [event.get("event") for event in comfyui.log_events()]
    assert "webui.exited" in names and "webui.restarted" in names
