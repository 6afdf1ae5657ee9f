"""The real WebUIs on this CPU (tiny random-weight models): start-up, model switch, agent overhead.

CPU figures from AUTOMATIC1111 v1.10.1 and ComfyUI 0.3.64 (``make webuis``), never GPU ones.
For each WebUI:

* **start to ready, alone**: the shipped launcher started by hand, until the API answers and until
  its first image (the model loaded); **under the agent**: ``sdagent run`` supervising the same
  launcher, until the agent says ``agent.started`` (WebUI up, model loaded, warm-up done, consuming).
* **model switch**: jobs alternating between two checkpoints; the answers' ``switch_ms``, and how
  much longer those jobs' inference took than a job on the loaded model (ComfyUI loads in the prompt).
* **agent overhead per job**: ``--jobs`` identical small jobs, one at a time, through Kafka and the
  agent (answer in S3 on moto); per job, the caller's end-to-end time minus the WebUI call the
  agent timed (``inference_ms``). The baseline in the same run: the same request sent straight to
  the WebUI, so the adapter's share shows too. Goal: overhead p99 < 20 ms.

Usage: ``.venv/bin/python bench/webui_real.py [--jobs 100] [--switches 10] [--webui a1111 comfyui]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from common import Services, emit, percentile, say, setup
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdagent.devstack.kafka import free_loopback_port  # noqa: E402
from tests.conformance.conftest import (  # noqa: E402
    MODELS,
    READY_TIMEOUT_S,
    installs,
    link_models,
    make_tiny_models,
    make_webui_root,
    start_stack,
)
from tests.conformance.differential import launched  # noqa: E402

SMALL = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2, "seed": 7}
READY_PATH = {"a1111": "/sdapi/v1/sd-models", "comfyui": "/system_stats"}


def direct_request(webui: str, model: str) -> tuple[str, dict[str, Any]]:
    """The same small generation as the agent's jobs, in the WebUI's own API."""
    if webui == "a1111":
        return "/sdapi/v1/txt2img", {**SMALL, "sampler_name": "Euler a"}
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": model}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": SMALL["prompt"], "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 7, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["8", 0]}},
    }  # fmt: skip
    return "/prompt", {"prompt": graph}


def run_direct(webui: str, url: str, model: str) -> float:
    """One direct generation, in ms; ComfyUI's is queued, so it waits for the history entry."""
    path, body = direct_request(webui, model)
    started = time.perf_counter()
    if webui == "a1111":
        httpx.post(url + path, json=body, timeout=300).raise_for_status()
        return (time.perf_counter() - started) * 1000
    body["prompt"]["3"]["inputs"]["seed"] = uuid.uuid4().int % 2**32  # not served from ComfyUI's cache
    client_id = uuid.uuid4().hex
    # Followed on the websocket as the adapter does: polling /history would slow ComfyUI down.
    with connect(f"{url.replace('http', 'ws', 1)}/ws?clientId={client_id}", max_size=None) as socket:
        prompt_id = httpx.post(url + path, json={**body, "client_id": client_id}, timeout=300).json()["prompt_id"]
        while True:
            message = socket.recv(timeout=300)
            if isinstance(message, str):
                data = json.loads(message).get("data", {})
                if json.loads(message).get("type") == "executing" and data.get("node") is None \
                        and data.get("prompt_id") == prompt_id:  # fmt: skip
                    return (time.perf_counter() - started) * 1000


def start_alone(webui: str, root: Path, tiny: Path, jobs: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{webui}-alone-"))
    link_models(MODELS[webui], tiny / webui)(workdir / "models/checkpoints")
    started = time.monotonic()
    with launched(webui, root, workdir, free_loopback_port(), READY_PATH[webui], READY_TIMEOUT_S) as url:
        api_up_s = time.monotonic() - started
        run_direct(webui, url, MODELS[webui][0])
        first_image_s = time.monotonic() - started
        direct = [run_direct(webui, url, MODELS[webui][0]) for _ in range(jobs)]
    say(f"{webui} alone: API up {api_up_s:.1f} s, first image {first_image_s:.1f} s; "
        f"direct call p50 {percentile(direct, 50):.1f} ms p99 {percentile(direct, 99):.1f} ms")  # fmt: skip
    return {"api_up_s": api_up_s, "first_image_s": first_image_s, "direct_ms": direct}


def under_agent(webui: str, root: Path, tiny: Path, services: Services, jobs: int, switches: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{webui}-agent-"))
    models = MODELS[webui]
    started = time.monotonic()
    stack = start_stack(webui, root, workdir, services.bootstrap, services.s3_endpoint, models=list(models),
                        install_models=link_models(models, tiny / webui))  # fmt: skip
    ready_s = time.monotonic() - started
    try:
        job = {"model": models[0], **SMALL}
        stack.run(job)  # the first job may stage or switch: not measured
        overhead, inference, end_to_end = [], [], []
        for index in range(jobs):
            sent = time.perf_counter()
            answer = stack.run({**job, "seed": 1000 + index})  # a new seed: ComfyUI would serve a repeat from cache
            total_ms = (time.perf_counter() - sent) * 1000
            assert answer.outputs, answer.message
            end_to_end.append(total_ms)
            inference.append(answer.timings_ms["inference_ms"])
            overhead.append(total_ms - answer.timings_ms["inference_ms"])
        switch_ms, switched_inference = [], []
        for index in range(switches):
            answer = stack.run({**job, "seed": 5000 + index, "model": models[(index + 1) % 2]})
            switch_ms.append(answer.timings_ms.get("switch_ms", 0.0))
            switched_inference.append(answer.timings_ms["inference_ms"])
    finally:
        stack.stop()
    say(f"{webui} under the agent: ready {ready_s:.1f} s; end to end p50 {percentile(end_to_end, 50):.1f} ms "
        f"p99 {percentile(end_to_end, 99):.1f} ms; inference p50 {percentile(inference, 50):.1f} ms; "
        f"agent overhead p50 {percentile(overhead, 50):.1f} ms p99 {percentile(overhead, 99):.1f} ms; "
        f"switch p50 {percentile(switch_ms, 50):.0f} ms")  # fmt: skip
    return {"ready_s": ready_s, "end_to_end_ms": end_to_end, "inference_ms": inference, "overhead_ms": overhead,
            "switch_ms": switch_ms, "switched_inference_ms": switched_inference}  # fmt: skip


def figures(webui: str, alone: dict[str, Any], agent: dict[str, Any]) -> dict[str, float]:
    direct_p50 = percentile(alone["direct_ms"], 50)
    return {
        f"{webui}_api_up_alone_s": round(alone["api_up_s"], 2),
        f"{webui}_first_image_alone_s": round(alone["first_image_s"], 2),
        f"{webui}_ready_under_agent_s": round(agent["ready_s"], 2),
        f"{webui}_direct_p50_ms": round(direct_p50, 1),
        f"{webui}_direct_p99_ms": round(percentile(alone["direct_ms"], 99), 1),
        f"{webui}_inference_p50_ms": round(percentile(agent["inference_ms"], 50), 1),
        f"{webui}_end_to_end_p50_ms": round(percentile(agent["end_to_end_ms"], 50), 1),
        f"{webui}_end_to_end_p99_ms": round(percentile(agent["end_to_end_ms"], 99), 1),
        f"{webui}_agent_overhead_p50_ms": round(percentile(agent["overhead_ms"], 50), 1),
        f"{webui}_agent_overhead_p99_ms": round(percentile(agent["overhead_ms"], 99), 1),
        f"{webui}_end_to_end_over_direct_p50": round(percentile(agent["end_to_end_ms"], 50) / direct_p50, 2),
        f"{webui}_switch_p50_ms": round(percentile(agent["switch_ms"], 50), 1),
        f"{webui}_switch_max_ms": round(max(agent["switch_ms"]), 1),
        # ComfyUI loads a checkpoint inside the prompt: its switch is ~0 and the load lands here.
        f"{webui}_switched_job_extra_inference_ms": round(
            percentile(agent["switched_inference_ms"], 50) - percentile(agent["inference_ms"], 50), 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--webui", nargs="+", choices=["a1111", "comfyui"], default=["a1111", "comfyui"])
    args = parser.parse_args()
    setup()
    webuis = installs()
    tiny = make_tiny_models(webuis)
    root = make_webui_root(Path(tempfile.mkdtemp(prefix="bench-opt-sdagent-webui-")), webuis, tiny)
    results: dict[str, Any] = {"cpu": True, "models": "tiny random-weight SD1 (tests/conformance/tiny_models.py)"}
    with Services(f"bench-webui-{uuid.uuid4().hex[:8]}") as services:
        for webui in args.webui:
            alone = start_alone(webui, root, tiny, args.jobs)
            agent = under_agent(webui, root, tiny, services, args.jobs, args.switches)
            results.update(figures(webui, alone, agent))
    emit(results)


if __name__ == "__main__":
    main()
