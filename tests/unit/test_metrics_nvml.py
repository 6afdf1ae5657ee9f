"""GPU sampling through NVML: readings, and every kind of NVML failure, on the fake device module."""

from __future__ import annotations

import shutil
import time

import pytest
from structlog.testing import capture_logs

from sdagent.gpu.fake import REALISTIC_CALL_COSTS_S, FakeGpu, FakeNvml
from sdagent.metrics import names
from sdagent.metrics.dimensions import InstanceIdentity
from sdagent.metrics.gpustats import GpuAggregator
from sdagent.metrics.nvml import GpuSampler, throttle_flags

NOT_SUPPORTED, NO_PERMISSION, TIMEOUT, FUNCTION_NOT_FOUND, GPU_IS_LOST, RESET_REQUIRED, UNKNOWN = (
    3,
    4,
    10,
    13,
    15,
    16,
    999,
)
IDENTITY = InstanceIdentity("i-0abc", "g5.12xlarge", "sdagent-fleet")


def started(nvml: FakeNvml, **kwargs) -> GpuSampler:
    sampler = GpuSampler(nvml, **kwargs)
    assert sampler.start()
    return sampler


def events(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


def test_every_signal_is_read_in_its_unit():
    gpu = FakeGpu(clocks_event_reasons=0x4 | 0x40, ecc_uncorrected_volatile=0)
    sample = started(FakeNvml([gpu])).sample().samples[0]
    assert sample.utilization_gpu == 97 and sample.utilization_memory == 61
    assert sample.memory_used_bytes == 11 * 1024**3 and sample.memory_total_bytes == 24 * 1024**3
    assert sample.temperature_c == 63
    assert sample.power_draw_w == 142.0 and sample.power_limit_w == 300.0  # NVML reports milliwatts
    assert sample.sm_clock_mhz == 1710
    assert sample.throttle_reasons == {"SwPowerCap", "HwThermalSlowdown"}
    assert sample.ecc_uncorrected_new == 0
    assert not sample.lost


def test_throttle_bitmask_becomes_named_flags():
    assert throttle_flags(0) == frozenset()
    assert throttle_flags(0x4 | 0x8 | 0x20 | 0x40 | 0x80) == {
        "SwPowerCap",
        "HwSlowdown",
        "SwThermalSlowdown",
        "HwThermalSlowdown",
        "HwPowerBrakeSlowdown",
    }
    assert throttle_flags(0x1000) == {"Bit0x1000"}  # a bit a newer driver adds is kept, not lost


def test_no_nvml_library_means_no_gpu_metrics():
    nvml = FakeNvml(library_missing=True)
    sampler = GpuSampler(nvml)
    with capture_logs() as logs:
        assert sampler.start() is False
    assert not sampler.available
    assert sampler.sample().samples == ()
    assert events(logs, "gpu.nvml_unavailable")[0]["code"] == 12


def test_driver_not_loaded_means_no_gpu_metrics():
    assert GpuSampler(FakeNvml(init_error=9)).start() is False


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this host has an NVIDIA driver")
def test_real_pynvml_on_a_host_without_a_driver_finds_no_gpu():
    sampler = GpuSampler()  # the real pynvml module: LibraryNotFound here
    assert sampler.start() is False
    assert sampler.sample().samples == ()


def test_not_supported_skips_that_signal_on_that_gpu_only_and_logs_once():
    nvml = FakeNvml(2)
    nvml.fail(1, "nvmlDeviceGetPowerUsage", NOT_SUPPORTED)
    sampler = started(nvml)
    with capture_logs() as logs:
        readings = [sampler.sample() for _ in range(5)]
    assert all(r.samples[1].power_draw_w is None for r in readings)
    assert all(r.samples[0].power_draw_w == 142.0 for r in readings)
    assert all(r.samples[1].temperature_c == 63 for r in readings)  # only that signal is skipped
    unsupported = events(logs, "gpu.metric_unsupported")
    assert len(unsupported) == 1 and unsupported[0]["gpu"] == 1 and unsupported[0]["signal"] == "power"
    assert sampler.unsupported(1) == {"power"}
    # Remembered: NVML is not asked again.
    calls = nvml.calls["nvmlDeviceGetPowerUsage"]
    sampler.sample()
    assert nvml.calls["nvmlDeviceGetPowerUsage"] == calls + 1  # GPU 0 only


@pytest.mark.parametrize("code", [FUNCTION_NOT_FOUND, NO_PERMISSION])
def test_function_not_found_and_no_permission_count_as_unsupported(code):
    nvml = FakeNvml(1)
    nvml.fail(0, "nvmlDeviceGetTotalEccErrors", code)
    sampler = started(nvml)
    assert sampler.sample().samples[0].ecc_uncorrected_new is None
    assert sampler.unsupported(0) == {"ecc"}


def test_memory_falls_back_to_v1_on_an_old_driver():
    nvml = FakeNvml([FakeGpu(supports_memory_v2=False)])
    sampler = started(nvml)
    with capture_logs() as logs:
        first, second = sampler.sample().samples[0], sampler.sample().samples[0]
    assert first.memory_used_bytes == second.memory_used_bytes == 11 * 1024**3
    assert not events(logs, "gpu.metric_unsupported")
    assert nvml.calls["nvmlDeviceGetMemoryInfo"] == 3  # v2 once, then v1 each time


@pytest.mark.parametrize("code", [GPU_IS_LOST, RESET_REQUIRED])
def test_a_lost_gpu_is_reported_once_and_keeps_reading_as_lost(code):
    nvml = FakeNvml(2)
    lost: list[tuple[int, str]] = []
    sampler = started(nvml, on_lost=lambda index, reason: lost.append((index, reason)))
    sampler.sample()
    nvml.lose(1, code)
    with capture_logs() as logs:
        readings = [sampler.sample() for _ in range(3)]
    assert [index for index, _ in lost] == [1]
    assert sampler.gpu_lost
    assert all(r.samples[1].lost and r.samples[1].utilization_gpu is None for r in readings)
    assert all(not r.samples[0].lost and r.samples[0].utilization_gpu == 97 for r in readings)
    assert len(events(logs, "gpu.lost")) == 1


def test_a_gpu_lost_before_start_is_reported():
    nvml = FakeNvml(1)
    nvml.lose(0)  # nvmlDeviceGetHandleByIndex already fails with GpuIsLost
    lost = []
    sampler = started(nvml, on_lost=lambda index, reason: lost.append(index))
    assert lost == [0]
    assert sampler.sample().samples[0].lost


def test_a_failing_on_lost_callback_does_not_stop_sampling():
    nvml = FakeNvml(2)
    sampler = started(nvml, on_lost=lambda index, reason: 1 / 0)
    nvml.lose(0)
    reading = sampler.sample()
    assert reading.samples[0].lost and reading.samples[1].utilization_gpu == 97


def test_transient_errors_skip_one_reading_are_logged_once_and_recover():
    nvml = FakeNvml(1)
    nvml.fail(0, "nvmlDeviceGetUtilizationRates", TIMEOUT, times=3)
    sampler = started(nvml)
    with capture_logs() as logs:
        readings = [sampler.sample().samples[0] for _ in range(4)]
    assert [r.utilization_gpu for r in readings] == [None, None, None, 97]
    assert len(events(logs, "gpu.read_failed")) == 1
    assert len(events(logs, "gpu.read_recovered")) == 1
    assert sampler.unsupported(0) == frozenset()  # not remembered as unsupported


def test_unknown_error_is_transient():
    nvml = FakeNvml(1)
    nvml.fail(0, "nvmlDeviceGetTemperature", UNKNOWN, times=1)
    sampler = started(nvml)
    assert sampler.sample().samples[0].temperature_c is None
    assert sampler.sample().samples[0].temperature_c == 63


def test_xid_critical_errors_are_counted_per_gpu_without_blocking():
    nvml = FakeNvml(2)
    sampler = started(nvml)
    nvml.xid(1, 13)
    nvml.xid(1, 31)
    nvml.xid(0, 43)
    reading = sampler.sample()
    assert sorted((x.index, x.code) for x in reading.xids) == [(0, 43), (1, 13), (1, 31)]
    assert sampler.sample().xids == ()  # taken once
    assert not sampler.gpu_lost


def test_xid_79_fallen_off_the_bus_marks_the_gpu_lost():
    nvml = FakeNvml(1)
    lost = []
    sampler = started(nvml, on_lost=lambda index, reason: lost.append(reason))
    nvml.xid(0, 79)
    assert sampler.sample().samples[0].lost
    assert lost == ["XID 79"]


def test_xid_events_not_supported_are_skipped_and_logged_once():
    nvml = FakeNvml([FakeGpu(supports_xid_events=False), FakeGpu()])
    with capture_logs() as logs:
        sampler = started(nvml)
    assert sampler.unsupported(0) == {"xid"}
    assert [e["gpu"] for e in events(logs, "gpu.metric_unsupported")] == [0]


def test_new_ecc_errors_are_reported_per_sample_not_as_a_running_total():
    gpu = FakeGpu(ecc_uncorrected_volatile=2)  # since the driver loaded: reported once
    nvml = FakeNvml([gpu])
    sampler = started(nvml)
    assert sampler.sample().samples[0].ecc_uncorrected_new == 2
    assert sampler.sample().samples[0].ecc_uncorrected_new == 0
    gpu.ecc_uncorrected_volatile = 5
    assert sampler.sample().samples[0].ecc_uncorrected_new == 3


def test_close_shuts_nvml_down():
    nvml = FakeNvml(1)
    sampler = started(nvml)
    sampler.close()
    assert nvml.initialised == 0
    assert nvml.calls["nvmlEventSetFree"] == 1


def test_fake_call_costs_spend_cpu_like_driver_calls():
    sampler = started(FakeNvml(1, call_costs_s=REALISTIC_CALL_COSTS_S))
    before = time.thread_time()
    for _ in range(20):
        sampler.sample()
    spent = time.thread_time() - before
    per_pass = sum(REALISTIC_CALL_COSTS_S[f] for f in REALISTIC_CALL_COSTS_S if f != "nvmlDeviceGetIndex")
    assert spent >= 20 * per_pass * 0.8


# --- readings into data points ----------------------------------------------------------------


def test_aggregator_turns_an_interval_into_statistic_sets_per_gpu():
    nvml = FakeNvml(2)
    sampler = started(nvml)
    aggregator = GpuAggregator(IDENTITY)
    for utilization in (10, 50, 90):
        nvml.gpus[0].utilization_gpu = utilization
        aggregator.add(sampler.sample())
    data = aggregator.collect(1_700_000_040.0)
    util = {d.dimensions: d for d in data if d.name == names.GPU_UTILIZATION}
    gpu0 = util[IDENTITY.gpu(0)]
    assert (gpu0.stats.sample_count, gpu0.stats.sum, gpu0.stats.minimum, gpu0.stats.maximum) == (3, 150, 10, 90)
    assert gpu0.unit == "Percent" and gpu0.timestamp == 1_700_000_040.0
    assert len(util) == 2
    assert dict(gpu0.dimensions) == {
        "InstanceId": "i-0abc",
        "InstanceType": "g5.12xlarge",
        "AutoScalingGroupName": "sdagent-fleet",
        "GpuIndex": "0",
    }
    # Healthy GPUs publish no error metrics at all.
    assert not [d for d in data if d.name in (names.GPU_XID_ERRORS, names.GPU_LOST, names.GPU_ECC_UNCORRECTED)]
    assert aggregator.collect(1_700_000_100.0) == []  # the next interval starts empty


def test_aggregator_counts_errors_per_gpu_and_for_the_group():
    nvml = FakeNvml(2)
    sampler = started(nvml)
    aggregator = GpuAggregator(IDENTITY, detail=False)
    nvml.xid(0, 13)
    nvml.xid(1, 48)
    nvml.gpus[1].ecc_uncorrected_volatile = 1
    aggregator.add(sampler.sample())
    nvml.lose(0)
    aggregator.add(sampler.sample())
    data = {(d.name, d.dimensions): d.value for d in aggregator.collect(0.0)}
    group = IDENTITY.group()
    assert data[(names.GPU_XID_ERRORS, IDENTITY.gpu(0))] == 1
    assert data[(names.GPU_XID_ERRORS, group)] == 2
    assert data[(names.GPU_ECC_UNCORRECTED, IDENTITY.gpu(1))] == 1
    assert data[(names.GPU_LOST, IDENTITY.gpu(0))] == 1
    assert data[(names.GPU_LOST, group)] == 1
    assert not any(name == names.GPU_UTILIZATION for name, _ in data)  # detail off
