"""Every GPU's health and load, read through NVML behind a seam.

The ``nvml`` argument is the ``pynvml`` module (nvidia-ml-py) or a fake with the same API shape
(:mod:`sdagent.gpu.fake`). Failures are sorted by what they mean for the instance:

- no library or driver (``LibraryNotFound``, ``DriverNotLoaded``, pynvml not installed): a CPU-only
  box (inf2, a laptop). No GPU metrics; job metrics still go out.
- ``NotSupported`` (and ``FunctionNotFound``, ``NoPermission``): this GPU cannot give this signal,
  ever. Skipped from then on, logged once.
- ``GpuIsLost`` / ``ResetRequired`` (and XID 79, "fallen off the bus"): the GPU is gone until the
  instance is replaced. Reported as lost (``on_lost`` is called once per GPU) so the agent can mark
  the instance Unhealthy; published as ``GpuLost`` every interval after.
- anything else (``Timeout``, ``Unknown``): that reading is skipped this once.

Used from one thread (the metrics publisher). NVML counts nvmlInit/nvmlShutdown pairs, so the
WebUI supervisor's own NVML use (:mod:`sdagent.gpu.memory`) is unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import structlog

from sdagent.gpu import nvml as nvml_seam
from sdagent.gpu.nvml import ARGUMENT_VERSION_MISMATCH, LOST_ERRORS, NO_GPU_ERRORS, TIMEOUT, UNSUPPORTED_ERRORS
from sdagent.gpu.nvml import error_code as _code

log = structlog.get_logger(__name__)

# NVIDIA's XID catalog: 79 "GPU has fallen off the bus" - NVML calls fail from then on anyway.
XID_GPU_LOST = frozenset({79})

# nvmlDeviceGetCurrentClocksEventReasons bits (nvml.h nvmlClocksEventReason*).
THROTTLE_FLAGS: dict[int, str] = {
    0x1: "GpuIdle",
    0x2: "ApplicationsClocksSetting",
    0x4: "SwPowerCap",
    0x8: "HwSlowdown",
    0x10: "SyncBoost",
    0x20: "SwThermalSlowdown",
    0x40: "HwThermalSlowdown",
    0x80: "HwPowerBrakeSlowdown",
    0x100: "DisplayClockSetting",
}
THERMAL_THROTTLE = frozenset({"HwSlowdown", "SwThermalSlowdown", "HwThermalSlowdown"})
POWER_THROTTLE = frozenset({"SwPowerCap", "HwPowerBrakeSlowdown"})

XID_EVENT = 0x8  # nvmlEventTypeXidCriticalError
MAX_XID_EVENTS_PER_SAMPLE = 64  # an XID storm must not pin the publisher thread


def throttle_flags(mask: int) -> frozenset[str]:
    """The named reasons set in a clocks-event bitmask (unknown bits as ``Bit0x...``)."""
    flags = {name for bit, name in THROTTLE_FLAGS.items() if mask & bit}
    unknown = mask & ~sum(THROTTLE_FLAGS)
    bit = 1
    while unknown:
        if unknown & bit:
            flags.add(f"Bit{bit:#x}")
            unknown &= ~bit
        bit <<= 1
    return frozenset(flags)


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU; a field is None when the GPU cannot report it."""

    index: int
    utilization_gpu: float | None = None
    utilization_memory: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    power_draw_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: float | None = None
    throttle_reasons: frozenset[str] | None = None
    ecc_uncorrected_new: int | None = None  # since the previous sample
    lost: bool = False


@dataclass(frozen=True)
class XidEvent:
    index: int | None  # None when NVML could not tell which GPU
    code: int


@dataclass(frozen=True)
class GpuReading:
    """One pass over every GPU: their samples and the XID events since the previous pass."""

    samples: tuple[GpuSample, ...] = ()
    xids: tuple[XidEvent, ...] = ()


@dataclass
class _Gpu:
    index: int
    handle: Any = None
    lost: bool = False
    unsupported: set[str] = field(default_factory=set)
    memory_v1: bool = False
    ecc_seen: int = 0
    failing: set[tuple[str, int | None]] = field(default_factory=set)  # (signal, NVML error code)
    throttle: frozenset[str] = frozenset()


class GpuSampler:
    """Reads every GPU's utilisation, memory, temperature, power, clocks, throttling, ECC and XID errors."""

    def __init__(
        self, nvml: ModuleType | Any | None = None, *, on_lost: Callable[[int, str], None] | None = None
    ) -> None:
        self._nvml: Any = nvml  # pynvml or a fake: no stubs, and None until start() loads it
        self._on_lost = on_lost
        self._gpus: list[_Gpu] = []
        self._events: Any = None
        self._started = False
        self._available = False

    @property
    def available(self) -> bool:
        """True once :meth:`start` found NVML and at least one GPU."""
        return self._available

    @property
    def gpu_count(self) -> int:
        return len(self._gpus)

    @property
    def gpu_lost(self) -> bool:
        """True when any GPU is lost or needs a reset: the instance should be replaced."""
        return any(gpu.lost for gpu in self._gpus)

    def unsupported(self, index: int) -> frozenset[str]:
        """The signals GPU ``index`` cannot report."""
        return frozenset(self._gpus[index].unsupported)

    def start(self) -> bool:
        """Initialise NVML and find the GPUs; False (and no GPU metrics) on a box without them."""
        if self._started:
            return self._available
        self._started = True
        nvml = self._nvml
        if nvml is None:
            nvml = nvml_seam.load()
            if nvml is None:
                log.info("gpu.nvml_unavailable", reason="pynvml is not installed")
                return False
            self._nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            level = log.info if _code(exc) in NO_GPU_ERRORS else log.warning
            level("gpu.nvml_unavailable", reason=str(exc), code=_code(exc))
            return False
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            log.warning("gpu.nvml_unavailable", reason=str(exc), code=_code(exc))
            self._shutdown()
            return False
        if count == 0:
            log.info("gpu.none_found")
            self._shutdown()
            return False
        for index in range(count):
            gpu = _Gpu(index)
            try:
                gpu.handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError as exc:
                if _code(exc) in LOST_ERRORS:
                    self._mark_lost(gpu, str(exc))
                else:
                    log.warning("gpu.handle_failed", gpu=index, error=str(exc))
                    gpu.unsupported.add("all")
            self._gpus.append(gpu)
        self._register_xid_events()
        self._available = True
        log.info("gpu.sampling", gpus=count)
        return True

    def sample(self) -> GpuReading:
        """Read every GPU once and collect the XID events waiting; never blocks on NVML events."""
        if not self._available:
            return GpuReading()
        xids = self._drain_xid_events()
        samples = tuple(self._sample(gpu) for gpu in self._gpus)
        return GpuReading(samples, xids)

    def close(self) -> None:
        if not self._available:
            return
        self._available = False
        nvml = self._nvml
        if self._events is not None:
            try:
                nvml.nvmlEventSetFree(self._events)
            except nvml.NVMLError as exc:
                log.debug("gpu.event_set_free_failed", error=str(exc))
            self._events = None
        self._shutdown()

    # --- one GPU -------------------------------------------------------------------------------

    def _sample(self, gpu: _Gpu) -> GpuSample:
        if gpu.lost or "all" in gpu.unsupported:
            return GpuSample(gpu.index, lost=gpu.lost)
        nvml = self._nvml
        handle = gpu.handle
        utilization = self._read(gpu, "utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        memory = self._read(gpu, "memory", lambda: self._memory(gpu))
        temperature = self._read(
            gpu, "temperature", lambda: nvml.nvmlDeviceGetTemperature(handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
        )
        power = self._read(gpu, "power", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        power_limit = self._read(gpu, "power_limit", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        sm_clock = self._read(
            gpu, "sm_clock", lambda: nvml.nvmlDeviceGetClockInfo(handle, getattr(nvml, "NVML_CLOCK_SM", 1))
        )
        reasons = self._read(gpu, "throttle", lambda: self._throttle_mask(handle))
        ecc = self._read(gpu, "ecc", lambda: self._ecc_total(handle))
        if gpu.lost:  # lost during this very pass
            return GpuSample(gpu.index, lost=True)
        flags = throttle_flags(int(reasons)) if reasons is not None else None
        if flags is not None and flags != gpu.throttle:
            log.info("gpu.throttle_changed", gpu=gpu.index, reasons=sorted(flags))
            gpu.throttle = flags
        return GpuSample(
            gpu.index,
            utilization_gpu=float(utilization.gpu) if utilization is not None else None,
            utilization_memory=float(utilization.memory) if utilization is not None else None,
            memory_used_bytes=int(memory.used) if memory is not None else None,
            memory_total_bytes=int(memory.total) if memory is not None else None,
            temperature_c=float(temperature) if temperature is not None else None,
            power_draw_w=power / 1000.0 if power is not None else None,  # NVML reports milliwatts
            power_limit_w=power_limit / 1000.0 if power_limit is not None else None,
            sm_clock_mhz=float(sm_clock) if sm_clock is not None else None,
            throttle_reasons=flags,
            ecc_uncorrected_new=self._ecc_new(gpu, ecc),
        )

    def _memory(self, gpu: _Gpu):
        nvml = self._nvml
        version = getattr(nvml, "nvmlMemory_v2", None)
        if version is not None and not gpu.memory_v1:
            try:
                # v2 leaves the driver's reserved memory out of "used": what the WebUI can still get.
                return nvml.nvmlDeviceGetMemoryInfo(gpu.handle, version=version)
            except nvml.NVMLError as exc:
                if _code(exc) not in UNSUPPORTED_ERRORS | {ARGUMENT_VERSION_MISMATCH}:
                    raise
                gpu.memory_v1 = True  # older driver: the v1 call from now on
        return nvml.nvmlDeviceGetMemoryInfo(gpu.handle)

    def _throttle_mask(self, handle) -> int:
        nvml = self._nvml
        # nvidia-ml-py 12.535 renamed "throttle reasons" to "clocks event reasons".
        call = (
            getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        return call(handle)

    def _ecc_total(self, handle) -> int:
        nvml = self._nvml
        return nvml.nvmlDeviceGetTotalEccErrors(
            handle,
            getattr(nvml, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1),
            getattr(nvml, "NVML_VOLATILE_ECC", 0),
        )

    @staticmethod
    def _ecc_new(gpu: _Gpu, total: int | None) -> int | None:
        """Errors since the previous sample. The volatile counter starts at the driver's load: the
        first sample reports what happened since boot, once."""
        if total is None:
            return None
        total = int(total)
        new = total - gpu.ecc_seen if total >= gpu.ecc_seen else total  # a driver reload reset it
        gpu.ecc_seen = total
        if new:
            log.error("gpu.ecc_uncorrected", gpu=gpu.index, new=new, total=total)
        return new

    def _read(self, gpu: _Gpu, signal: str, call: Callable[[], Any]) -> Any:
        if gpu.lost or signal in gpu.unsupported:
            return None
        nvml = self._nvml
        try:
            value = call()
        except nvml.NVMLError as exc:
            code = _code(exc)
            if code in LOST_ERRORS:
                self._mark_lost(gpu, str(exc))
            elif code in UNSUPPORTED_ERRORS:
                gpu.unsupported.add(signal)
                log.info("gpu.metric_unsupported", gpu=gpu.index, signal=signal, error=str(exc))
            elif (signal, code) not in gpu.failing:
                gpu.failing.add((signal, code))
                log.warning("gpu.read_failed", gpu=gpu.index, signal=signal, error=str(exc), code=code)
            return None
        if gpu.failing:
            recovered = {key for key in gpu.failing if key[0] == signal}
            if recovered:
                gpu.failing -= recovered
                log.info("gpu.read_recovered", gpu=gpu.index, signal=signal)
        return value

    def _mark_lost(self, gpu: _Gpu, reason: str) -> None:
        if gpu.lost:
            return
        gpu.lost = True
        log.error("gpu.lost", gpu=gpu.index, reason=reason)
        if self._on_lost is not None:
            try:
                self._on_lost(gpu.index, reason)
            except Exception:  # the agent's reaction must not stop the sampling of other GPUs
                log.exception("gpu.on_lost_failed", gpu=gpu.index)

    # --- XID events ----------------------------------------------------------------------------

    def _register_xid_events(self) -> None:
        nvml = self._nvml
        try:
            self._events = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            log.info("gpu.metric_unsupported", gpu="all", signal="xid", error=str(exc))
            for gpu in self._gpus:
                gpu.unsupported.add("xid")
            return
        event_type = getattr(nvml, "nvmlEventTypeXidCriticalError", XID_EVENT)
        for gpu in self._gpus:
            if gpu.lost or gpu.handle is None:
                continue
            try:
                nvml.nvmlDeviceRegisterEvents(gpu.handle, event_type, self._events)
            except nvml.NVMLError as exc:
                if _code(exc) in LOST_ERRORS:
                    self._mark_lost(gpu, str(exc))
                else:
                    gpu.unsupported.add("xid")
                    log.info("gpu.metric_unsupported", gpu=gpu.index, signal="xid", error=str(exc))

    def _drain_xid_events(self) -> tuple[XidEvent, ...]:
        if self._events is None:
            return ()
        nvml = self._nvml
        events: list[XidEvent] = []
        for _ in range(MAX_XID_EVENTS_PER_SAMPLE):
            try:
                # 0 ms: take what is waiting, never block; no event raises NVMLError_Timeout.
                data = nvml.nvmlEventSetWait_v2(self._events, 0)
            except nvml.NVMLError as exc:
                if _code(exc) != TIMEOUT:
                    log.warning("gpu.xid_wait_failed", error=str(exc), code=_code(exc))
                break
            if not int(data.eventType) & XID_EVENT:
                continue
            index = self._index_of(data.device)
            code = int(data.eventData)
            events.append(XidEvent(index, code))
            log.error("gpu.xid", gpu=index, xid=code)
            if code in XID_GPU_LOST and index is not None:
                self._mark_lost(self._gpus[index], f"XID {code}")
        return tuple(events)

    def _index_of(self, device) -> int | None:
        nvml = self._nvml
        try:
            index = int(nvml.nvmlDeviceGetIndex(device))
        except nvml.NVMLError:
            return None
        return index if 0 <= index < len(self._gpus) else None

    def _shutdown(self) -> None:
        nvml = self._nvml
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            log.debug("gpu.nvml_shutdown_failed", error=str(exc))
