"""Job -> ComfyUI graph mapping and answer -> error mapping, against an in-memory fake ComfyUI.

The fake (an httpx MockTransport) records the graphs queued and ends every prompt at once; no
websocket is offered, so the backend follows through ``/history`` as it does when the socket fails.
The real simulator is exercised in tests/integration/test_comfyui_backend.py.
"""

from __future__ import annotations

import base64
import io
import json
import random
import threading
from typing import Any

import httpx
import pytest
from PIL import Image

from sdagent.backends.comfyui import ComfyUIBackend
from sdagent.backends.comfyui.errors import execution_error, rejected
from sdagent.backends.comfyui.transport import PromptWatch
from sdagent.errors import BackendError, BackendUnavailable, ConfigError, ModelNotFound, UnsupportedJob
from sdagent.jobs import Job, Limits, parse_job

SAVERS = {"SaveImage": "png", "SaveWEBM": "webm", "SaveAnimatedWEBP": "webp", "SaveVideo": "mp4"}


def _png(width: int = 8, height: int = 8, colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeComfy:
    """Just enough of ComfyUI's HTTP API; every queued prompt succeeds at once."""

    def __init__(self) -> None:
        self.checkpoints = ["sd15.safetensors", "styles\\dreamy.safetensors"]
        self.prompts: list[dict[str, Any]] = []
        self.uploads: list[tuple[str, bytes]] = []
        self.history: dict[str, Any] = {}
        self.prompt_status = 200

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/object_info/CheckpointLoaderSimple":
            spec = {"required": {"ckpt_name": [self.checkpoints, {}]}}
            return httpx.Response(200, json={"CheckpointLoaderSimple": {"input": spec}})
        if path == "/object_info/KSampler":
            spec = {"sampler_name": [["euler", "euler_ancestral", "dpmpp_2m"]],
                    "scheduler": ["COMBO", {"options": ["normal", "karras"]}]}  # fmt: skip
            return httpx.Response(200, json={"KSampler": {"input": {"required": spec}}})
        if path == "/prompt":
            if self.prompt_status != 200:
                return httpx.Response(self.prompt_status, text="500 Internal Server Error")
            body = json.loads(request.content)
            prompt_id, graph = body["prompt_id"], body["prompt"]
            self.prompts.append(graph)
            outputs = {
                node: {"images": [{"filename": f"out_{node}.{SAVERS[spec['class_type']]}", "subfolder": "sdagent",
                                   "type": "output"}]}
                for node, spec in graph.items() if spec["class_type"] in SAVERS
            }  # fmt: skip
            status = {"status_str": "success", "completed": True, "messages": []}
            self.history[prompt_id] = {"outputs": outputs, "status": status}
            return httpx.Response(200, json={"prompt_id": prompt_id, "number": len(self.prompts), "node_errors": {}})
        if path.startswith("/history/"):
            prompt_id = path.rsplit("/", 1)[1]
            return httpx.Response(200, json={prompt_id: self.history[prompt_id]} if prompt_id in self.history else {})
        if path == "/view":
            return httpx.Response(200, content=_png() if request.url.params["filename"].endswith(".png") else b"clip")
        if path == "/upload/image":
            boundary = request.headers["content-type"].split("boundary=")[1].encode()
            part = next(part for part in request.read().split(b"--" + boundary) if b'name="image"' in part)
            headers, data = part.split(b"\r\n\r\n", 1)
            name = headers.split(b'filename="', 1)[1].split(b'"', 1)[0].decode()
            self.uploads.append((name, data.removesuffix(b"\r\n")))
            return httpx.Response(200, json={"name": name, "subfolder": "sdagent", "type": "input"})
        if path in ("/queue", "/interrupt", "/free"):
            return httpx.Response(200)
        return httpx.Response(404, text="404: Not Found")


def _no_socket(url: str, timeout: float):
    raise ConnectionRefusedError("no websocket in this test")


@pytest.fixture
def fake() -> FakeComfy:
    return FakeComfy()


@pytest.fixture
def backend(fake: FakeComfy) -> ComfyUIBackend:
    client = httpx.Client(transport=httpx.MockTransport(fake), base_url="http://comfy.test")
    return ComfyUIBackend(
        "http://comfy.test", client=client, ws_connect=_no_socket, progress_poll_s=0.01, rng=random.Random(1)
    )


def run(backend: ComfyUIBackend, **fields: Any):
    fields.setdefault("model", "sd15.safetensors")
    steps: list[tuple[int, int]] = []
    generation = backend.generate(Job(**fields), lambda step, total: steps.append((step, total)), threading.Event())
    return generation, steps


def _graph(**overrides: Any) -> dict[str, Any]:
    """ComfyUI's default txt2img graph in API format, with numeric ids as the UI exports it."""
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "graph prompt", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "graph negative", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 5, "steps": 12, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "mine", "images": ["8", 0]}},
    }  # fmt: skip
    graph.update(overrides)
    return graph


# --- templates ------------------------------------------------------------------------------------------


def test_txt2img_fills_the_template_and_draws_a_seed_in_the_job_range(backend, fake) -> None:
    generation, steps = run(backend, prompt="a fox", negative_prompt="blur", width=640, height=384, steps=7,
                            cfg_scale=4.5, batch_size=1, seed=-1)  # fmt: skip
    graph = fake.prompts[0]
    assert graph["checkpoint"]["inputs"]["ckpt_name"] == "sd15.safetensors"
    assert (graph["positive"]["inputs"]["text"], graph["negative"]["inputs"]["text"]) == ("a fox", "blur")
    assert graph["latent"]["inputs"] == {"width": 640, "height": 384, "batch_size": 1}
    sampler = graph["sampler"]["inputs"]
    assert (sampler["steps"], sampler["cfg"]) == (7, 4.5) and 0 <= sampler["seed"] < 2**32 - 1
    assert graph["save"]["inputs"]["filename_prefix"].startswith("sdagent/")
    assert generation.info["seed"] == sampler["seed"] == generation.artifacts[0].seed
    assert generation.info["template"] == "txt2img.v1" and generation.info["sampler"] == "euler"
    assert generation.artifacts[0].content_type == "image/png" and steps == []  # no websocket, no steps


def test_a_nested_checkpoint_is_sent_in_comfyuis_spelling(backend, fake) -> None:
    backend.switch_model("styles/dreamy.safetensors")
    assert backend.loaded_model() == "styles/dreamy.safetensors"
    run(backend, model="styles/dreamy.safetensors", prompt="x")
    assert fake.prompts[0]["checkpoint"]["inputs"]["ckpt_name"] == "styles\\dreamy.safetensors"
    assert backend.refresh_models() == ("sd15.safetensors", "styles/dreamy.safetensors")


def test_an_unknown_model_is_model_not_found_before_anything_is_queued(backend, fake) -> None:
    with pytest.raises(ModelNotFound, match=r"nope\.safetensors"):
        backend.switch_model("nope.safetensors")
    with pytest.raises(ModelNotFound):
        run(backend, model="nope.safetensors")
    assert fake.prompts == []


def test_jpeg_and_webp_stills_are_reencoded_from_comfyuis_png(backend) -> None:
    jpeg, _ = run(backend, output={"format": "jpeg"})
    webp, _ = run(backend, output={"format": "webp"})
    assert jpeg.artifacts[0].data.startswith(b"\xff\xd8\xff") and jpeg.artifacts[0].extension == "jpeg"
    assert webp.artifacts[0].data[8:12] == b"WEBP" and webp.artifacts[0].content_type == "image/webp"


def test_txt2vid_without_a_format_makes_the_default_mp4(backend, fake) -> None:
    generation, _ = run(backend, kind="txt2vid", video={"frames": 4, "fps": 8})
    graph = fake.prompts[0]
    assert {"save_webm", "save_webp"}.isdisjoint(graph) and graph["save_mp4"]["class_type"] == "SaveVideo"
    assert graph["video"]["inputs"]["fps"] == 8.0 and graph["save_mp4"]["inputs"]["video"] == ["video", 0]
    assert [(a.content_type, a.extension) for a in generation.artifacts] == [("video/mp4", "mp4")]


@pytest.mark.parametrize("fmt", ["gif"])
def test_a_video_format_the_graph_cannot_make_names_the_ones_it_can(backend, fake, fmt: str) -> None:
    with pytest.raises(UnsupportedJob, match=r"saves mp4, webm, webp; ask for one of those"):
        run(backend, kind="txt2vid", video={"frames": 4, "fps": 8}, output={"format": fmt})
    assert fake.prompts == []


def test_txt2vid_keeps_only_the_webm_saver_and_fills_frames_and_fps(backend, fake) -> None:
    generation, _ = run(backend, kind="txt2vid", video={"frames": 6, "fps": 12}, output={"format": "webm"})
    graph = fake.prompts[0]
    assert {"save_webp", "save_mp4", "video"}.isdisjoint(graph) and graph["save_webm"]["inputs"]["fps"] == 12.0
    assert graph["latent"]["inputs"]["batch_size"] == 6
    assert [(a.content_type, a.extension) for a in generation.artifacts] == [("video/webm", "webm")]


def test_img2img_resizes_and_uploads_the_init_image_then_loads_it(backend, fake) -> None:
    init = base64.b64encode(_png(100, 50)).decode()
    generation, _ = run(backend, kind="img2img", init_image={"base64": init}, width=64, height=128,
                        denoising_strength=0.3)  # fmt: skip
    ((name, data),) = fake.uploads
    assert Image.open(io.BytesIO(data)).size == (64, 128)
    graph = fake.prompts[0]
    assert graph["init"]["inputs"]["image"] == f"sdagent/{name}"
    assert graph["sampler"]["inputs"]["denoise"] == 0.3 and generation.info["denoising_strength"] == 0.3


def test_a_job_value_the_template_has_no_place_for_is_refused_before_uploading(backend, fake) -> None:
    init = base64.b64encode(_png()).decode()
    with pytest.raises(UnsupportedJob, match=r"img2img\.v1 has no place for batch_size"):
        run(backend, kind="img2img", init_image={"base64": init}, batch_size=2)
    with pytest.raises(UnsupportedJob, match="no place for batch_size"):  # frames are the video's batch
        run(backend, kind="txt2vid", video={"frames": 4, "fps": 8}, output={"format": "webm"}, batch_size=2)
    assert fake.uploads == [] and fake.prompts == []


@pytest.mark.parametrize(
    ("sampler", "name", "scheduler"),
    [("euler_ancestral", "euler_ancestral", "normal"), ("Euler a", "euler_ancestral", "normal"),
     ("DPM++ 2M Karras", "dpmpp_2m", "karras")],
)  # fmt: skip
def test_samplers_take_comfyui_or_a1111_names(backend, fake, sampler: str, name: str, scheduler: str) -> None:
    generation, _ = run(backend, sampler=sampler)
    inputs = fake.prompts[0]["sampler"]["inputs"]
    assert (inputs["sampler_name"], inputs["scheduler"]) == (name, scheduler)
    assert (generation.info["sampler"], generation.info["scheduler"]) == (name, scheduler)


def test_an_unknown_sampler_is_unsupported_and_lists_comfyuis(backend) -> None:
    with pytest.raises(UnsupportedJob, match="euler, euler_ancestral, dpmpp_2m"):
        run(backend, sampler="Restart")


def test_a_broken_override_template_fails_construction_with_the_config_key(tmp_path) -> None:
    (tmp_path / "txt2img.v1.json").write_text(json.dumps({"name": "txt2img", "version": 1, "graph": {}}))
    with pytest.raises(ConfigError, match=r"^backend\.workflows_dir: .*txt2img\.v1\.json"):
        ComfyUIBackend("http://comfy.test", workflows_dir=tmp_path)


def test_an_override_template_lacking_a_required_parameter_fails_construction(tmp_path) -> None:
    from importlib import resources

    document = json.loads(resources.files("sdagent.backends.workflows").joinpath("txt2img.v1.json").read_text())
    del document["parameters"]["steps"]
    (tmp_path / "txt2img.v1.json").write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=r"needs parameters \['steps'\]"):
        ComfyUIBackend("http://comfy.test", workflows_dir=tmp_path)


# --- workflow jobs -------------------------------------------------------------------------------------


def test_a_workflow_runs_as_given_but_for_the_jobs_model(backend, fake) -> None:
    generation, _ = run(backend, kind="workflow", workflow=_graph())
    expected = _graph()
    expected["4"]["inputs"]["ckpt_name"] = "sd15.safetensors"
    assert fake.prompts == [expected]
    assert generation.info["seeds"] == [5] and generation.artifacts[0].seed == 5
    assert generation.info["template"] == "workflow"


def test_explicit_job_fields_are_written_into_their_nodes(backend, fake) -> None:
    run(backend, kind="workflow", workflow=_graph(), seed=77, steps=3, cfg_scale=2.0, sampler="DPM++ 2M Karras",
        prompt="job prompt", negative_prompt="job negative", width=128, height=64, batch_size=2)  # fmt: skip
    graph = fake.prompts[0]
    assert {key: graph["3"]["inputs"][key] for key in ("seed", "steps", "cfg", "sampler_name", "scheduler")} == {
        "seed": 77, "steps": 3, "cfg": 2.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"}  # fmt: skip
    assert graph["3"]["inputs"]["denoise"] == 1.0  # not given: the graph's
    assert (graph["6"]["inputs"]["text"], graph["7"]["inputs"]["text"]) == ("job prompt", "job negative")
    assert graph["5"]["inputs"] == {"width": 128, "height": 64, "batch_size": 2}


def test_video_fields_go_to_the_latent_batch_and_the_animation_saver(backend, fake) -> None:
    graph = _graph(
        **{
            "9": {
                "class_type": "SaveWEBM",
                "inputs": {"images": ["8", 0], "filename_prefix": "v", "codec": "vp9", "fps": 24.0, "crf": 32.0},
            }
        }
    )
    run(backend, kind="workflow", workflow=graph, video={"frames": 9, "fps": 6})
    sent = fake.prompts[0]
    assert sent["5"]["inputs"]["batch_size"] == 9 and sent["9"]["inputs"]["fps"] == 6.0


def test_an_init_image_goes_to_the_workflows_one_load_image(backend, fake) -> None:
    graph = _graph(**{"10": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}})
    run(backend, kind="workflow", workflow=graph, init_image={"base64": base64.b64encode(_png(30, 20)).decode()})
    ((name, data),) = fake.uploads
    assert Image.open(io.BytesIO(data)).size == (30, 20)  # a workflow's graph decides sizes itself
    assert fake.prompts[0]["10"]["inputs"]["image"] == f"sdagent/{name}"


@pytest.mark.parametrize(
    ("graph", "fields", "message"),
    [
        (_graph(**{"5": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}), {"width": 128},
         "no EmptyLatentImage is linked directly"),
        ({k: v for k, v in _graph().items() if k != "4"}, {}, "0 CheckpointLoaderSimple"),
        (_graph(**{"6": {"class_type": "CLIPTextEncode", "inputs": {"text": ["11", 0], "clip": ["4", 1]}},
                   "11": {"class_type": "PrimitiveString", "inputs": {"value": "x"}}}), {"prompt": "p"},
         r"6\.text \(CLIPTextEncode\) is a link"),
        (_graph(**{"7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}}}),
         {"negative_prompt": "n"}, "no CLIPTextEncode is linked directly to a sampler's negative"),
        (_graph(), {"init_image": {"base64": "aGVsbG8="}}, "exactly one LoadImage node, the graph has 0"),
        (_graph(), {"video": {"frames": 4, "fps": 8}}, "video.fps has no place"),
        (_graph(), {"batch_size": 2, "video": {"frames": 4, "fps": 8}}, "give one"),
    ],
)  # fmt: skip
def test_a_job_field_the_workflow_has_no_place_for_is_unsupported(backend, fake, graph, fields, message) -> None:
    with pytest.raises(UnsupportedJob, match=message):
        run(backend, kind="workflow", workflow=graph, **fields)
    assert fake.prompts == [] and fake.uploads == []


def test_with_several_checkpoint_loaders_the_jobs_model_must_be_one_of_theirs(backend, fake) -> None:
    two = _graph(**{"12": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}}})
    run(backend, kind="workflow", workflow=two)
    assert fake.prompts[0]["4"]["inputs"]["ckpt_name"] == "other.safetensors"  # the graph decides the rest
    with pytest.raises(UnsupportedJob, match="2 CheckpointLoaderSimple"):
        run(backend, kind="workflow", workflow=two, model="styles/dreamy.safetensors")


def test_an_explicit_format_converts_a_workflows_stills(backend) -> None:
    generation, _ = run(backend, kind="workflow", workflow=_graph(), output={"format": "jpeg"})
    assert generation.artifacts[0].extension == "jpeg" and generation.artifacts[0].data.startswith(b"\xff\xd8")


# --- answers -> errors -------------------------------------------------------------------------------


def test_a_5xx_on_prompt_is_transient(backend, fake) -> None:
    fake.prompt_status = 500
    with pytest.raises(BackendUnavailable, match="POST /prompt: ComfyUI answered 500"):
        run(backend)


def test_an_unreachable_comfyui_is_transient_and_health_says_why() -> None:
    backend = ComfyUIBackend("http://127.0.0.1:9", request_timeout_s=1)
    with pytest.raises(BackendUnavailable, match="ConnectError"):
        backend.switch_model("sd15.safetensors")
    health = backend.health()
    assert not health.ready and health.detail.startswith("GET /system_stats: ConnectError")


def test_rejections_map_to_unsupported_model_not_found_or_a_summary() -> None:
    missing = {"error": {"type": "missing_node_type", "message": "Node 'Foo' not found."}, "node_errors": {}}
    old_missing = {"error": {"type": "invalid_prompt", "message": "Cannot execute because node Foo does not exist."}}
    assert isinstance(rejected(missing), UnsupportedJob) and isinstance(rejected(old_missing), UnsupportedJob)
    reason = {"type": "value_not_in_list", "message": "Value not in list", "details": "ckpt_name: 'x' not in [...]"}
    ckpt = {"error": {"message": "Prompt outputs failed validation"},
            "node_errors": {"4": {"class_type": "CheckpointLoaderSimple", "errors": [reason]}}}  # fmt: skip
    assert isinstance(rejected(ckpt), ModelNotFound)
    steps = {"type": "value_smaller_than_min", "message": "Value 0 smaller than min of 1", "details": "steps"}
    bad = {"error": {"message": "Prompt outputs failed validation"},
           "node_errors": {"3": {"class_type": "KSampler", "errors": [steps]}}}  # fmt: skip
    error = rejected(bad)
    assert type(error) is BackendError
    assert str(error) == (
        "ComfyUI rejected the graph: Prompt outputs failed validation: "
        "node 3 (KSampler): Value 0 smaller than min of 1: steps"
    )


def test_an_out_of_memory_execution_error_says_so() -> None:
    oom = {"node_id": "3", "node_type": "KSampler", "exception_type": "torch.cuda.OutOfMemoryError",
           "exception_message": "Allocation on device\nThis error means you ran out of memory."}  # fmt: skip
    assert "ran out of GPU memory at node 3 (KSampler)" in str(execution_error(oom))
    other = {"node_id": "9", "node_type": "X", "exception_type": "ValueError", "exception_message": "bad\nmore"}
    assert str(execution_error(other)) == "ComfyUI failed at node 9 (X): ValueError: bad"


def test_the_watch_keeps_to_its_prompt_and_times_its_nodes() -> None:
    watch = PromptWatch("p1")

    def feed(kind: str, now: float, **data: Any):
        return watch.on_message(json.dumps({"type": kind, "data": data}), now)

    feed("executing", 0.0, node="4", prompt_id="p1")
    assert feed("progress", 0.1, value=1, max=3, prompt_id="other") is None  # another client's prompt
    feed("executing", 0.5, node="3", prompt_id="p1")
    assert feed("progress", 1.0, value=1, max=3, prompt_id="p1") == (1, 3)
    assert feed("progress", 1.1, value=1, max=3, prompt_id="p1") is None  # repeated
    assert watch.on_message(b"\x00\x00\x00\x01preview", 1.2) is None
    feed("executing", 2.0, node=None)  # no prompt_id: not a verdict on ours
    assert not watch.ended
    feed("executing", 2.5, node=None, prompt_id="p1")
    assert watch.ended and watch.node_ms == {"4": 500.0, "3": 1500.0}


def test_a_workflow_job_sent_over_the_wire_keeps_its_graphs_settings(backend, fake) -> None:
    """Client, gateway and requeue send ``Job.to_bytes()``: defaults the caller left out stay out."""
    sent = Job(model="sd15.safetensors", kind="workflow", workflow=_graph())
    received = parse_job(sent.to_bytes(), Limits())
    backend.generate(received, lambda step, total: None, threading.Event())
    expected = _graph()
    expected["4"]["inputs"]["ckpt_name"] = "sd15.safetensors"
    assert fake.prompts == [expected]
    assert received.job_id == sent.job_id
