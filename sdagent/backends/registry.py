"""Every backend kind by name: its config class, its factory, and whether it runs as a supervised
process. Adding a backend is one module and one :func:`register` call; an unknown kind stops
start-up naming ``backend.kind``, never falls back to another kind.
"""

from __future__ import annotations

import contextlib
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from sdagent.backends.base import Backend
from sdagent.backends.config import (
    A1111BackendConfig,
    BackendConfig,
    ComfyUIBackendConfig,
    SimulatedBackendConfig,
)
from sdagent.errors import ConfigError

# models_dir: the model cache's checkpoint folder, which an in-process backend lists as a WebUI
# would (the real ones are pointed at it by their own flags); None without a cache.
BackendFactory = Callable[[Any, "Path | None"], Backend]


@dataclass(frozen=True)
class BackendKind:
    """One kind of backend as ``backend.kind`` names it."""

    name: str
    config: type[BackendConfig]
    factory: BackendFactory
    supervised: bool  # True: the agent launches (or attaches to) a WebUI process and watches it


_KINDS: dict[str, BackendKind] = {}


def register(kind: BackendKind) -> None:
    """Make ``kind`` available to ``backend.kind``; a name registered twice is a programming error."""
    if kind.name in _KINDS:
        raise ValueError(f"backend kind {kind.name!r} is registered already")
    _KINDS[kind.name] = kind


def unregister(name: str) -> None:
    """Forget ``name`` (tests that register a kind of their own)."""
    _KINDS.pop(name, None)


def kinds() -> Mapping[str, BackendKind]:
    return dict(_KINDS)


def kind_of(name: str) -> BackendKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigError("backend.kind", f"unknown backend {name!r}; one of: {', '.join(sorted(_KINDS))}") from None


def parse_config(value: Any) -> BackendConfig:
    """The ``[backend]`` table as its kind's config class (``kind`` defaults to ``simulated``)."""
    if isinstance(value, BackendConfig):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError("backend", f"must be a table, got {type(value).__name__}")
    name = value.get("kind", SimulatedBackendConfig.model_fields["kind"].default)
    if not isinstance(name, str):
        raise ConfigError("backend.kind", f"must be a string, got {name!r}")
    config = kind_of(name).config
    try:
        return config.model_validate(_decoded(config, value))
    except ValidationError as exc:
        raise ConfigError.from_validation(exc, prefix="backend") from None


def _decoded(model: type[BaseModel], value: Mapping[str, Any]) -> dict[str, Any]:
    """The table with JSON text decoded where its field wants a list or a table: an environment
    override arrives as text (``SDAGENT_BACKEND__PROCESS__COMMAND='["./webui.sh"]'``), and only
    the kind's class, not the configuration's, knows that ``process.command`` is a list."""
    decoded = dict(value)
    for name, field in model.model_fields.items():
        given = decoded.get(name)
        annotation = field.annotation
        if isinstance(given, Mapping) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            decoded[name] = _decoded(annotation, given)
        elif isinstance(given, str) and given.lstrip()[:1] in ("[", "{") and str not in _types(annotation):
            with contextlib.suppress(ValueError):  # left as it is: the validator names the key
                decoded[name] = json.loads(given)
    return decoded


def _types(annotation: Any) -> tuple[Any, ...]:
    """The types a field takes: each member of a union (``str | None``), else the one."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def build_backend(config: BackendConfig, models_dir: Path | None = None) -> Backend:
    return kind_of(config.kind).factory(config, models_dir)


# --- the built-in kinds: imported only when built, so the config needs none of their libraries --


def _simulated(config: SimulatedBackendConfig, models_dir: Path | None) -> Backend:
    from sdagent.backends.simulated import SimulatedBackend

    return SimulatedBackend(
        config.models, step_latency_s=config.step_latency_s, switch_latency_s=config.switch_latency_s,
        models_dir=models_dir,
    )  # fmt: skip


def _a1111(config: A1111BackendConfig, _models_dir: Path | None) -> Backend:
    from sdagent.backends.a1111 import A1111Backend

    return A1111Backend(
        config.url, models=config.models, request_timeout_s=config.request_timeout_s,
        progress_poll_s=config.progress_poll_s,
    )  # fmt: skip


def _comfyui(config: ComfyUIBackendConfig, _models_dir: Path | None) -> Backend:
    from sdagent.backends.comfyui import ComfyUIBackend

    return ComfyUIBackend(
        config.url, models=config.models, request_timeout_s=config.request_timeout_s,
        progress_poll_s=config.progress_poll_s, workflows_dir=config.workflows_dir,
    )  # fmt: skip


register(BackendKind("simulated", SimulatedBackendConfig, _simulated, supervised=False))
register(BackendKind("a1111", A1111BackendConfig, _a1111, supervised=True))
register(BackendKind("comfyui", ComfyUIBackendConfig, _comfyui, supervised=True))
