"""The ``[backend]`` section: one config class per kind, chosen by ``backend.kind``.

The kinds and their classes are registered in :mod:`sdagent.backends.registry`; a field that
belongs to one kind cannot be set on another (each class forbids unknown keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sdagent.webui.config import ProcessConfig

A1111_ENTRY_POINTS = frozenset({"webui.sh", "webui.py", "launch.py", "webui-user.sh"})
SIMULATED_READY_TIMEOUT_S = 120.0  # the in-process simulator is ready at once; a bound all the same


class BackendConfig(BaseModel):
    """What every kind has: its name and the models its jobs may name."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    models: list[str] = Field(default_factory=lambda: ["sd15.safetensors"])

    @property
    def ready_timeout_s(self) -> float:
        """How long the agent waits for the backend to be ready before it gives up."""
        return SIMULATED_READY_TIMEOUT_S


class SimulatedBackendConfig(BackendConfig):
    """The in-process simulator, for tests and the demo (``kind = "simulated"``)."""

    kind: Literal["simulated"] = "simulated"
    step_latency_s: float = Field(0.0, ge=0)
    switch_latency_s: float = Field(0.0, ge=0)


class WebUIBackendConfig(BackendConfig):
    """A WebUI over HTTP, supervised by the agent (or attached to, without ``process.command``)."""

    url: str = "http://127.0.0.1:7861"  # A1111 --nowebui listens on 7861; ComfyUI on 8188
    request_timeout_s: float = Field(30.0, gt=0)
    progress_poll_s: float = Field(0.5, gt=0)
    # A job past this is hung: interrupted, then the process group is killed and restarted.
    job_timeout_s: float = Field(900.0, gt=0)
    # No progress for this long is also a hang.
    stall_timeout_s: float = Field(120.0, gt=0)
    process: ProcessConfig = Field(default_factory=ProcessConfig)

    @property
    def ready_timeout_s(self) -> float:
        return self.process.ready_timeout_s


class A1111BackendConfig(WebUIBackendConfig):
    """AUTOMATIC1111 and the WebUIs with its API (Forge, SD.Next) (``kind = "a1111"``)."""

    kind: Literal["a1111"] = "a1111"

    @field_validator("process")
    @classmethod
    def _launched_on_loopback_or_on_purpose(cls, process: ProcessConfig) -> ProcessConfig:
        # Without either flag uvicorn binds 0.0.0.0 and [::]: an API with no authentication
        # (POST /options, /txt2img) on the instance's network. Only A1111's own entry points are
        # read: a wrapper script of the operator's sets its flags where this cannot see them.
        command = process.command or []
        starts_a1111 = any(Path(arg).name in A1111_ENTRY_POINTS for arg in command)
        flags = {arg.split("=", 1)[0] for arg in command}
        if starts_a1111 and not {"--server-name", "--listen"} & flags:
            raise ValueError(
                "process.command starts AUTOMATIC1111 without --server-name, so its API listens on "
                'every interface; add "--server-name", "127.0.0.1" (or --listen to mean it)'
            )
        return process


class ComfyUIBackendConfig(WebUIBackendConfig):
    """ComfyUI (``kind = "comfyui"``)."""

    kind: Literal["comfyui"] = "comfyui"
    workflows_dir: Path | None = None  # workflow templates that override the built-in ones
