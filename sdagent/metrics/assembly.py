"""Builds the metrics loop the ``[metrics]`` section describes; the agent starts and stops it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdagent.metrics import sinks
from sdagent.metrics.clock import Clock
from sdagent.metrics.config import MetricsConfig
from sdagent.metrics.dimensions import InstanceIdentity
from sdagent.metrics.jobs import JobMetrics
from sdagent.metrics.lag import LagReporter
from sdagent.metrics.nvml import GpuSampler
from sdagent.metrics.publisher import MetricsPublisher
from sdagent.metrics.sink import MetricsSink, SendResult


class _DisabledSink(MetricsSink):
    def send(self, data) -> SendResult:
        return SendResult(0)


class DisabledPublisher(MetricsPublisher):
    """``[metrics] enabled = false``: the same API, nothing recorded, no thread."""

    def start(self) -> None:
        pass

    def stop(self, timeout_s: float = 0.0) -> None:
        pass


def build_sink(config: MetricsConfig, region: str | None, cloudwatch: Any = None) -> MetricsSink:
    """The configured sink; ``cloudwatch`` (a boto3 client) replaces the one built from the config."""
    return sinks.build(config, region, cloudwatch)


def build_metrics(
    config: MetricsConfig,
    identity: InstanceIdentity,
    *,
    region: str | None = None,
    kafka_admin: Any = None,
    committed_reader: Any = None,
    jobs_topic: str | None = None,
    consumer_group: str | None = None,
    cloudwatch: Any = None,
    nvml: Any = None,
    on_gpu_lost: Callable[[int, str], None] | None = None,
    clock: Clock | None = None,
) -> MetricsPublisher:
    """The metrics loop, not started.

    ``jobs_topic`` names the JobsInFlight fleet stream the scaling policies read; with
    ``kafka_admin`` (a confluent_kafka AdminClient), ``committed_reader`` (a Consumer of
    ``consumer_group`` that never subscribes) and ``consumer_group`` it also enables
    ``QueueBacklog``. ``nvml`` replaces pynvml (tests); ``on_gpu_lost(index, reason)`` is called
    once per lost GPU, from the metrics thread.
    """
    if not config.enabled:
        return DisabledPublisher(_DisabledSink(), identity, jobs=JobMetrics(enabled=False))
    lag = None
    if (
        config.queue_backlog
        and kafka_admin is not None
        and committed_reader is not None
        and jobs_topic
        and consumer_group
    ):
        lag = LagReporter(kafka_admin, committed_reader, jobs_topic, consumer_group, timeout_s=config.lag_timeout_s)
    gpus = GpuSampler(nvml, on_lost=on_gpu_lost) if config.gpu else None
    # Both set by MetricsConfig's validator when left out.
    assert config.publish_interval_s is not None and config.sample_interval_s is not None
    return MetricsPublisher(
        build_sink(config, region, cloudwatch),
        identity,
        jobs=JobMetrics(jobs_topic=jobs_topic),
        gpus=gpus,
        lag=lag,
        gpu_detail=config.gpu_detail,
        publish_interval_s=config.publish_interval_s,
        sample_interval_s=config.sample_interval_s,
        max_buffered=config.max_buffered,
        initial_backoff_s=config.retry_initial_backoff_s,
        max_backoff_s=config.retry_max_backoff_s,
        clock=clock,
    )
