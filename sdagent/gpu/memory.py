"""How much memory the GPU has in use, read through NVML; ``None`` wherever NVML cannot tell.

A small seam for the WebUI supervisor's memory ceiling: tests pass a fake ``nvml`` module instead
of the real ``pynvml`` (nvidia-ml-py).
"""

from __future__ import annotations

import threading
from types import ModuleType

import structlog

from sdagent.gpu import nvml as nvml_seam

log = structlog.get_logger(__name__)


class GpuMemoryProbe:
    """Bytes of device memory in use on one GPU, the whole device, all processes.

    The whole device, not the WebUI's own processes: there is one WebUI per GPU, and per-process
    accounting (``nvmlDeviceGetComputeRunningProcesses``) reports no usage under some drivers and
    host PIDs inside a container's PID namespace.
    """

    def __init__(self, index: int = 0, nvml: ModuleType | None = None) -> None:
        self._index = index
        self._nvml = nvml
        self._handle = None
        self._initialised = False
        self._unavailable = False
        self._lock = threading.Lock()

    def used_bytes(self) -> int | None:
        """Memory in use now, or ``None`` when NVML is missing, unsupported or failing."""
        with self._lock:
            if self._unavailable:
                return None
            nvml = self._nvml_module()
            if nvml is None:
                return None
            try:
                if not self._initialised:
                    nvml.nvmlInit()
                    self._initialised = True
                if self._handle is None:
                    self._handle = nvml.nvmlDeviceGetHandleByIndex(self._index)
                return int(nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            except nvml.NVMLError as exc:
                self._failed(exc)
                return None

    def close(self) -> None:
        """Release NVML; a later :meth:`used_bytes` initialises it again."""
        with self._lock:
            self._handle = None
            if self._initialised and self._nvml is not None:
                self._initialised = False
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError as exc:
                    log.warning("gpu.nvml_shutdown_failed", error=str(exc))

    def _nvml_module(self) -> ModuleType | None:
        if self._nvml is None:
            self._nvml = nvml_seam.load()
            if self._nvml is None:
                log.warning("gpu.nvml_unavailable", error="pynvml is not installed")
                self._unavailable = True
                return None
        return self._nvml

    def _failed(self, exc: Exception) -> None:
        if nvml_seam.error_code(exc) in nvml_seam.PERMANENT_ERRORS:
            log.warning("gpu.nvml_unavailable", index=self._index, error=str(exc))
            self._unavailable = True
        else:
            log.warning("gpu.nvml_error", index=self._index, error=str(exc))
            self._handle = None  # look it up again next time: a reset GPU gets a new handle
        return None
