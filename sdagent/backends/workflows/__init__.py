"""Versioned ComfyUI workflow templates: API-format graphs with named parameters.

A template is one JSON file named ``<name>.v<version>.json`` (``txt2img.v1.json``) holding::

    {
      "name": "txt2img", "version": 1, "description": "...",
      "parameters": {"seed": "sampler.seed", "fps": ["save_webm.fps", "save_webp.fps"], ...},
      "outputs": {"png": "save"},
      "graph": {"sampler": {"class_type": "KSampler", "inputs": {"seed": 0, ...}}, ...}
    }

``graph`` is ComfyUI's API format (``{node_id: {class_type, inputs}}``, a link is
``[node_id, output_slot]``); node ids are names, so a parameter reads as ``node.input``. Each
parameter names the literal inputs it fills (one or a list), and ``outputs`` maps an output format
to the saving node that makes it; :meth:`Template.fill` keeps only the chosen saver.

The built-in templates ship in this package. A deployment overrides one by putting a file of the
same name in ``workflows_dir`` (``[backend] workflows_dir``); the backend pins each template's
version, so changing the graph the fleet runs is a reviewed change of the pinned version or an
explicit override, and every result names the template that made it.

This module only knows the file format; which parameters a job kind needs is the backend's business.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sdagent.errors import SdagentError

BUILTIN = "builtin"  # the ``source`` of a template shipped in this package

_FILE_NAME = re.compile(r"^(?P<name>[a-z0-9_-]+)\.v(?P<version>[1-9][0-9]*)\.json$")


class TemplateError(SdagentError, ValueError):
    """Raised when a template file is missing, not JSON, or inconsistent with its own graph."""


@dataclass(frozen=True)
class Target:
    """One literal input a parameter fills: ``node.input``."""

    node: str
    input: str

    def __str__(self) -> str:
        return f"{self.node}.{self.input}"


@dataclass(frozen=True)
class Template:
    """A parsed, checked template; :meth:`fill` makes a fresh graph from it."""

    name: str
    version: int
    description: str
    parameters: Mapping[str, tuple[Target, ...]]
    outputs: Mapping[str, str]  # output format -> the node that saves it
    graph: Mapping[str, Any]
    source: str  # BUILTIN, or the override file's path

    @property
    def file_name(self) -> str:
        return f"{self.name}.v{self.version}.json"

    @property
    def ref(self) -> str:
        """How results name it: ``txt2img.v1``."""
        return f"{self.name}.v{self.version}"

    def accepts(self, parameter: str) -> bool:
        return parameter in self.parameters

    def fill(self, values: Mapping[str, Any], output_format: str) -> dict[str, Any]:
        """A new API-format graph with ``values`` filled in and only ``output_format``'s saver kept.

        Raises TemplateError for a parameter the template does not declare or a format it does
        not make: the caller checks :meth:`accepts` and :attr:`outputs` first to say why to the job.
        """
        undeclared = sorted(set(values) - set(self.parameters))
        if undeclared:
            raise TemplateError(f"{self.file_name} declares no parameter {', '.join(undeclared)}")
        if output_format not in self.outputs:
            raise TemplateError(f"{self.file_name} makes no {output_format} (it makes {', '.join(self.outputs)})")
        graph = copy.deepcopy(dict(self.graph))
        for parameter, value in values.items():
            for target in self.parameters[parameter]:
                graph[target.node]["inputs"][target.input] = value
        chosen = self.outputs[output_format]
        _remove(graph, set(self.outputs.values()) - {chosen})
        return graph


def _remove(graph: dict[str, Any], nodes: set[str]) -> None:
    """Delete ``nodes``, then whatever fed only them (a dropped saver's encoder node)."""
    while nodes:
        feeders = {link[0] for node in nodes for link in _links(graph[node])}
        for node in nodes:
            del graph[node]
        used = {link[0] for spec in graph.values() for link in _links(spec)}
        nodes = {node for node in feeders if node in graph and node not in used} - set(nodes)


def _links(spec: Mapping[str, Any]) -> list[list[Any]]:
    """A node's links to other nodes: inputs of the form ``[node_id, output_slot]``."""
    return [value for value in spec.get("inputs", {}).values()
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)]  # fmt: skip


def load_template(name: str, version: int, override_dir: Path | None = None) -> Template:
    """The template ``<name>.v<version>.json``: from ``override_dir`` when it has that file, else built in."""
    file_name = f"{name}.v{version}.json"
    if override_dir is not None:
        path = Path(override_dir) / file_name
        if path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise TemplateError(f"cannot read {path}: {exc}") from None
            return parse_template(text, file_name=file_name, source=str(path))
    try:
        text = resources.files(__name__).joinpath(file_name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(f"no template {file_name} (built in or in {override_dir})") from None
    return parse_template(text, file_name=file_name, source=BUILTIN)


def parse_template(text: str, *, file_name: str, source: str) -> Template:
    """Parse and check one template; every problem is reported with the file's name."""

    def fail(message: str) -> TemplateError:
        return TemplateError(f"{source if source != BUILTIN else file_name}: {message}")

    try:
        document = json.loads(text)
    except ValueError as exc:
        raise fail(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise fail("a template is a JSON object")
    match = _FILE_NAME.match(file_name)
    if match is None:
        raise fail("template files are named <name>.v<version>.json")
    name, version = document.get("name"), document.get("version")
    if name != match["name"] or version != int(match["version"]):
        raise fail(f"name and version say {name}.v{version}, the file name says otherwise")
    graph = document.get("graph")
    if not isinstance(graph, dict) or not graph:
        raise fail("graph must be a non-empty API-format object {node_id: {class_type, inputs}}")
    for node_id, node in graph.items():
        if (
            not isinstance(node, dict)
            or not isinstance(node.get("class_type"), str)
            or not isinstance(node.get("inputs"), dict)
        ):
            raise fail(f"node {node_id!r} needs a class_type string and an inputs object")
        for input_name, value in node["inputs"].items():
            if isinstance(value, list) and (len(value) != 2 or str(value[0]) not in graph):
                raise fail(f"{node_id}.{input_name} links to a node the graph does not have: {value}")
    parameters = _parse_parameters(document.get("parameters"), graph, fail)
    outputs = document.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        raise fail("outputs must map at least one output format to its saving node")
    for fmt, node in outputs.items():
        if node not in graph:
            raise fail(f"output {fmt} names node {node!r}, which the graph does not have")
    description = document.get("description", "")
    return Template(
        name=name,
        version=version,
        description=description if isinstance(description, str) else "",
        parameters=parameters,
        outputs=dict(outputs),
        graph=graph,
        source=source,
    )


def _parse_parameters(raw: Any, graph: dict[str, Any], fail: Any) -> dict[str, tuple[Target, ...]]:
    if not isinstance(raw, dict):
        raise fail("parameters must map each parameter to 'node.input' or a list of them")
    parameters: dict[str, tuple[Target, ...]] = {}
    for parameter, spec in raw.items():
        specs = [spec] if isinstance(spec, str) else spec
        if not isinstance(specs, list) or not specs or not all(isinstance(item, str) for item in specs):
            raise fail(f"parameter {parameter}: give 'node.input' or a non-empty list of them")
        targets = []
        for item in specs:
            node, dot, input_name = item.rpartition(".")  # input names have no dot; node ids may
            if not dot or node not in graph:
                raise fail(f"parameter {parameter}: {item!r} names no node of the graph")
            value = graph[node]["inputs"].get(input_name, _MISSING)
            if value is _MISSING or isinstance(value, list):
                # A placeholder literal must be there: filling a link would silently cut the graph.
                raise fail(f"parameter {parameter}: {item} is not a literal input of the graph")
            targets.append(Target(node, input_name))
        parameters[parameter] = tuple(targets)
    return parameters


_MISSING = object()
