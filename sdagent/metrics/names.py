"""Every metric the agent publishes: name, unit, dimensions and meaning, in one place.

The fleet template (``fleet/fleet.yaml``), ``cloudwatch/alarms.yaml`` and the dashboard refer to these
names; ``QueueBacklog`` and ``JobsInFlight`` are fixed by the fleet's scaling policy. Tests check that
the templates and ``docs/metrics.md`` name only metrics listed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NAMESPACE = "SDAgent"

# Dimension names.
INSTANCE_ID = "InstanceId"
AUTOSCALING_GROUP = "AutoScalingGroupName"
INSTANCE_TYPE = "InstanceType"
GPU_INDEX = "GpuIndex"
JOBS_TOPIC = "JobsTopic"
STATUS = "Status"
REASON = "Reason"

# Which dimension set a metric is published with:
#   instance: InstanceId, InstanceType, AutoScalingGroupName (when the instance is in a group)
#   gpu:      the instance set + GpuIndex
#   group:    AutoScalingGroupName alone, the fleet-wide aggregate alarms and scaling read
#   topic:    JobsTopic alone (QueueBacklog; JobsInFlight's fleet-wide stream, read as an Average)
Scope = Literal["instance", "gpu", "group", "topic"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: str  # a CloudWatch StandardUnit
    scopes: tuple[Scope, ...]
    meaning: str


QUEUE_BACKLOG = "QueueBacklog"
JOBS_IN_FLIGHT = "JobsInFlight"
JOBS_STARTED = "JobsStarted"
JOBS_FINISHED = "JobsFinished"
JOB_FAILURES = "JobFailures"
QUEUE_WAIT_TIME = "QueueWaitTime"
MODEL_SWITCH_TIME = "ModelSwitchTime"
MODEL_STAGE_TIME = "ModelStageTime"
INFERENCE_TIME = "InferenceTime"
UPLOAD_TIME = "UploadTime"
JOB_TOTAL_TIME = "JobTotalTime"
MODEL_CACHE_HITS = "ModelCacheHits"
MODEL_CACHE_MISSES = "ModelCacheMisses"
BACKEND_RESTARTS = "BackendRestarts"
DRAINING = "Draining"
TIME_TO_READY = "TimeToReady"
METRICS_DROPPED = "MetricsDropped"
GPU_UTILIZATION = "GpuUtilization"
GPU_MEMORY_UTILIZATION = "GpuMemoryUtilization"
GPU_MEMORY_USED = "GpuMemoryUsed"
GPU_MEMORY_TOTAL = "GpuMemoryTotal"
GPU_TEMPERATURE = "GpuTemperature"
GPU_POWER_DRAW = "GpuPowerDraw"
GPU_POWER_LIMIT = "GpuPowerLimit"
GPU_SM_CLOCK = "GpuSmClock"
GPU_THERMAL_THROTTLE = "GpuThermalThrottle"
GPU_POWER_THROTTLE = "GpuPowerThrottle"
GPU_ECC_UNCORRECTED = "GpuEccUncorrectedErrors"
GPU_XID_ERRORS = "GpuXidErrors"
GPU_LOST = "GpuLost"

METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            QUEUE_BACKLOG, "Count", ("topic",), "the group's lag: jobs not yet committed (partition 0's holder)"
        ),
        MetricSpec(JOBS_IN_FLIGHT, "Count", ("instance", "topic"), "jobs running, the interval's maximum"),
        MetricSpec(JOBS_STARTED, "Count", ("instance",), "jobs started in the interval"),
        MetricSpec(JOBS_FINISHED, "Count", ("instance",), "jobs answered in the interval, by Status"),
        MetricSpec(JOB_FAILURES, "Count", ("group",), "jobs not succeeded in the interval, by Reason"),
        MetricSpec(QUEUE_WAIT_TIME, "Milliseconds", ("instance",), "time from produce to start (distribution)"),
        MetricSpec(MODEL_SWITCH_TIME, "Milliseconds", ("instance",), "model load when the job needed another model"),
        MetricSpec(
            MODEL_STAGE_TIME, "Milliseconds", ("instance",), "model copy from the store to local NVMe (cache misses)"
        ),
        MetricSpec(INFERENCE_TIME, "Milliseconds", ("instance",), "generation time (distribution)"),
        MetricSpec(UPLOAD_TIME, "Milliseconds", ("instance",), "output upload time (distribution)"),
        MetricSpec(JOB_TOTAL_TIME, "Milliseconds", ("instance",), "accept to answer (distribution)"),
        MetricSpec(MODEL_CACHE_HITS, "Count", ("instance",), "model lookups served from the local cache"),
        MetricSpec(MODEL_CACHE_MISSES, "Count", ("instance",), "model lookups that had to fetch"),
        MetricSpec(BACKEND_RESTARTS, "Count", ("instance", "group"), "WebUI restarts in the interval"),
        MetricSpec(DRAINING, "None", ("instance",), "1 while the agent drains"),
        MetricSpec(TIME_TO_READY, "Seconds", ("instance", "group"), "boot to ready to serve, once per boot"),
        MetricSpec(METRICS_DROPPED, "Count", ("instance",), "data points dropped from the publisher's full buffer"),
        MetricSpec(GPU_UTILIZATION, "Percent", ("gpu",), "time a kernel ran (NVML utilization.gpu)"),
        MetricSpec(GPU_MEMORY_UTILIZATION, "Percent", ("gpu",), "time device memory was read or written"),
        MetricSpec(GPU_MEMORY_USED, "Bytes", ("gpu",), "device memory in use"),
        MetricSpec(GPU_MEMORY_TOTAL, "Bytes", ("gpu",), "device memory"),
        MetricSpec(GPU_TEMPERATURE, "None", ("gpu",), "GPU core temperature, degrees C"),
        MetricSpec(GPU_POWER_DRAW, "None", ("gpu",), "board power draw, watts"),
        MetricSpec(GPU_POWER_LIMIT, "None", ("gpu",), "enforced power limit, watts"),
        MetricSpec(GPU_SM_CLOCK, "None", ("gpu",), "SM clock, MHz"),
        MetricSpec(GPU_THERMAL_THROTTLE, "Percent", ("gpu",), "samples with a thermal or hardware slowdown"),
        MetricSpec(GPU_POWER_THROTTLE, "Percent", ("gpu",), "samples capped by power (SwPowerCap, PowerBrake)"),
        MetricSpec(GPU_ECC_UNCORRECTED, "Count", ("gpu", "group"), "new uncorrected volatile ECC errors"),
        MetricSpec(GPU_XID_ERRORS, "Count", ("gpu", "group"), "XID critical errors"),
        MetricSpec(GPU_LOST, "Count", ("gpu", "group"), "1 per interval while a GPU is lost or needs a reset"),
    )
}
