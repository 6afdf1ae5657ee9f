"""Every injected fault of the simulator, armed at start-up or through /sim/faults, over real HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from sdagent.sim.engine import CRASH_EXIT_CODE
from sdagent.sim.faults import Fault, FaultKind
from sdagent.sim.options import SimOptions
from sdagent.sim.thread import SimulatorThread

OPTIONS = SimOptions(step_latency_s=0.01, load_latency_s=0.0, switch_latency_s=0.0)
TXT2IMG = {"prompt": "storm", "steps": 4, "width": 64, "height": 64}
GRAPH: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "storm", "clip": ["4", 1]}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 5,
            "steps": 6,
            "cfg": 7.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["6", 0],
            "latent_image": ["5", 0],
        },
    },  # fmt: skip
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "faults", "images": ["8", 0]}},
}


def call(url: str, method: str = "GET", body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw.startswith(b"{") else raw.decode()
    return response.status, json.loads(raw) if raw else None


def arm(url: str, **fault: Any) -> None:
    status, body = call(f"{url}/sim/faults", "POST", fault)
    assert status == 200, body


@pytest.fixture(scope="module")
def running() -> Iterator[SimulatorThread]:
    with SimulatorThread(OPTIONS) as sim:
        yield sim


@pytest.fixture
def sim(running: SimulatorThread) -> Iterator[SimulatorThread]:
    """The module's simulator with no fault left armed after the test."""
    yield running
    call(f"{running.url}/sim/faults", "DELETE")


async def comfy_run(url: str, during: Any = None) -> tuple[str, list[dict[str, Any]], bool]:
    """Run GRAPH; returns (prompt_id, messages, whether the socket was cut before the end)."""
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/ws?clientId=faults") as ws:
        await ws.receive_json(timeout=5)
        async with session.post(f"{url}/prompt", json={"prompt": GRAPH, "client_id": "faults"}) as response:
            prompt_id = (await response.json())["prompt_id"]
        messages: list[dict[str, Any]] = []
        while True:
            message = await ws.receive(timeout=10)
            if message.type != aiohttp.WSMsgType.TEXT:
                return prompt_id, messages, True
            messages.append(json.loads(message.data))
            if during is not None:
                await during(session, messages[-1])
            data = messages[-1]["data"]
            if messages[-1]["type"] == "executing" and data["node"] is None and data["prompt_id"] == prompt_id:
                return prompt_id, messages, False


def history(url: str, prompt_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entry = call(f"{url}/history/{prompt_id}")[1]
        if entry:
            return entry[prompt_id]
        time.sleep(0.01)
    raise AssertionError("the prompt never finished")


def test_error_fault_answers_5xx_in_each_apis_shape_then_clears(sim: SimulatorThread) -> None:
    url = sim.url
    arm(url, kind="error", count=2, status=503, api="a1111")
    expected = (
        503,
        {"error": "RuntimeError", "detail": "", "body": "", "errors": "simulated server error (injected fault)"},
    )
    assert call(f"{url}/sdapi/v1/progress")[0] == 200  # not a generation request
    assert call(f"{url}/sdapi/v1/txt2img", "POST", TXT2IMG) == expected
    assert call(f"{url}/sdapi/v1/txt2img", "POST", TXT2IMG) == expected
    assert call(f"{url}/sdapi/v1/txt2img", "POST", TXT2IMG)[0] == 200
    arm(url, kind="error", api="comfyui")
    status, body = call(f"{url}/prompt", "POST", {"prompt": GRAPH})
    assert status == 500 and body.startswith("500 Internal Server Error")
    assert call(f"{url}/sim/faults")[1]["fired"]["error"] == 3


def test_error_fault_scoped_to_all_breaks_every_route_but_the_simulators_own(sim: SimulatorThread) -> None:
    arm(sim.url, kind="error", scope="all", count=-1)
    assert call(f"{sim.url}/system_stats")[0] == 500
    assert call(f"{sim.url}/sdapi/v1/sd-models")[0] == 500
    assert call(f"{sim.url}/sim/stats")[0] == 200
    call(f"{sim.url}/sim/faults", "DELETE")
    assert call(f"{sim.url}/system_stats")[0] == 200


def test_slow_fault_delays_the_answer(sim: SimulatorThread) -> None:
    arm(sim.url, kind="slow", delay_s=0.3, scope="all", api="comfyui")
    started = time.monotonic()
    assert call(f"{sim.url}/queue")[0] == 200
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    call(f"{sim.url}/queue")
    assert time.monotonic() - started < 0.3


def test_hang_fault_stalls_an_a1111_job_until_interrupted(sim: SimulatorThread) -> None:
    url = sim.url
    arm(url, kind="hang")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(call, f"{url}/sdapi/v1/txt2img", "POST", TXT2IMG)
        deadline = time.monotonic() + 5
        while call(f"{url}/sdapi/v1/progress")[1]["state"]["job"] != "scripts_txt2img":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.15)  # fifteen step latencies: a running job would be done by now
        progress = call(f"{url}/sdapi/v1/progress")[1]
        assert progress["state"]["sampling_step"] == 0 and not job.done()
        call(f"{url}/sdapi/v1/interrupt", "POST")
        status, body = job.result(timeout=5)
    assert status == 200 and len(body["images"]) == 1


def test_hang_fault_stalls_a_comfyui_prompt_until_interrupted(sim: SimulatorThread) -> None:
    arm(sim.url, kind="hang", api="comfyui")

    async def interrupt_when_sampling(session: aiohttp.ClientSession, message: dict[str, Any]) -> None:
        if message["type"] == "executing" and message["data"]["node"] == "3":
            await asyncio.sleep(0.1)
            await session.post(f"{sim.url}/api/interrupt", json={})

    prompt_id, messages, _ = asyncio.run(comfy_run(sim.url, interrupt_when_sampling))
    assert "progress" not in [m["type"] for m in messages]
    assert next(m for m in messages if m["type"] == "execution_interrupted")["data"]["node_id"] == "3"
    assert history(sim.url, prompt_id)["status"]["status_str"] == "error"


def test_oom_fault_takes_each_apis_error_shape(sim: SimulatorThread) -> None:
    url = sim.url
    oom_before = call(f"{url}/sdapi/v1/memory")[1]["cuda"]["events"]["oom"]
    arm(url, kind="oom", api="a1111")
    status, body = call(f"{url}/sdapi/v1/txt2img", "POST", TXT2IMG)
    assert status == 500 and body["error"] == "OutOfMemoryError" and body["errors"].startswith("CUDA out of memory.")
    assert call(f"{url}/sdapi/v1/memory")[1]["cuda"]["events"]["oom"] == oom_before + 1
    arm(url, kind="oom", api="comfyui")
    prompt_id, messages, _ = asyncio.run(comfy_run(url))
    error = next(m["data"] for m in messages if m["type"] == "execution_error")
    assert (error["node_type"], error["exception_type"]) == ("KSampler", "torch.cuda.OutOfMemoryError")
    assert history(url, prompt_id)["status"]["completed"] is False


def test_ws_drop_cuts_the_socket_mid_execution_and_the_prompt_still_finishes(sim: SimulatorThread) -> None:
    arm(sim.url, kind="ws_drop")
    prompt_id, messages, cut = asyncio.run(comfy_run(sim.url))
    assert cut and messages[-1]["type"] == "progress" and messages[-1]["data"]["value"] == 1
    assert history(sim.url, prompt_id)["status"]["status_str"] == "success"


def test_faults_armed_at_start_up_fire_first() -> None:
    options = SimOptions(step_latency_s=0.0, load_latency_s=0.0, faults=(Fault(FaultKind.ERROR, count=1),))
    with SimulatorThread(options) as sim:
        assert call(f"{sim.url}/sim/faults")[1]["armed"][0]["kind"] == "error"
        assert call(f"{sim.url}/sdapi/v1/txt2img", "POST", TXT2IMG)[0] == 500
        assert call(f"{sim.url}/sdapi/v1/txt2img", "POST", TXT2IMG)[0] == 200


def test_control_routes_validate_faults_and_count_requests(sim: SimulatorThread) -> None:
    url = sim.url
    status, body = call(f"{url}/sim/faults", "POST", {"kind": "meteor"})
    assert status == 400 and "meteor" in body["error"]
    assert call(f"{url}/sim/faults", "POST", [1])[0] == 400
    arm(url, kind="crash", count=3)
    assert call(f"{url}/sim/faults")[1]["armed"] == [
        {"kind": "crash", "count": 3, "api": None, "scope": "generation", "status": 500, "delay_s": 5.0}
    ]
    assert call(f"{url}/sim/faults", "DELETE")[1]["armed"] == []
    call(f"{url}/sim/stats", "DELETE")
    call(f"{url}/sdapi/v1/progress")
    call(f"{url}/history/abc")
    stats = call(f"{url}/sim/stats")[1]
    assert stats["requests"] == {"GET /sdapi/v1/progress": 1, "GET /history/{prompt_id}": 1}
    assert stats["simulator"] is True and stats["vram_total_mb"] == OPTIONS.vram_total_mb


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_process(*flags: str) -> tuple[subprocess.Popen[str], str]:
    port = _free_port()
    command = [sys.executable, "-m", "sdagent.sim", "--port", str(port), "--log-format", "json",
               "--step-latency-s", "0.01", "--load-latency-s", "0", *flags]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if call(f"{url}/sdapi/v1/sd-models", timeout=1)[0] == 200:
                return process, url
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the simulator never answered: {process.communicate()}")


def test_crash_fault_kills_the_process_mid_generation() -> None:
    process, url = _start_process("--fault", "crash")
    try:
        with pytest.raises(OSError):  # the connection dies with the process: no HTTP answer at all
            call(f"{url}/sdapi/v1/txt2img", "POST", TXT2IMG)
        assert process.wait(timeout=10) == CRASH_EXIT_CODE
        assert "sim.crashing" in process.stderr.read()
    finally:
        process.kill()
        process.communicate()


def test_the_process_logs_a_simulator_start_line_and_stops_on_sigterm_despite_an_open_websocket() -> None:
    process, url = _start_process()

    async def terminate_while_connected() -> aiohttp.WSMsgType:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/ws") as ws:
            await ws.receive_json(timeout=5)
            process.send_signal(signal.SIGTERM)
            return (await ws.receive(timeout=10)).type

    try:
        assert call(f"{url}/system_stats")[1]["devices"][0]["name"] == "SIMULATED"
        assert asyncio.run(terminate_while_connected()) is aiohttp.WSMsgType.CLOSE
        assert process.wait(timeout=10) == 0
        started = json.loads(next(line for line in process.stderr.read().splitlines() if "sim.started" in line))
        assert started["simulator"] is True and started["url"] == url
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.communicate()
