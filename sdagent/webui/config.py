"""The ``[backend.process]`` section: how the agent launches and supervises the WebUI."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ProcessConfig(BaseModel):
    """How the agent launches and supervises the WebUI (``[backend.process]``).

    No ``command`` means the WebUI is managed elsewhere (its own systemd unit): the agent attaches
    to ``backend.url`` and only probes it.
    """

    model_config = ConfigDict(extra="forbid")

    command: list[str] | None = None  # e.g. ["./webui.sh", "--api", "--nowebui", "--port", "7861"]
    cwd: Path | None = None
    env: dict[str, str] = Field(default_factory=dict)
    ready_timeout_s: float = Field(300.0, gt=0)
    restart_backoff_initial_s: float = Field(1.0, gt=0)
    restart_backoff_max_s: float = Field(60.0, gt=0)
    # More restarts than this within the window is a crash loop: reported, backoff at its cap.
    crash_loop_restarts: int = Field(5, ge=1)
    crash_loop_window_s: float = Field(300.0, gt=0)
    stop_timeout_s: float = Field(20.0, gt=0)
    max_rss_bytes: int | None = Field(None, gt=0)  # restart between jobs above this resident size
    max_gpu_memory_bytes: int | None = Field(None, gt=0)
