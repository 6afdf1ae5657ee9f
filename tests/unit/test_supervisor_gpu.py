"""The GPU memory seam of the supervisor's ceiling, against a fake NVML module."""

from __future__ import annotations

from types import SimpleNamespace

from sdagent.gpu.memory import GpuMemoryProbe


class FakeNvml:
    """The few pynvml calls GpuMemoryProbe makes; ``errors`` are raised by the next memory reads."""

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(f"NVML error {value}")
            self.value = value

    def __init__(self, used: int = 0, errors: list[int] | None = None) -> None:
        self.used = used
        self.errors = list(errors or [])
        self.inits = 0
        self.shutdowns = 0
        self.handles = 0

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        self.inits += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        self.handles += 1
        return f"gpu{index}"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:  # noqa: N802
        if self.errors:
            raise self.NVMLError(self.errors.pop(0))
        return SimpleNamespace(used=self.used, total=24 * 2**30, free=24 * 2**30 - self.used)


def test_used_bytes_initialises_nvml_once_and_reads_the_device() -> None:
    nvml = FakeNvml(used=5 * 2**30)
    probe = GpuMemoryProbe(0, nvml=nvml)
    assert probe.used_bytes() == 5 * 2**30
    nvml.used = 6 * 2**30
    assert probe.used_bytes() == 6 * 2**30
    assert (nvml.inits, nvml.handles) == (1, 1)
    probe.close()
    probe.close()
    assert nvml.shutdowns == 1


def test_unsupported_gpu_answers_none_for_good() -> None:
    nvml = FakeNvml(used=1, errors=[3])  # NVML_ERROR_NOT_SUPPORTED
    probe = GpuMemoryProbe(0, nvml=nvml)
    assert probe.used_bytes() is None
    assert probe.used_bytes() is None
    assert nvml.handles == 1  # not asked again


def test_transient_error_answers_none_then_reads_again_with_a_fresh_handle() -> None:
    nvml = FakeNvml(used=7, errors=[15])  # NVML_ERROR_GPU_IS_LOST
    probe = GpuMemoryProbe(0, nvml=nvml)
    assert probe.used_bytes() is None
    assert probe.used_bytes() == 7
    assert (nvml.inits, nvml.handles) == (1, 2)


def test_without_an_nvidia_driver_the_real_nvml_answers_none() -> None:
    # The test hosts have no NVIDIA driver: the real pynvml fails with LIBRARY_NOT_FOUND or
    # DRIVER_NOT_LOADED, never with an exception out of the probe.
    probe = GpuMemoryProbe(0)
    used = probe.used_bytes()
    assert used is None or used >= 0
    probe.close()
