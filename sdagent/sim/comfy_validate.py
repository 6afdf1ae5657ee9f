"""ComfyUI's prompt validation (``execution.validate_prompt``): error types, messages and shapes.

Like the real one it converts literal inputs in place (``"20"`` becomes ``20`` for an INT), keeps
outputs that validate and drops the others (reporting them in ``node_errors``), and refuses the
prompt only when no output is left.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

from sdagent.errors import SdagentError
from sdagent.sim.catalog import Catalog
from sdagent.sim.comfy_nodes import Dirs, Node

Result = tuple[bool, list[dict[str, Any]], str]
_CONVERTERS = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


class _BrokenGraph(SdagentError):
    """A link to a missing node or slot, or a cycle: the real validator fails with a Python error here."""


@dataclass
class Validation:
    ok: bool
    error: dict[str, Any] | None = None
    outputs: list[str] = field(default_factory=list)
    node_errors: dict[str, Any] = field(default_factory=dict)


def validate_prompt(prompt: Any, nodes: dict[str, Node], catalog: Catalog, dirs: Dirs) -> Validation:
    """Validate an API-format graph ``{node_id: {class_type, inputs}}``."""
    if not isinstance(prompt, dict):
        return Validation(False, _error("invalid_prompt", "Cannot execute because the prompt is not an object.", ""))
    outputs = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            message = "Cannot execute because a node is missing the class_type property."
            return Validation(False, _error("invalid_prompt", message, f"Node ID '#{node_id}'"))
        node_class = nodes.get(node["class_type"])
        if node_class is None:
            message = f"Cannot execute because node {node['class_type']} does not exist."
            return Validation(False, _error("invalid_prompt", message, f"Node ID '#{node_id}'"))
        if node_class.output_node:
            outputs.append(node_id)
    if not outputs:
        return Validation(False, _error("prompt_no_outputs", "Prompt has no outputs", ""))
    return _validate_outputs(_Validator(prompt, nodes, catalog, dirs), outputs)


def _validate_outputs(validator: _Validator, outputs: list[str]) -> Validation:
    good: list[str] = []
    failures: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    for output in outputs:
        try:
            valid, reasons, _ = validator.validate(output)
        except _BrokenGraph as exc:
            valid = False
            reasons = [_exception_reason("exception_during_validation", "Exception when validating node", exc, {})]
            validator.validated[output] = (False, reasons, output)
        if valid:
            good.append(output)
            continue
        failures.append((output, reasons))
        for node_id, (node_valid, node_reasons, _) in validator.validated.items():
            # A node downstream of a bad one is invalid without reasons of its own: not reported.
            if not node_valid and node_reasons:
                entry = node_errors.setdefault(
                    node_id,
                    {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": validator.prompt[node_id]["class_type"],
                    },
                )
                entry["dependent_outputs"].append(output)
    if not good:
        details = "\n".join(
            f"{reason['message']}: {reason['details']}" for _, reasons in failures for reason in reasons
        )
        error = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
        return Validation(False, error, [], node_errors)
    return Validation(True, None, good, node_errors)


@dataclass
class _Validator:
    prompt: dict[str, Any]
    nodes: dict[str, Node]
    catalog: Catalog
    dirs: Dirs
    validated: dict[str, Result] = field(default_factory=dict)
    _visiting: set[str] = field(default_factory=set)

    def validate(self, node_id: str) -> Result:
        if node_id in self.validated:
            return self.validated[node_id]
        if node_id in self._visiting:
            raise _BrokenGraph(f"Dependency cycle detected at node {node_id}") from RecursionError()
        self._visiting.add(node_id)
        try:
            result = self._validate_node(node_id)
        finally:
            self._visiting.discard(node_id)
        self.validated[node_id] = result
        return result

    def _validate_node(self, node_id: str) -> Result:
        node = self.prompt[node_id]
        inputs = node.setdefault("inputs", {})
        node_class = self.nodes[node["class_type"]]
        types = node_class.input_types(self.catalog, self.dirs)
        errors: list[dict[str, Any]] = []
        valid = True
        for category in ("required", "optional"):
            for name, spec in types.get(category, {}).items():
                if name not in inputs:
                    if category == "required":
                        errors.append(
                            _reason("required_input_missing", "Required input is missing", name, {"input_name": name})
                        )
                    continue
                if isinstance(inputs[name], list):
                    linked_ok, reason = self._check_link(inputs[name], name, spec)
                    valid = valid and linked_ok
                else:
                    reason = self._check_value(inputs, name, spec, node_class)
                if reason is not None:
                    errors.append(reason)
        errors += self._custom_validation(node_class, inputs)
        return (not errors and valid, errors, node_id)

    def _check_link(self, link: list[Any], name: str, spec: tuple[Any, ...]) -> tuple[bool, dict[str, Any] | None]:
        """(upstream valid, a reason for this input or None)."""
        info = _input_info(spec)
        if len(link) != 2:
            message = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
            return True, _reason(
                "bad_linked_input", message, name, {"input_name": name, "input_config": info, "received_value": link}
            )
        source_id, slot = link
        try:
            source_class = self.nodes[self.prompt[source_id]["class_type"]]
            received = source_class.return_types[slot]
        except KeyError as exc:
            raise _BrokenGraph(repr(str(exc.args[0]))) from exc
        except (IndexError, TypeError) as exc:
            raise _BrokenGraph(str(exc)) from exc
        if received != spec[0]:
            details = f"{name}, received_type({received}) mismatch input_type({spec[0]})"
            extra = {"input_name": name, "input_config": info, "received_type": received, "linked_node": link}
            return True, _reason("return_type_mismatch", "Return type mismatch between linked nodes", details, extra)
        try:
            return self.validate(str(source_id))[0], None
        except _BrokenGraph as exc:
            # execution.py catches what validating an input's node raised and blames that node.
            extra = {"input_name": name, "input_config": info, "exception_message": str(exc), "linked_node": link}
            reasons = [_exception_reason("exception_during_inner_validation", "Exception when validating inner node",
                                         exc, extra)]  # fmt: skip
            self.validated[str(source_id)] = (False, reasons, str(source_id))
            return False, None

    def _check_value(
        self, inputs: dict[str, Any], name: str, spec: tuple[Any, ...], node_class: Node
    ) -> dict[str, Any] | None:
        input_type, info = spec[0], _input_info(spec)
        extra_info = info[1]
        value = inputs[name]
        if isinstance(value, dict) and "__value__" in value:  # a list-valued widget, wrapped
            value = inputs[name] = value["__value__"]
        converter = _CONVERTERS.get(input_type) if isinstance(input_type, str) else None
        if converter is not None:
            try:
                value = inputs[name] = converter(value)
            except (TypeError, ValueError) as exc:
                extra = {
                    "input_name": name,
                    "input_config": info,
                    "received_value": value,
                    "exception_message": str(exc),
                }
                return _reason(
                    "invalid_input_type",
                    f"Failed to convert an input value to a {input_type} value",
                    f"{name}, {value}, {exc}",
                    extra,
                )
        if name in node_class.validated_inputs:
            return None  # VALIDATE_INPUTS decides about this input
        extra = {"input_name": name, "input_config": info, "received_value": value}
        if "min" in extra_info and value < extra_info["min"]:
            return _reason(
                "value_smaller_than_min", f"Value {value} smaller than min of {extra_info['min']}", name, extra
            )
        if "max" in extra_info and value > extra_info["max"]:
            return _reason(
                "value_bigger_than_max", f"Value {value} bigger than max of {extra_info['max']}", name, extra
            )
        if isinstance(input_type, list) and value not in input_type:
            # Long lists (scanned model files) are not sent back.
            listing = f"(list of length {len(input_type)})" if len(input_type) > 20 else str(input_type)
            if len(input_type) > 20:
                extra["input_config"] = None
            return _reason("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {listing}", extra)
        return None

    def _custom_validation(self, node_class: Node, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        if not node_class.validated_inputs:
            return []
        verdict = node_class.validate({name: inputs.get(name) for name in node_class.validated_inputs}, self.dirs)
        if verdict is True:
            return []
        reasons = []
        for name in node_class.validated_inputs:
            details = name if verdict is False else f"{name} - {verdict}"
            reasons.append(
                _reason("custom_validation_failed", "Custom validation failed for node", details, {"input_name": name})
            )
        return reasons


def _input_info(spec: tuple[Any, ...]) -> tuple[Any, dict[str, Any]]:
    return (spec[0], spec[1] if len(spec) > 1 else {})


def _exception_reason(kind: str, message: str, exc: _BrokenGraph, extra_info: dict[str, Any]) -> dict[str, Any]:
    """A Python error met while validating: its type (the cause's) and traceback, as execution.py lists them."""
    extra = {**extra_info, "exception_type": exc.__cause__.__class__.__name__,
             "traceback": traceback.format_tb(exc.__traceback__)}  # fmt: skip
    return _reason(kind, message, str(exc), extra)


def _reason(kind: str, message: str, details: str, extra_info: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


def _error(kind: str, message: str, details: str) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}
