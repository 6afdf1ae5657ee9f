"""The package's shape: no import cycle, a root that holds only what every part shares, a bounded
Agent, and the registries that replace guessing (docs/architecture.md)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import grimp
import pytest

import sdagent
from sdagent.backends import registry
from sdagent.backends.base import Backend, Generation, Health
from sdagent.backends.config import BackendConfig
from sdagent.config import load_settings
from sdagent.errors import ConfigError, SdagentError

PACKAGE = Path(sdagent.__file__).parent
ROOT_MODULES = {
    "__init__",
    "__main__",
    "cli",
    "client",
    "config",
    "errors",
    "heap",
    "jobs",
    "logs",
    "modelnames",
    "progress",
}
AGENT_MAX_LINES = 200


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    edges = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in edges[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges)))
    try:
        for module in edges:
            if module not in index:
                visit(module)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_no_module_imports_itself_back_through_others():
    # Every import counts, lazy and TYPE_CHECKING ones included: a cycle hidden in a function is
    # still two modules that cannot be understood apart.
    assert _cycles(grimp.build_graph("sdagent", cache_dir=None)) == []


def test_the_package_root_holds_only_the_modules_every_part_shares():
    loose = {path.stem for path in PACKAGE.glob("*.py")}
    assert loose <= ROOT_MODULES, f"give these a home in a subpackage: {sorted(loose - ROOT_MODULES)}"


def test_agent_stays_an_owner_of_parts_not_a_builder():
    source = (PACKAGE / "agent" / "agent.py").read_text()
    assert len(source.splitlines()) <= AGENT_MAX_LINES
    tree = ast.parse(source)
    constructed = {
        node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    # The composition root builds the Kafka clients and the loops; the agent only receives them.
    assert constructed.isdisjoint({"Consumer", "Producer", "JobLedger", "JobRunner", "Intake", "StatusPublisher"})


def _bases(node: ast.ClassDef) -> set[str]:
    return {base.id for base in node.bases if isinstance(base, ast.Name)}


def test_every_exception_class_of_the_package_derives_from_sdagent_error():
    builtin_errors = {"Exception", "RuntimeError", "ValueError"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "fake.py" and path.parent.name == "gpu":
            continue  # mimics pynvml's own NVMLError
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        classes = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)]
        offenders += [
            f"{module}.{node.name}"
            for node in classes
            if node.name != "SdagentError" and _bases(node) & builtin_errors and "SdagentError" not in _bases(node)
        ]
    assert offenders == []


class _EchoConfig(BackendConfig):
    kind: str = "echo"
    greeting: str = "hello"


class _EchoBackend(Backend):
    name = "echo"

    def __init__(self, config: _EchoConfig) -> None:
        self.config = config

    def health(self) -> Health:
        return Health(ready=True, models=tuple(self.config.models))

    def loaded_model(self) -> str | None:
        return None

    def switch_model(self, model: str) -> None:
        pass

    def generate(self, job, progress, abort) -> Generation:
        raise NotImplementedError

    def interrupt(self) -> None:
        pass


@pytest.fixture
def echo_kind():
    registry.register(registry.BackendKind("echo", _EchoConfig, lambda config, _dir: _EchoBackend(config), False))
    yield
    registry.unregister("echo")


def test_a_backend_is_added_by_one_registration(echo_kind):
    settings = load_settings(overrides={"backend": {"kind": "echo", "greeting": "hi"}})
    assert isinstance(settings.backend, _EchoConfig) and settings.backend.greeting == "hi"
    backend = registry.build_backend(settings.backend)
    assert isinstance(backend, _EchoBackend) and backend.health().ready
    assert registry.kind_of("echo").supervised is False


def test_an_unknown_backend_kind_stops_start_up_naming_the_key():
    with pytest.raises(ConfigError) as error:
        load_settings(overrides={"backend": {"kind": "forge-nightly"}})
    assert error.value.key == "backend.kind" and "forge-nightly" in str(error.value)
    assert isinstance(error.value, SdagentError)


def test_a_key_of_another_backend_kind_is_refused_naming_it():
    with pytest.raises(ConfigError) as error:
        load_settings(overrides={"backend": {"kind": "a1111", "step_latency_s": 0.1}})
    assert error.value.key == "backend.step_latency_s"


def test_an_unknown_metrics_sink_is_refused_naming_it():
    with pytest.raises(ConfigError) as error:
        load_settings(overrides={"metrics": {"sink": "statsd"}})
    assert error.value.key == "metrics.sink"
