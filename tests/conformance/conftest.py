"""The real WebUIs under the real agent: AUTOMATIC1111 v1.10.1 and ComfyUI 0.3.64 on CPU.

``ci/install-webuis.sh`` (run by ``make test``) builds their virtualenvs and writes
``.webuis.env``; :mod:`tiny_models` makes random-weight SD1 checkpoints with one of them. Each
test module starts one ``sdagent run`` (real broker, moto) that launches its WebUI through the
shipped launcher, ``/usr/libexec/sdagent/webui``, exactly as the image's unit does, from a copy of
the read-only source tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from sdagent.client import Client
from sdagent.devstack.kafka import free_loopback_port
from sdagent.devstack.moto import aws_client
from sdagent.devstack.process import wait_until
from sdagent.devstack.stack import ensure_topics, settings_from, spawn_agent, stack_config
from sdagent.jobs import StatusEvent

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "systemd/rootfs/usr/libexec/sdagent/webui"
GENERATOR = Path(__file__).with_name("tiny_models.py")
CLIP_OFFLINE = REPO / "packer/provisioners/clip-l-offline.py"  # tiny_models.py uses its tokenizer
MODELS_CACHE = Path(os.environ.get("SDAGENT_CACHE_DIR", Path.home() / ".cache/sdagent")) / "conformance-models"
READY_TIMEOUT_S = 240  # a cold first start compiles bytecode: ComfyUI took ~66 s once
# A WebUI that exits this often before the agent is ready will not start: fail now, not at the timeout.
EXITS_BEFORE_READY = 3
# On a CPU: no half precision, no CUDA probing. Offline: nothing may come from a hub.
CPU_ARGS = {"a1111": "--use-cpu all --no-half", "comfyui": "--cpu --disable-api-nodes --disable-all-custom-nodes",
            "forge": "--always-cpu"}  # fmt: skip
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
MODELS = {"a1111": ("tiny-a.safetensors", "tiny-b.safetensors"),
          "comfyui": ("shallow-a.safetensors", "shallow-b.safetensors")}  # fmt: skip


@dataclass(frozen=True)
class Install:
    """One WebUI as ci/install-webuis.sh left it: its source tree and its virtualenv's interpreter."""

    source: Path
    python: Path

    @property
    def venv(self) -> Path:
        return self.python.parent.parent


def installs() -> dict[str, Install]:
    values = dict(os.environ)
    env_file = REPO / ".webuis.env"
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), value.strip())
    found = {}
    for webui in ("a1111", "comfyui", "forge"):
        source, python = values.get(f"SDAGENT_{webui.upper()}_SOURCE"), values.get(f"SDAGENT_{webui.upper()}_PYTHON")
        if not source or not python or not Path(python).exists():
            pytest.fail(f"the {webui} WebUI is not installed: run ci/install-webuis.sh (make test does)")
        found[webui] = Install(Path(source), Path(python))
    return found


@pytest.fixture(scope="session")
def webuis() -> dict[str, Install]:
    return installs()


@pytest.fixture(scope="session")
def tiny_models(webuis: dict[str, Install]) -> Path:
    return make_tiny_models(webuis)


def make_tiny_models(webuis: dict[str, Install]) -> Path:
    """The checkpoints of tiny_models.py, made once per version of that file and kept."""
    key = hashlib.sha256(GENERATOR.read_bytes() + CLIP_OFFLINE.read_bytes()).hexdigest()[:12]
    out = MODELS_CACHE / key
    if not (out / ".complete").exists():
        shutil.rmtree(out, ignore_errors=True)
        ldm = webuis["a1111"].source / "repositories/stable-diffusion-stability-ai"
        subprocess.run([str(webuis["a1111"].python), str(GENERATOR), "--ldm", str(ldm), "--out", str(out)],
                       check=True, timeout=600, capture_output=True)  # fmt: skip
    return out


@pytest.fixture(scope="session")
def webui_root(tmp_path_factory: pytest.TempPathFactory, webuis: dict[str, Install], tiny_models: Path) -> Path:
    return make_webui_root(tmp_path_factory.mktemp("opt-sdagent-webui"), webuis, tiny_models)


def make_webui_root(root: Path, webuis: dict[str, Install], tiny_models: Path) -> Path:
    """``/opt/sdagent-webui`` of a test image: a copy of each tree, its virtualenv linked in.

    A1111 builds a checkpoint without a ``.yaml`` beside it from ``configs/v1-inference.yaml``;
    the copy's is the tiny model's, so the cache needs to stage nothing but the checkpoint.
    """
    for webui, install in webuis.items():
        tree = root / webui
        shutil.copytree(install.source, tree, symlinks=True)
        (tree / "venv").symlink_to(install.venv)
    shutil.copyfile(tiny_models / "a1111/tiny-sd1.yaml", root / "a1111/configs/v1-inference.yaml")
    return root


def comfyui_model_paths(path: Path, models_dir: Path) -> Path:
    """The image's /etc/sdagent/comfyui-models.yaml, pointed at ``models_dir``."""
    shipped = (REPO / "systemd/rootfs/etc/sdagent/comfyui-models.yaml").read_text()
    path.write_text(shipped.replace("/var/cache/sdagent/models", str(models_dir)))
    return path


def launcher_env(webui: str, root: Path, workdir: Path, port: int) -> dict[str, str]:
    """The variables the image's unit gives the launcher, for ``webui`` on ``port`` in ``workdir``."""
    models_dir = workdir / "models"
    (models_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return {**OFFLINE, "SDAGENT_WEBUI": webui, "SDAGENT_WEBUI_PORT": str(port), "SDAGENT_WEBUI_ROOT": str(root),
            "SDAGENT_MODELS_DIR": str(models_dir), "STATE_DIRECTORY": str(workdir / "webui-state"),
            "SDAGENT_WEBUI_ARGS": CPU_ARGS[webui],
            "SDAGENT_COMFYUI_MODEL_PATHS": str(comfyui_model_paths(workdir / "comfyui-models.yaml", models_dir))}  # fmt: skip


def backend_section(webui: str, root: Path, workdir: Path, models: list[str], port: int) -> dict[str, Any]:
    """``[backend]`` for the agent: the WebUI launched by the shipped launcher, as in the image."""
    return {
        "kind": webui,
        "url": f"http://127.0.0.1:{port}",
        "models": models,
        "job_timeout_s": 180,
        "stall_timeout_s": 90,
        "process": {
            "command": ["bash", str(LAUNCHER)],
            "env": launcher_env(webui, root, workdir, port),
            "ready_timeout_s": READY_TIMEOUT_S,
            "restart_backoff_initial_s": 0.5,
            "stop_timeout_s": 15,
        },  # fmt: skip
    }


@dataclass
class Stack:
    """One ``sdagent run`` with its WebUI, its topics and a client; see :func:`start_stack`."""

    webui: str
    port: int
    workdir: Path
    config: dict[str, Any]
    client: Client
    bucket: str
    aws_endpoint: str
    agent: subprocess.Popen | None = None
    seen: dict[str, list[StatusEvent]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models_dir(self) -> Path:
        return self.workdir / "models"

    def run(self, job: dict[str, Any], timeout_s: float = 120) -> StatusEvent:
        job = {"job_id": f"{self.webui}-{uuid.uuid4().hex[:8]}", **job}
        events = self.seen.setdefault(job["job_id"], [])
        return self.client.run(job, timeout_s=timeout_s, on_event=events.append)

    def output(self, answer: StatusEvent, index: int = 0) -> bytes:
        """The bytes of an answer's output, from the bucket (moto)."""
        key = answer.outputs[index].key
        return aws_client("s3", self.aws_endpoint).get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in (self.workdir / "agent.log").read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def webui_pids(self) -> list[int]:
        """The WebUI's processes: children of the agent (the launcher execs the interpreter)."""
        import psutil

        assert self.agent is not None
        return [child.pid for child in psutil.Process(self.agent.pid).children(recursive=True)]

    def get(self, path: str) -> Any:
        return httpx.get(self.url + path, timeout=30).json()

    def stop(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(60)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait(10)
        self.client.close()


_FAILED_STARTS: dict[str, str] = {}


def start_stack(
    webui: str,
    root: Path,
    workdir: Path,
    kafka_bootstrap: str,
    aws_endpoint: str,
    *,
    models: list[str],
    install_models: Callable[[Path], None] | None = None,
    wait_ready: bool = True,
    **sections: dict[str, Any],
) -> Stack:
    """Topics, a bucket and ``sdagent run`` supervising ``webui``; ready for jobs when it returns.

    A WebUI that would not start fails every later start of the same WebUI at once: one wait
    for a broken install, not one per test.
    """
    if webui in _FAILED_STARTS:
        pytest.fail(f"{webui} did not start earlier in this session:\n{_FAILED_STARTS[webui]}")
    prefix = f"c{uuid.uuid4().hex[:8]}."
    bucket = f"conformance-{uuid.uuid4().hex[:12]}"
    aws_client("s3", aws_endpoint).create_bucket(Bucket=bucket)
    port = free_loopback_port()
    backend = backend_section(webui, root, workdir, models, port)
    if install_models is not None:
        install_models(workdir / "models/checkpoints")
    config = stack_config(kafka_bootstrap, aws_endpoint, bucket, topic_prefix=prefix, jobs_partitions=2,
                          backend=backend, retry={"initial_backoff_s": 0.5, "max_backoff_s": 5, "max_attempts": 4},
                          **sections)  # fmt: skip
    settings = settings_from(config)
    ensure_topics(settings)
    stack = Stack(webui, port, workdir, config, Client(settings.kafka, settings.topics), bucket, aws_endpoint)
    stack.agent = spawn_agent(config, workdir, "agent")
    if wait_ready:
        wait_until(lambda: _started_or_hopeless(stack), timeout_s=READY_TIMEOUT_S, interval_s=0.5)
        names = [event.get("event") for event in stack.log_events()]
        if "agent.started" not in names:
            stack.stop()
            output = [event.get("line", "") for event in stack.log_events() if event.get("event") == "webui.output"]
            _FAILED_STARTS[webui] = (f"the agent with {webui} did not start (exits of the WebUI: "
                                     f"{names.count('webui.exited')}); its last lines:\n" + "\n".join(output[-30:]))  # fmt: skip
            pytest.fail(_FAILED_STARTS[webui])
    return stack


def _started_or_hopeless(stack: Stack) -> bool:
    assert stack.agent is not None
    names = [event.get("event") for event in stack.log_events()]
    exited = stack.agent.poll() is not None
    return exited or "agent.started" in names or names.count("webui.exited") >= EXITS_BEFORE_READY


def link_models(names: tuple[str, ...], source: Path) -> Callable[[Path], None]:
    """An installer of checkpoints baked into the image: copies of the tiny ones."""

    def install(checkpoints: Path) -> None:
        checkpoints.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(source / name, checkpoints / name)

    return install
