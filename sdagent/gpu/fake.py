"""A FAKE of the ``pynvml`` module for tests and the benchmark: GPUs in memory, failures on demand.

Pass an instance wherever a ``pynvml`` module is expected (``GpuSampler(nvml=FakeNvml(...))``).
It has the functions, constants and error classes the sampler uses, with pynvml's names, and
can make any call fail with any NVML error, lose a GPU, raise XID events and spend CPU per call
like a driver call does (``call_costs_s``).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from types import SimpleNamespace

# NVML_ERROR_* values and pynvml's class names for them.
_ERROR_NAMES = {
    1: "Uninitialized",
    2: "InvalidArgument",
    3: "NotSupported",
    4: "NoPermission",
    9: "DriverNotLoaded",
    10: "Timeout",
    12: "LibraryNotFound",
    13: "FunctionNotFound",
    15: "GpuIsLost",
    16: "ResetRequired",
    25: "ArgumentVersionMismatch",
    999: "Unknown",
}

# CPU time a call costs on a real driver. ASSUMED orders of magnitude for an ioctl into the NVIDIA
# kernel module (tens of microseconds; power readings slower), not measurements: run
# bench/metrics_cost.py --real-nvml on a GPU instance to replace them.
REALISTIC_CALL_COSTS_S: dict[str, float] = {
    "nvmlDeviceGetUtilizationRates": 40e-6,
    "nvmlDeviceGetMemoryInfo": 30e-6,
    "nvmlDeviceGetTemperature": 20e-6,
    "nvmlDeviceGetPowerUsage": 100e-6,
    "nvmlDeviceGetEnforcedPowerLimit": 20e-6,
    "nvmlDeviceGetClockInfo": 20e-6,
    "nvmlDeviceGetCurrentClocksEventReasons": 30e-6,
    "nvmlDeviceGetTotalEccErrors": 60e-6,
    "nvmlEventSetWait_v2": 15e-6,
    "nvmlDeviceGetIndex": 5e-6,
}


# pynvml calls the driver through ctypes, which releases the GIL for the call: the fake spends its
# CPU the same way, hashing zeros (hashlib releases the GIL above 2 KiB), not in a Python loop that
# would hold the GIL and slow every other thread as no real NVML call does.
_BURN = memoryview(bytes(1 << 20))
_MIN_BURN_BYTES = 4096
_burn_bytes_per_s: float | None = None


def spend_cpu(seconds: float) -> None:
    """Spend about ``seconds`` of CPU time on this thread, with the GIL released."""
    global _burn_bytes_per_s
    if _burn_bytes_per_s is None:
        started = time.thread_time()
        for _ in range(4):
            hashlib.sha256(_BURN)
        _burn_bytes_per_s = 4 * len(_BURN) / max(time.thread_time() - started, 1e-6)
    remaining = int(seconds * _burn_bytes_per_s)
    while remaining > 0:
        size = min(max(remaining, _MIN_BURN_BYTES), len(_BURN))
        hashlib.sha256(_BURN[:size])
        remaining -= size


class NVMLError(Exception):
    """pynvml's base error; ``value`` is the NVML_ERROR_* code. ``NVMLError(3)`` builds the subclass."""

    _by_code: dict[int, type[NVMLError]] = {}

    def __new__(cls, value: int = 999):
        if cls is NVMLError:
            cls = NVMLError._by_code.get(value, cls)
        error = Exception.__new__(cls)
        error.value = value
        return error

    def __init__(self, value: int = 999) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _ERROR_NAMES.get(self.value, f"NVML error {self.value}")


def _error_class(code: int, name: str) -> type[NVMLError]:
    def __new__(cls, value: int = code):
        return NVMLError.__new__(cls, code)

    def __init__(self, value: int = code) -> None:
        NVMLError.__init__(self, code)

    cls = type(f"NVMLError_{name}", (NVMLError,), {"__new__": __new__, "__init__": __init__})
    NVMLError._by_code[code] = cls
    return cls


_ERROR_CLASSES = {code: _error_class(code, name) for code, name in _ERROR_NAMES.items()}


@dataclass
class FakeGpu:
    """One fake device's readings (NVML units: bytes, milliwatts, MHz, degrees C)."""

    name: str = "NVIDIA A10G"
    utilization_gpu: int = 97
    utilization_memory: int = 61
    memory_total: int = 24 * 1024**3
    memory_used: int = 11 * 1024**3
    temperature: int = 63
    power_mw: int = 142_000
    power_limit_mw: int = 300_000
    sm_clock_mhz: int = 1710
    clocks_event_reasons: int = 0
    ecc_uncorrected_volatile: int = 0
    supports_memory_v2: bool = True
    supports_xid_events: bool = True
    failures: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # function -> (code, times)
    lost: int | None = None  # the error code every call raises once lost


@dataclass(frozen=True)
class _Handle:
    index: int


class FakeNvml:
    """Stands in for the ``pynvml`` module."""

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    nvmlMemory_v2 = 0x02000028
    nvmlEventTypeXidCriticalError = 0x8

    def __init__(
        self,
        gpus: int | list[FakeGpu] = 1,
        *,
        library_missing: bool = False,
        init_error: int | None = None,
        call_costs_s: dict[str, float] | float | None = None,
    ) -> None:
        self.gpus = [FakeGpu() for _ in range(gpus)] if isinstance(gpus, int) else list(gpus)
        self._init_error = 12 if library_missing else init_error
        if isinstance(call_costs_s, (int, float)):
            self._costs = {name: float(call_costs_s) for name in REALISTIC_CALL_COSTS_S}
        else:
            self._costs = dict(call_costs_s or {})
        self.calls: Counter[str] = Counter()
        self.initialised = 0
        self._events: deque[SimpleNamespace] = deque()
        self._registered: set[int] = set()
        for code, cls in _ERROR_CLASSES.items():
            setattr(self, cls.__name__, cls)
            setattr(self, f"NVML_ERROR_{_ERROR_NAMES[code].upper()}", code)

    # --- test controls -------------------------------------------------------------------------

    def fail(self, index: int, function: str, code: int, times: int | None = None) -> None:
        """Make ``function`` on GPU ``index`` raise NVML error ``code`` (``times`` times, or always)."""
        self.gpus[index].failures[function] = (code, times)

    def lose(self, index: int, code: int = 15) -> None:
        """GPU ``index`` is lost: every call on it raises ``code`` (GpuIsLost, or 16 ResetRequired)."""
        self.gpus[index].lost = code

    def xid(self, index: int, code: int) -> None:
        """Raise an XID critical error on GPU ``index``, delivered if it registered for events."""
        if index in self._registered:
            self._events.append(SimpleNamespace(device=_Handle(index), eventType=0x8, eventData=code))

    # --- the pynvml API ------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._call("nvmlInit")
        if self._init_error is not None:
            raise NVMLError(self._init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")
        self.initialised = max(0, self.initialised - 1)

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._device("nvmlDeviceGetHandleByIndex", _Handle(index))
        return _Handle(index)

    def nvmlDeviceGetIndex(self, handle: _Handle) -> int:
        self._device("nvmlDeviceGetIndex", handle)
        return handle.index

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return self._device("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle):
        gpu = self._device("nvmlDeviceGetUtilizationRates", handle)
        return SimpleNamespace(gpu=gpu.utilization_gpu, memory=gpu.utilization_memory)

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: int | None = None):
        gpu = self._device("nvmlDeviceGetMemoryInfo", handle)
        if version is not None and not gpu.supports_memory_v2:
            raise NVMLError(13)  # FunctionNotFound: nvmlDeviceGetMemoryInfo_v2 is missing on old drivers
        reserved = 300 * 1024**2 if version else 0
        return SimpleNamespace(
            total=gpu.memory_total,
            used=gpu.memory_used,
            free=gpu.memory_total - gpu.memory_used - reserved,
            reserved=reserved,
        )

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        return self._device("nvmlDeviceGetTemperature", handle).temperature

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        return self._device("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: _Handle) -> int:
        return self._device("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit_mw

    def nvmlDeviceGetClockInfo(self, handle: _Handle, clock_type: int) -> int:
        return self._device("nvmlDeviceGetClockInfo", handle).sm_clock_mhz

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: _Handle) -> int:
        return self._device("nvmlDeviceGetCurrentClocksEventReasons", handle).clocks_event_reasons

    def nvmlDeviceGetTotalEccErrors(self, handle: _Handle, error_type: int, counter_type: int) -> int:
        return self._device("nvmlDeviceGetTotalEccErrors", handle).ecc_uncorrected_volatile

    def nvmlEventSetCreate(self) -> object:
        self._call("nvmlEventSetCreate")
        return object()

    def nvmlDeviceRegisterEvents(self, handle: _Handle, event_types: int, event_set: object) -> None:
        gpu = self._device("nvmlDeviceRegisterEvents", handle)
        if not gpu.supports_xid_events:
            raise NVMLError(3)
        self._registered.add(handle.index)

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int):
        self._call("nvmlEventSetWait_v2")
        if not self._events:
            raise NVMLError(10)  # Timeout: nothing waiting
        return self._events.popleft()

    def nvmlEventSetFree(self, event_set: object) -> None:
        self._call("nvmlEventSetFree")

    # --- internals -----------------------------------------------------------------------------

    def _call(self, function: str) -> None:
        self.calls[function] += 1
        if self.initialised == 0 and function not in ("nvmlInit", "nvmlShutdown"):
            raise NVMLError(1)  # Uninitialized
        cost = self._costs.get(function)
        if cost:
            spend_cpu(cost)

    def _device(self, function: str, handle: _Handle) -> FakeGpu:
        self._call(function)
        if not 0 <= handle.index < len(self.gpus):
            raise NVMLError(2)
        gpu = self.gpus[handle.index]
        if gpu.lost is not None:
            raise NVMLError(gpu.lost)
        failure = gpu.failures.get(function)
        if failure is not None:
            code, times = failure
            if times is not None:
                if times <= 1:
                    del gpu.failures[function]
                else:
                    gpu.failures[function] = (code, times - 1)
            raise NVMLError(code)
        return gpu
