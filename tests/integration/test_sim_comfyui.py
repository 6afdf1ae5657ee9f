"""The simulator's ComfyUI API over real HTTP and a real websocket."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from sdagent.sim.options import SimOptions
from sdagent.sim.thread import SimulatorThread

FAST = SimOptions(step_latency_s=0.002, load_latency_s=0.0, switch_latency_s=0.0, initial_model=None)
SLOW = SimOptions(step_latency_s=0.03, load_latency_s=0.0, switch_latency_s=0.0, initial_model=None)


def call(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw.startswith(b"{") else raw


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def graph(
    *,
    seed: int = 1,
    steps: int = 3,
    size: int = 64,
    batch: int = 1,
    prefix: str = "sim",
    saver: str = "SaveImage",
    ckpt: str = "sd15.safetensors",
    **saver_inputs: Any,
) -> dict[str, Any]:
    """The standard txt2img graph of ComfyUI's default workflow, in API format."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },  # fmt: skip
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": saver, "inputs": {"filename_prefix": prefix, "images": ["8", 0], **saver_inputs}},
    }


async def run_prompt(
    url: str, prompt: dict[str, Any], client_id: str = "tester", during: Any = None
) -> tuple[str, list[dict[str, Any]]]:
    """Submit over HTTP and collect websocket messages until ``executing`` with node null."""
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
        messages = [await ws.receive_json(timeout=5)]
        async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
            assert response.status == 200, await response.text()
            prompt_id = (await response.json())["prompt_id"]
        while True:
            message = await ws.receive_json(timeout=10)
            messages.append(message)
            if during is not None:
                await during(session, message)
            data = message["data"]
            if message["type"] == "executing" and data["node"] is None and data["prompt_id"] == prompt_id:
                return prompt_id, messages


def wait_for_history(url: str, prompt_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        history = call(f"{url}/history/{prompt_id}")[1]
        if history:
            return history[prompt_id]
        time.sleep(0.01)
    raise AssertionError("the prompt never finished")


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(FAST) as running:
        yield running


@pytest.fixture
def slow_sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SLOW) as running:
        yield running


def test_websocket_messages_arrive_in_the_real_order(sim: SimulatorThread) -> None:
    prompt_id, messages = asyncio.run(run_prompt(sim.url, graph(seed=101), client_id="order"))
    assert messages[0] == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "order"}}
    kinds = [(m["type"], m["data"].get("node")) for m in messages[1:] if m["type"] != "progress_state"]
    assert kinds == [
        ("status", None), ("status", None), ("execution_start", None), ("execution_cached", None),
        ("executing", "4"), ("executing", "5"), ("executing", "7"), ("executing", "6"), ("executing", "3"),
        ("progress", "3"), ("progress", "3"), ("progress", "3"), ("executing", "8"), ("executing", "9"),
        ("executed", "9"), ("execution_success", None), ("status", None), ("executing", None),
    ]  # fmt: skip
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert progress[0] == {"value": 1, "max": 3, "prompt_id": prompt_id, "node": "3"}
    # progress.py: each node's state goes out as it starts, on each step and as it finishes.
    states = [(i, m["data"]["nodes"]) for i, m in enumerate(messages) if m["type"] == "progress_state"]
    for i, m in enumerate(messages):
        if m["type"] == "executing" and m["data"]["node"] is not None:
            assert messages[i - 1]["type"] == "progress_state"
            assert messages[i - 1]["data"]["nodes"][m["data"]["node"]]["state"] == "running"
        if m["type"] == "progress":
            assert (
                messages[i - 1]["data"]["nodes"]["3"] | {"state": "running", "value": m["data"]["value"]}
                == (messages[i - 1]["data"]["nodes"]["3"])
            )
    finished = states[-1][1]
    assert sorted(finished) == ["3", "4", "5", "6", "7", "8", "9"]
    assert all(node["state"] == "finished" and node["value"] == node["max"] for node in finished.values())
    assert finished["3"]["max"] == 3 and finished["9"]["prompt_id"] == prompt_id
    executed = next(m["data"] for m in messages if m["type"] == "executed")
    assert executed["output"]["images"][0]["type"] == "output" and executed["prompt_id"] == prompt_id


def test_history_holds_outputs_and_view_serves_the_files(sim: SimulatorThread) -> None:
    prompt_id, _ = asyncio.run(run_prompt(sim.url, graph(seed=202, prefix="hist/run")))
    entry = call(f"{sim.url}/history/{prompt_id}")[1][prompt_id]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [event for event, _ in entry["status"]["messages"]] == [
        "execution_start",
        "execution_cached",
        "execution_success",
    ]
    assert entry["prompt"][1] == prompt_id and entry["prompt"][4] == ["9"]
    image = entry["outputs"]["9"]["images"][0]
    assert image == {"filename": "run_00001_.png", "subfolder": "hist", "type": "output"}
    status, data = fetch(f"{sim.url}/view?filename={image['filename']}&subfolder=hist&type=output")
    assert status == 200 and Image.open(io.BytesIO(data)).size == (64, 64)
    assert fetch(f"{sim.url}/view?filename=nothing.png")[0] == 404
    assert fetch(f"{sim.url}/view?filename=../etc/passwd")[0] == 400
    assert fetch(f"{sim.url}/view?filename=x.png&type=secret")[0] == 400
    assert fetch(f"{sim.url}/view?filename=x.png&subfolder=../..")[0] == 403
    assert call(f"{sim.url}/history/unknown") == (200, {})
    assert prompt_id in call(f"{sim.url}/api/history?max_items=5")[1]


def test_an_identical_prompt_is_fully_cached(sim: SimulatorThread) -> None:
    prompt = graph(seed=303, prefix="cached")
    asyncio.run(run_prompt(sim.url, prompt))
    _, messages = asyncio.run(run_prompt(sim.url, prompt))
    cached = next(m["data"]["nodes"] for m in messages if m["type"] == "execution_cached")
    assert sorted(cached) == ["3", "4", "5", "6", "7", "8", "9"]
    assert not [m for m in messages if m["type"] in ("progress", "executing") and m["data"]["node"] is not None]
    assert (
        next(m for m in messages if m["type"] == "executed")["data"]["output"]["images"][0]["filename"]
        == "cached_00001_.png"
    )


def test_invalid_prompts_are_refused_with_node_errors(sim: SimulatorThread) -> None:
    status, body = call(f"{sim.url}/prompt", "POST", {"prompt": graph(ckpt="missing.safetensors")})
    assert status == 400
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"
    status, body = call(f"{sim.url}/prompt", "POST", {"client_id": "x"})
    assert (status, body["error"]["type"]) == (400, "no_prompt")
    status, body = call(f"{sim.url}/api/prompt", "POST", {"prompt": {"1": {"class_type": "Nope", "inputs": {}}}})
    assert (status, body["error"]["type"], body["node_errors"]) == (400, "invalid_prompt", {})


def test_prompt_id_and_number_can_be_chosen_by_the_client(sim: SimulatorThread) -> None:
    status, body = call(f"{sim.url}/prompt", "POST", {"prompt": graph(seed=404), "prompt_id": "mine-1", "number": 7})
    assert (status, body) == (200, {"prompt_id": "mine-1", "number": 7.0, "node_errors": {}})
    assert wait_for_history(sim.url, "mine-1")["status"]["completed"] is True


def test_uploaded_image_feeds_an_img2img_graph(sim: SimulatorThread) -> None:
    red = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(red, format="PNG")

    async def upload(data: bytes) -> dict[str, Any]:
        form = aiohttp.FormData()
        form.add_field("image", data, filename="source.png", content_type="image/png")
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{sim.url}/upload/image", data=form) as response:
                assert response.status == 200
                return await response.json()

    assert asyncio.run(upload(red.getvalue())) == {"name": "source.png", "subfolder": "", "type": "input"}
    assert asyncio.run(upload(red.getvalue()))["name"] == "source.png"  # same content: no copy
    assert asyncio.run(upload(b"other bytes"))["name"] == "source (1).png"
    prompt = graph(seed=505, prefix="i2i")
    prompt["10"] = {"class_type": "LoadImage", "inputs": {"image": "source.png"}}
    prompt["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    prompt["3"]["inputs"].update(latent_image=["11", 0], denoise=0.0)
    prompt_id, _ = asyncio.run(run_prompt(sim.url, prompt))
    image = wait_for_history(sim.url, prompt_id)["outputs"]["9"]["images"][0]
    _, data = fetch(f"{sim.url}/view?filename={image['filename']}")
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((10, 10)) == (255, 0, 0)  # denoise 0 keeps it
    assert "source.png" in call(f"{sim.url}/object_info/LoadImage")[1]["LoadImage"]["input"]["required"]["image"][0]


def test_video_nodes_save_a_real_animation(sim: SimulatorThread) -> None:
    webp = graph(
        seed=606,
        batch=4,
        prefix="clip",
        saver="SaveAnimatedWEBP",
        fps=8.0,
        lossless=False,
        quality=80,
        method="default",
    )
    prompt_id, _ = asyncio.run(run_prompt(sim.url, webp))
    output = wait_for_history(sim.url, prompt_id)["outputs"]["9"]
    assert output["animated"] == [True] and output["images"][0]["filename"] == "clip_00001_.webp"
    _, data = fetch(f"{sim.url}/view?filename=clip_00001_.webp")
    animation = Image.open(io.BytesIO(data))
    assert animation.format == "WEBP" and animation.n_frames == 4
    webm = graph(seed=607, batch=4, prefix="clip", saver="SaveWEBM", codec="vp9", fps=8.0, crf=32.0)
    prompt_id, _ = asyncio.run(run_prompt(sim.url, webm))
    name = wait_for_history(sim.url, prompt_id)["outputs"]["9"]["images"][0]["filename"]
    assert name == "clip_00002_.webm"
    assert fetch(f"{sim.url}/view?filename={name}")[1][:4] == b"\x1a\x45\xdf\xa3"  # EBML: a Matroska/WebM file


def test_queue_lists_running_and_pending_prompts_and_deletes_pending(slow_sim: SimulatorThread) -> None:
    url = slow_sim.url
    first = call(f"{url}/prompt", "POST", {"prompt": graph(seed=1, steps=15)})[1]["prompt_id"]
    second = call(f"{url}/prompt", "POST", {"prompt": graph(seed=2, steps=15)})[1]["prompt_id"]
    queue = call(f"{url}/queue")[1]
    assert [item[1] for item in queue["queue_running"] + queue["queue_pending"]] == [first, second]
    assert call(f"{url}/prompt")[1] == {"exec_info": {"queue_remaining": 2}}
    assert call(f"{url}/queue", "POST", {"delete": [second]})[0] == 200
    wait_for_history(url, first)
    time.sleep(0.05)
    assert call(f"{url}/history/{second}")[1] == {}
    assert call(f"{url}/queue")[1] == {"queue_running": [], "queue_pending": []}


def test_interrupt_stops_the_running_prompt(slow_sim: SimulatorThread) -> None:
    async def interrupt_at_first_progress(session: aiohttp.ClientSession, message: dict[str, Any]) -> None:
        if message["type"] == "progress" and message["data"]["value"] == 1:
            async with session.post(f"{slow_sim.url}/interrupt", json={}) as response:
                assert response.status == 200

    prompt_id, messages = asyncio.run(run_prompt(slow_sim.url, graph(steps=50), during=interrupt_at_first_progress))
    interrupted = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
    assert (interrupted["node_id"], interrupted["node_type"]) == ("3", "KSampler")
    assert sorted(interrupted["executed"]) == ["4", "5", "6", "7"]
    assert "execution_success" not in [m["type"] for m in messages]
    status = wait_for_history(slow_sim.url, prompt_id)["status"]
    assert (status["status_str"], status["completed"]) == ("error", False)


def test_free_unloads_the_model_between_prompts(sim: SimulatorThread) -> None:
    asyncio.run(run_prompt(sim.url, graph(seed=707)))
    device = call(f"{sim.url}/system_stats")[1]["devices"][0]
    assert device["vram_free"] < device["vram_total"]
    assert call(f"{sim.url}/free", "POST", {"unload_models": True, "free_memory": True})[0] == 200
    deadline = time.monotonic() + 5
    while call(f"{sim.url}/system_stats")[1]["devices"][0]["vram_free"] != device["vram_total"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    _, messages = asyncio.run(run_prompt(sim.url, graph(seed=707)))
    assert next(m["data"]["nodes"] for m in messages if m["type"] == "execution_cached") == []  # the cache went too


def test_system_stats_object_info_and_models(sim: SimulatorThread) -> None:
    stats = call(f"{sim.url}/api/system_stats")[1]
    assert stats["devices"][0]["name"] == "SIMULATED" and stats["system"]["comfyui_version"].endswith("simulated")
    info = call(f"{sim.url}/object_info")[1]
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [
        "sd15.safetensors",
        "sdxl_base.safetensors",
    ]
    assert info["SaveImage"]["output_node"] is True and info["KSampler"]["output"] == ["LATENT"]
    ksampler = call(f"{sim.url}/object_info/KSampler")[1]["KSampler"]
    assert ksampler["input_order"]["required"][:3] == ["model", "seed", "steps"] and ksampler["category"] == "sampling"
    assert call(f"{sim.url}/object_info/Nope") == (200, {})
    assert call(f"{sim.url}/models/checkpoints") == (200, ["sd15.safetensors", "sdxl_base.safetensors"])
    assert call(f"{sim.url}/models/loras") == (200, [])
    assert fetch(f"{sim.url}/models/nope")[0] == 404
    assert "checkpoints" in call(f"{sim.url}/models")[1]


def test_a_checkpoint_staged_in_the_models_dir_shows_up_without_a_refresh(tmp_path: Path) -> None:
    options = SimOptions(
        models=("sd15.safetensors",), models_dir=tmp_path, step_latency_s=0.0, load_latency_s=0.0, initial_model=None
    )
    with SimulatorThread(options) as running:
        (tmp_path / "staged.tmp").write_bytes(b"")
        os.rename(tmp_path / "staged.tmp", tmp_path / "staged.safetensors")  # an atomic rename, as a cache does
        os.utime(tmp_path, (1, 1))
        assert "staged.safetensors" in call(f"{running.url}/models/checkpoints")[1]
        prompt_id, _ = asyncio.run(run_prompt(running.url, graph(ckpt="staged.safetensors")))
        assert wait_for_history(running.url, prompt_id)["status"]["completed"] is True


def test_a_batch_beyond_free_vram_fails_with_a_cuda_oom_execution_error() -> None:
    options = SimOptions(
        step_latency_s=0.0, load_latency_s=0.0, initial_model=None, vram_total_mb=4096, vram_per_megapixel_mb=1024
    )
    with SimulatorThread(options) as running:
        prompt_id, messages = asyncio.run(run_prompt(running.url, graph(size=1024, batch=4)))
        error = next(m["data"] for m in messages if m["type"] == "execution_error")
        assert (error["node_id"], error["node_type"], error["exception_type"]) == (
            "3",
            "KSampler",
            "torch.cuda.OutOfMemoryError",
        )
        assert error["exception_message"].startswith("CUDA out of memory.") and "TIPS:" in error["exception_message"]
        assert error["current_inputs"]["steps"] == [3] and error["prompt_id"] == prompt_id
        assert wait_for_history(running.url, prompt_id)["status"]["status_str"] == "error"
        assert call(f"{running.url}/sim/stats")[1]["loaded_model"] is None  # ComfyUI unloads after an OOM


def test_a_failing_node_reports_an_execution_error_and_the_queue_goes_on(sim: SimulatorThread) -> None:
    prompt_id, messages = asyncio.run(run_prompt(sim.url, graph(seed=808, prefix="../outside")))
    error = next(m["data"] for m in messages if m["type"] == "execution_error")
    assert (error["node_type"], error["exception_type"]) == ("SaveImage", "Exception")
    assert "outside the output folder" in error["exception_message"]
    assert "8" in error["executed"] and "9" not in error["executed"]  # upstream nodes may come from the cache
    assert wait_for_history(sim.url, prompt_id)["status"]["status_str"] == "error"
    prompt_id, _ = asyncio.run(run_prompt(sim.url, graph(seed=808, prefix="inside")))
    assert wait_for_history(sim.url, prompt_id)["status"]["status_str"] == "success"


def test_previews_are_binary_frames_and_the_history_entry_comes_late() -> None:
    options = SimOptions(
        step_latency_s=0.002, load_latency_s=0.0, switch_latency_s=0.0, initial_model=None,
        history_delay_s=0.5, previews=True,
    )  # fmt: skip

    async def watch(url: str) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
        frames: list[Any] = []
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/ws?clientId=late") as ws:
            body = {"prompt": graph(seed=5, steps=2), "client_id": "late"}
            async with session.post(f"{url}/prompt", json=body) as response:
                prompt_id = (await response.json())["prompt_id"]
            while True:
                message = await ws.receive(timeout=10)
                frames.append(message.data if message.type is aiohttp.WSMsgType.BINARY else json.loads(message.data))
                if isinstance(frames[-1], dict) and frames[-1]["type"] == "execution_success":
                    async with session.get(f"{url}/history/{prompt_id}") as response:
                        at_success = await response.json()
                if (
                    isinstance(frames[-1], dict)
                    and frames[-1]["type"] == "executing"
                    and frames[-1]["data"]["node"] is None
                ):
                    async with session.get(f"{url}/history/{prompt_id}") as response:
                        return frames, at_success, await response.json()

    with SimulatorThread(options) as running:
        frames, at_success, at_end = asyncio.run(watch(running.url))
    previews = [frame for frame in frames if isinstance(frame, bytes)]
    kinds = [frame if isinstance(frame, bytes) else frame["type"] for frame in frames]
    assert len(previews) == 2 and all(kinds[kinds.index(preview) - 1] == "progress" for preview in previews)
    # server.py's frame: event 1 (PREVIEW_IMAGE), format 1 (JPEG), then the image.
    assert previews[0][:8] == b"\x00\x00\x00\x01\x00\x00\x00\x01"
    assert Image.open(io.BytesIO(previews[0][8:])).format == "JPEG"
    assert at_success == {} and list(at_end) and next(iter(at_end.values()))["status"]["completed"] is True
