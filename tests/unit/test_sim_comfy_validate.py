"""ComfyUI prompt validation as the simulator does it: the real error types and shapes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from sdagent.sim.catalog import Catalog
from sdagent.sim.comfy_nodes import Dirs, registry
from sdagent.sim.comfy_validate import Validation, validate_prompt

GRAPH: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 1,
            "steps": 20,
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
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


@pytest.fixture
def validate(tmp_path: Path):  # type: ignore[no-untyped-def]
    catalog = Catalog({"sd15.safetensors": 2048})
    dirs = Dirs(tmp_path)
    dirs.create()

    def run(changes: dict[str, Any] | None = None, prompt: Any = None) -> Validation:
        graph = copy.deepcopy(GRAPH) if prompt is None else prompt
        for node_id, inputs in (changes or {}).items():
            if inputs is None:
                del graph[node_id]
            else:
                graph[node_id]["inputs"].update(inputs)
        return validate_prompt(graph, registry(), catalog, dirs)

    return run


def test_a_standard_txt2img_graph_validates_and_literals_are_converted(validate) -> None:  # type: ignore[no-untyped-def]
    graph = copy.deepcopy(GRAPH)
    graph["3"]["inputs"]["steps"] = "25"
    result = validate(prompt=graph)
    assert result.ok and result.outputs == ["9"] and result.node_errors == {}
    assert graph["3"]["inputs"]["steps"] == 25


def test_unknown_checkpoint_is_value_not_in_list(validate) -> None:  # type: ignore[no-untyped-def]
    result = validate({"4": {"ckpt_name": "nope.safetensors"}})
    assert not result.ok
    assert result.error["type"] == "prompt_outputs_failed_validation"
    reason = result.node_errors["4"]["errors"][0]
    assert reason["type"] == "value_not_in_list"
    assert reason["details"] == "ckpt_name: 'nope.safetensors' not in ['sd15.safetensors']"
    assert result.node_errors["4"]["dependent_outputs"] == ["9"]
    assert result.node_errors["4"]["class_type"] == "CheckpointLoaderSimple"
    assert "3" not in result.node_errors  # downstream of a bad node: invalid but without reasons


@pytest.mark.parametrize(
    ("changes", "node", "kind"),
    [
        ({"3": {"steps": 0}}, "3", "value_smaller_than_min"),
        ({"5": {"batch_size": 5000}}, "5", "value_bigger_than_max"),
        ({"3": {"cfg": "lots"}}, "3", "invalid_input_type"),
        ({"3": {"sampler_name": "bogus"}}, "3", "value_not_in_list"),
        ({"3": {"model": ["6", 0]}}, "3", "return_type_mismatch"),
        ({"3": {"model": ["4"]}}, "3", "bad_linked_input"),
    ],
)
def test_input_errors_have_comfyui_types(validate, changes, node, kind) -> None:  # type: ignore[no-untyped-def]
    result = validate(changes)
    assert not result.ok
    assert result.node_errors[node]["errors"][0]["type"] == kind


def test_missing_required_input(validate) -> None:  # type: ignore[no-untyped-def]
    graph = copy.deepcopy(GRAPH)
    del graph["3"]["inputs"]["seed"]
    result = validate(prompt=graph)
    assert result.node_errors["3"]["errors"][0] == {
        "type": "required_input_missing", "message": "Required input is missing", "details": "seed",
        "extra_info": {"input_name": "seed"},
    }  # fmt: skip


def test_graph_level_errors(validate) -> None:  # type: ignore[no-untyped-def]
    assert validate({"9": None}).error["type"] == "prompt_no_outputs"
    unknown = validate(prompt={"1": {"class_type": "Nope", "inputs": {}}})
    assert unknown.error["type"] == "invalid_prompt" and "node Nope does not exist" in unknown.error["message"]
    assert validate(prompt={"1": {"inputs": {}}}).error["details"] == "Node ID '#1'"


def test_link_to_a_missing_node_is_blamed_on_the_linking_node(validate) -> None:  # type: ignore[no-untyped-def]
    # As execution.py does: the KeyError escapes node 8's validation and is caught by node 9's
    # check of its input, which blames node 8; at the output itself it is an outer exception.
    result = validate({"8": {"samples": ["99", 0]}})
    assert not result.ok and list(result.node_errors) == ["8"]
    reason = result.node_errors["8"]["errors"][0]
    assert (reason["type"], reason["extra_info"]["input_name"], reason["extra_info"]["linked_node"]) == (
        "exception_during_inner_validation", "images", ["8", 0],
    )  # fmt: skip
    assert reason["extra_info"]["exception_type"] == "KeyError" and reason["extra_info"]["traceback"]
    result = validate({"9": {"images": ["99", 0]}})
    assert result.node_errors["9"]["errors"][0]["type"] == "exception_during_validation"


def test_load_image_checks_the_file_exists(validate, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    graph = copy.deepcopy(GRAPH)
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "missing.png"}}
    graph["11"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["10", 0]}}
    result = validate(prompt=graph)
    assert result.ok and result.outputs == ["9"]  # the other output still runs
    assert result.node_errors["10"]["errors"][0]["type"] == "custom_validation_failed"
    assert result.node_errors["10"]["errors"][0]["details"] == "image - Invalid image file: missing.png"
