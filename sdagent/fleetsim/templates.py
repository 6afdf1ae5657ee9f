"""CloudFormation templates as data: YAML with the short-form tags, and parameters resolved."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags (!Ref, !Sub, !If...) as their long forms."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        return {name: loader.construct_scalar(node)}
    if isinstance(node, yaml.SequenceNode):
        return {name: loader.construct_sequence(node, deep=True)}
    return {name: loader.construct_mapping(node, deep=True)}


_CfnLoader.add_multi_constructor("!", _intrinsic)


class Template:
    """One template, its parameters' defaults overridden by ``parameters``."""

    def __init__(self, path: Path, parameters: Mapping[str, Any] | None = None) -> None:
        self.path = path
        self.body: dict[str, Any] = yaml.load(path.read_text(), Loader=_CfnLoader)  # noqa: S506 (SafeLoader subclass)
        declared = self.body.get("Parameters", {})
        unknown = sorted(set(parameters or {}) - set(declared))
        if unknown:
            raise ValueError(f"{path.name} has no parameter {', '.join(unknown)}")
        self.parameters = {name: spec.get("Default") for name, spec in declared.items()} | dict(parameters or {})

    def resource(self, name: str) -> dict[str, Any]:
        try:
            return self.body["Resources"][name]["Properties"]
        except KeyError:
            raise KeyError(f"{self.path.name} has no resource {name}") from None

    def resources_of_type(self, kind: str) -> dict[str, dict[str, Any]]:
        return {name: r.get("Properties", {}) for name, r in self.body["Resources"].items() if r["Type"] == kind}

    def value(self, raw: Any) -> Any:
        """``raw`` with every ``Ref`` to a parameter replaced by its value."""
        if isinstance(raw, dict) and set(raw) == {"Ref"} and raw["Ref"] in self.parameters:
            return self.parameters[raw["Ref"]]  # a Ref to a resource or a pseudo parameter stays
        if isinstance(raw, dict):
            return {key: self.value(item) for key, item in raw.items()}
        if isinstance(raw, list):
            return [self.value(item) for item in raw]
        return raw

    def number(self, raw: Any) -> float:
        value = self.value(raw)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.path.name}: {raw!r} is not a number ({value!r})") from None

    def condition(self, name: str) -> bool:
        """Evaluates the template's condition ``name`` (Equals, Not, And, Or, Condition)."""
        return bool(self._evaluate(self.body["Conditions"][name]))

    def _evaluate(self, expression: Any) -> Any:
        if isinstance(expression, dict) and len(expression) == 1:
            ((function, argument),) = expression.items()
            if function == "Fn::Equals":
                left, right = (self._evaluate(a) for a in argument)
                return str(left) == str(right)
            if function == "Fn::Not":
                return not self._evaluate(argument[0])
            if function == "Fn::And":
                return all(self._evaluate(a) for a in argument)
            if function == "Fn::Or":
                return any(self._evaluate(a) for a in argument)
            if function in ("Condition", "Fn::Condition"):
                return self.condition(argument)
            if function == "Ref":
                return self.value(expression)
        return expression
