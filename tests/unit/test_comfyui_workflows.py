"""The versioned ComfyUI workflow templates: the built-in files, filling, overriding, checking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdagent.backends.workflows import BUILTIN, TemplateError, load_template, parse_template

BUILTINS = [("txt2img", 1), ("img2img", 1), ("txt2vid", 1)]


def _builtin_text(name: str, version: int) -> str:
    from importlib import resources

    return resources.files("sdagent.backends.workflows").joinpath(f"{name}.v{version}.json").read_text()


@pytest.mark.parametrize(("name", "version"), BUILTINS)
def test_every_builtin_template_parses_and_links_only_to_its_own_nodes(name: str, version: int) -> None:
    template = load_template(name, version)
    assert (template.name, template.version, template.source) == (name, version, BUILTIN)
    assert template.ref == f"{name}.v{version}" and template.description
    for targets in template.parameters.values():
        for target in targets:
            assert target.input in template.graph[target.node]["inputs"]


def test_fill_writes_every_target_and_keeps_only_the_chosen_saver() -> None:
    template = load_template("txt2vid", 1)
    graph = template.fill({"fps": 12.0, "frames": 5, "seed": 9}, "webm")
    assert "save_webp" not in graph and graph["save_webm"]["inputs"]["fps"] == 12.0
    assert graph["latent"]["inputs"]["batch_size"] == 5 and graph["sampler"]["inputs"]["seed"] == 9
    again = template.fill({}, "webp")
    assert "save_webm" not in again and again["sampler"]["inputs"]["seed"] == 0  # the template is untouched


def test_fill_refuses_an_undeclared_parameter_and_an_unknown_format() -> None:
    template = load_template("img2img", 1)
    with pytest.raises(TemplateError, match="declares no parameter batch_size"):
        template.fill({"batch_size": 2}, "png")
    with pytest.raises(TemplateError, match="makes no webm"):
        template.fill({}, "webm")


def test_a_file_in_the_override_dir_replaces_the_builtin_of_the_same_name(tmp_path: Path) -> None:
    document = json.loads(_builtin_text("txt2img", 1))
    document["graph"]["sampler"]["inputs"]["scheduler"] = "karras"
    (tmp_path / "txt2img.v1.json").write_text(json.dumps(document))
    overridden = load_template("txt2img", 1, tmp_path)
    assert overridden.source == str(tmp_path / "txt2img.v1.json")
    assert overridden.fill({}, "png")["sampler"]["inputs"]["scheduler"] == "karras"
    assert load_template("img2img", 1, tmp_path).source == BUILTIN  # no file of that name: built in


def test_a_missing_template_names_the_file() -> None:
    with pytest.raises(TemplateError, match=r"no template txt2img\.v9\.json"):
        load_template("txt2img", 9)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "the file name says otherwise"),
        ({"graph": {}}, "graph must be a non-empty"),
        ({"outputs": {"png": "nowhere"}}, "names node 'nowhere'"),
        ({"parameters": {"seed": "sampler.nothing"}}, "is not a literal input"),
        ({"parameters": {"seed": "ghost.seed"}}, "names no node"),
        ({"parameters": {"seed": "sampler.model"}}, "is not a literal input"),  # a link: filling it cuts the graph
        ({"parameters": {"seed": []}}, "non-empty list"),
    ],
)
def test_an_inconsistent_template_is_refused_with_its_file_name(change: dict, message: str) -> None:
    document = json.loads(_builtin_text("txt2img", 1))
    document.update(change)
    with pytest.raises(TemplateError, match=message) as error:
        parse_template(json.dumps(document), file_name="txt2img.v1.json", source="/etc/x/txt2img.v1.json")
    assert str(error.value).startswith("/etc/x/txt2img.v1.json: ")


def test_a_link_to_a_missing_node_and_bad_json_are_refused() -> None:
    document = json.loads(_builtin_text("txt2img", 1))
    document["graph"]["decode"]["inputs"]["samples"] = ["gone", 0]
    with pytest.raises(TemplateError, match="links to a node the graph does not have"):
        parse_template(json.dumps(document), file_name="txt2img.v1.json", source=BUILTIN)
    with pytest.raises(TemplateError, match="not JSON"):
        parse_template("{", file_name="txt2img.v1.json", source=BUILTIN)
