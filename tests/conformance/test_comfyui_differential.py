"""The simulator against the real ComfyUI 0.3.64: the same requests to both, the same answers.

Compared: status codes, body shapes, the sampler, scheduler and checkpoint lists, validation
errors (type and node), the websocket messages of a prompt in order, and its history entry.
Images and timings are not: the simulator draws its own and runs on a clock of its own.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import pytest

from sdagent.devstack.kafka import free_loopback_port
from sdagent.sim.options import SimOptions
from sdagent.sim.thread import SimulatorThread
from tests.conformance.conftest import MODELS, READY_TIMEOUT_S, link_models
from tests.conformance.differential import answer, assert_same_shape, both, launched

SHALLOW_A, SHALLOW_B = MODELS["comfyui"]


@pytest.fixture(scope="module")
def servers(webui_root, tiny_models, tmp_path_factory) -> Iterator[dict[str, str]]:
    workdir = tmp_path_factory.mktemp("comfyui-differential")
    link_models((SHALLOW_A, SHALLOW_B), tiny_models / "comfyui")(workdir / "models/checkpoints")
    real = launched("comfyui", webui_root, workdir, free_loopback_port(), "/system_stats", READY_TIMEOUT_S)
    simulated = SimulatorThread(SimOptions(models=(SHALLOW_A, SHALLOW_B), data_dir=workdir / "sim-data",
                                           initial_model=None, step_latency_s=0.01, load_latency_s=0.0,
                                           switch_latency_s=0.0, seed=1))  # fmt: skip
    with real as real_url, simulated as sim:
        yield {"real": real_url, "sim": sim.url}


def graph(seed: int, **changes: Any) -> dict[str, Any]:
    """ComfyUI's default txt2img graph, small; ``changes`` replace (node, input) values."""
    prompt: dict[str, Any] = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SHALLOW_A}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "differential", "images": ["8", 0]}},
    }  # fmt: skip
    for key, value in changes.items():
        node, _, name = key.partition("__")
        if value is None:
            del prompt[node]["inputs"][name]
        else:
            prompt[node]["inputs"][name] = value
    return prompt


def test_sampler_scheduler_and_checkpoint_lists_are_the_real_ones(servers: dict[str, str]) -> None:
    for node, inputs in (("KSampler", ("sampler_name", "scheduler")), ("CheckpointLoaderSimple", ("ckpt_name",))):
        answers = {name: r.json()[node] for name, r in both(servers, "GET", f"/object_info/{node}").items()}
        for name in inputs:
            real, simulated = answers["real"]["input"]["required"][name], answers["sim"]["input"]["required"][name]
            assert simulated[0] == real[0], f"{node}.{name}"
        assert answers["sim"]["output"] == answers["real"]["output"], node


def test_every_simulated_node_is_described_as_the_real_one(servers: dict[str, str]) -> None:
    """Inputs, their types and option keys, outputs: what validation and a client read of a node."""
    real, simulated = ({**r.json()} for r in both(servers, "GET", "/object_info").values())
    found = []
    for name, node in simulated.items():
        if name not in real:
            found.append(f"{name}: the real server has no such node")
            continue
        for field in ("output", "output_is_list", "output_name", "output_node", "category"):
            if node.get(field) != real[name].get(field):
                found.append(f"{name}.{field}: {real[name].get(field)} (real) vs {node.get(field)} (simulator)")
        for category in ("required", "optional"):
            real_inputs, sim_inputs = real[name]["input"].get(category, {}), node["input"].get(category, {})
            if list(sim_inputs) != list(real_inputs):
                found.append(f"{name}.{category}: {list(real_inputs)} (real) vs {list(sim_inputs)} (simulator)")
            for input_name in sim_inputs.keys() & real_inputs.keys():
                real_spec, sim_spec = real_inputs[input_name], sim_inputs[input_name]
                if sim_spec[0] != real_spec[0]:
                    found.append(f"{name}.{input_name} type: {real_spec[0]} (real) vs {sim_spec[0]} (simulator)")
                real_options = real_spec[1] if len(real_spec) > 1 else {}
                sim_options = sim_spec[1] if len(sim_spec) > 1 else {}
                if sim_options != real_options:
                    found.append(f"{name}.{input_name} options: {real_options} (real) vs {sim_options} (simulator)")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", ["/queue", "/history?max_items=0", "/prompt", "/embeddings", "/models/checkpoints"])
def test_listings_answer_alike(servers: dict[str, str], path: str) -> None:
    answers = both(servers, "GET", path)
    assert answers["sim"].status_code == answers["real"].status_code == 200
    assert_same_shape(answers["real"].json(), answers["sim"].json())
    if path != "/embeddings":  # the simulator has none; the real one may have a few
        assert answers["sim"].json() == answers["real"].json()


def test_system_stats_have_the_real_shape(servers: dict[str, str]) -> None:
    answers = {name: r.json() for name, r in both(servers, "GET", "/system_stats").items()}
    assert answers["sim"].keys() == answers["real"].keys()
    assert answers["sim"]["system"].keys() == answers["real"]["system"].keys()
    assert answers["sim"]["devices"][0].keys() == answers["real"]["devices"][0].keys()


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"3__sampler_name": "no_such_sampler"}, id="unknown-sampler"),
        pytest.param({"4__ckpt_name": "nope.safetensors"}, id="unknown-checkpoint"),
        pytest.param({"3__steps": 0}, id="steps-below-minimum"),
        pytest.param({"3__cfg": "five"}, id="cfg-not-a-number"),
        pytest.param({"3__seed": None}, id="missing-required-input"),
        pytest.param({"3__model": ["99", 0]}, id="link-to-a-missing-node"),
        pytest.param({"5__width": 100000}, id="width-above-maximum"),
    ],
)
def test_invalid_prompts_are_refused_alike(servers: dict[str, str], changes: dict[str, Any]) -> None:
    answers = both(servers, "POST", "/prompt", json={"prompt": graph(1, **changes)})
    assert answers["sim"].status_code == answers["real"].status_code == 400
    real, simulated = answers["real"].json(), answers["sim"].json()
    assert_same_shape(real, simulated)
    assert simulated["error"]["type"] == real["error"]["type"]
    assert sorted(simulated["node_errors"]) == sorted(real["node_errors"])
    for node, errors in real["node_errors"].items():
        kinds = [(e["type"], e["extra_info"].get("input_name")) for e in errors["errors"]]
        assert [
            (e["type"], e["extra_info"].get("input_name")) for e in simulated["node_errors"][node]["errors"]
        ] == kinds


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}, id="unknown-node-class"),
        pytest.param(
            {"prompt": {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SHALLOW_A}}}},
            id="no-output-node",
        ),  # fmt: skip
        pytest.param({"nothing": 1}, id="no-prompt"),
    ],
)
def test_malformed_prompts_are_refused_alike(servers: dict[str, str], body: dict[str, Any]) -> None:
    answers = both(servers, "POST", "/prompt", json=body)
    assert answers["sim"].status_code == answers["real"].status_code
    real, simulated = answers["real"].json(), answers["sim"].json()
    assert_same_shape(real, simulated)
    assert simulated["error"]["type"] == real["error"]["type"]


def test_unparseable_and_unknown_requests_answer_alike(servers: dict[str, str]) -> None:
    for method, path, kwargs in (
        ("POST", "/prompt", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        ("GET", "/view?filename=nosuch.png&type=output", {}),
        ("GET", "/history/" + str(uuid.uuid4()), {}),
        ("POST", "/interrupt", {}),
        ("POST", "/free", {"json": {"unload_models": False}}),
        ("GET", "/nosuch", {}),
    ):
        answers = both(servers, method, path, **kwargs)
        assert answers["sim"].status_code == answers["real"].status_code, path
        if answers["real"].headers.get("content-type", "").startswith("application/json"):
            assert_same_shape(answer(answers["real"]), answer(answers["sim"]))


async def _messages_of(url: str, prompt: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    client_id = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
        messages = [json.loads((await ws.receive(timeout=30)).data)]
        async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
            assert response.status == 200, await response.text()
            prompt_id = (await response.json())["prompt_id"]
        while True:
            message = await ws.receive(timeout=120)
            if message.type is not aiohttp.WSMsgType.TEXT:
                messages.append({"type": f"binary:{message.type.name}", "data": {}})
                continue
            messages.append(json.loads(message.data))
            data = messages[-1]["data"]
            if messages[-1]["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return prompt_id, messages


def outline(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Each message as (type, node, the states in a progress_state, a progress's value/max)."""
    lines: list[tuple[Any, ...]] = []
    for message in messages:
        data = message["data"]
        if message["type"] == "progress_state":
            lines.append(("progress_state", tuple(sorted((node, n["state"]) for node, n in data["nodes"].items()))))
        elif message["type"] == "progress":
            lines.append(("progress", data["node"], data["value"], data["max"]))
        else:
            lines.append((message["type"], data.get("node")))
    return lines


@pytest.mark.parametrize("repeat", [False, True], ids=["fresh", "cached"])
def test_a_prompt_sends_the_same_messages_and_leaves_the_same_history(servers: dict[str, str], repeat: bool) -> None:
    prompt = graph(4242)
    runs = {name: asyncio.run(_messages_of(url, prompt)) for name, url in servers.items()}
    if repeat:  # the same prompt again: every node's output is cached
        runs = {name: asyncio.run(_messages_of(url, prompt)) for name, url in servers.items()}
    real_outline, sim_outline = outline(runs["real"][1]), outline(runs["sim"][1])
    assert sim_outline == real_outline, "\n".join(
        f"{r!s:90} {s}" for r, s in zip(real_outline, sim_outline, strict=False)
    )
    for kind in ("status", "execution_start", "execution_cached", "executing", "progress", "progress_state",
                 "executed", "execution_success"):  # fmt: skip
        real = next((m for m in runs["real"][1] if m["type"] == kind), None)
        simulated = next((m for m in runs["sim"][1] if m["type"] == kind), None)
        if real is not None:
            assert_same_shape(real, simulated)
    entries = {name: httpx.get(f"{servers[name]}/history/{prompt_id}", timeout=30).json()[prompt_id]
               for name, (prompt_id, _) in runs.items()}  # fmt: skip
    assert_same_shape(entries["real"], entries["sim"])
    assert [m[0] for m in entries["sim"]["status"]["messages"]] == [m[0] for m in entries["real"]["status"]["messages"]]
