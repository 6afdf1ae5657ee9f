"""Metrics: job, GPU and queue signals published to CloudWatch for dashboards, alarms and scaling.

The agent builds one :class:`MetricsPublisher` (``build_metrics``), records job events into its
``jobs`` (:class:`JobMetrics`), tells its ``lag`` (:class:`LagReporter`) whether it holds partition 0
of the jobs topic, and starts and stops it with the other loops. See docs/metrics.md.
"""

from sdagent.metrics.assembly import build_metrics
from sdagent.metrics.cloudwatch import CloudWatchSink, cloudwatch_client
from sdagent.metrics.config import MetricsConfig
from sdagent.metrics.dimensions import InstanceIdentity
from sdagent.metrics.emf import EmfSink
from sdagent.metrics.health import AutoScalingHealth
from sdagent.metrics.jobs import JobMetrics
from sdagent.metrics.lag import LagReporter
from sdagent.metrics.nvml import GpuSampler
from sdagent.metrics.publisher import MetricsPublisher
from sdagent.metrics.sink import MetricsSink, SinkUnavailable

__all__ = [
    "AutoScalingHealth",
    "CloudWatchSink",
    "EmfSink",
    "GpuSampler",
    "InstanceIdentity",
    "JobMetrics",
    "LagReporter",
    "MetricsConfig",
    "MetricsPublisher",
    "MetricsSink",
    "SinkUnavailable",
    "build_metrics",
    "cloudwatch_client",
]
