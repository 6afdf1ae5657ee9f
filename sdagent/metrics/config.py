"""The ``[metrics]`` section: where metrics go, how often, at which resolution."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sdagent.metrics import sinks
from sdagent.metrics.names import NAMESPACE

# Defaults per storage resolution. Standard (60): one PutMetricData a minute, the cheapest a
# per-minute metric can be. High (1): a 10 s publish interval matches the 10 s period of
# high-resolution alarms and target tracking; GPU and gauges sampled every second.
_DEFAULT_PUBLISH_INTERVAL_S = {60: 60.0, 1: 10.0}
_DEFAULT_SAMPLE_INTERVAL_S = {60: 10.0, 1: 1.0}
_EMF_SOCKET = re.compile(r"^(udp|tcp)://[^:/]+:\d{1,5}$")


class MetricsConfig(BaseModel):
    """Metrics publishing (``[metrics]``); see docs/metrics.md."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # cloudwatch: PutMetricData from the agent. emf: Embedded Metric Format lines to the CloudWatch
    # agent (no request charge; the agent turns them into metrics through CloudWatch Logs).
    sink: str = "cloudwatch"  # a name registered in sdagent.metrics.sinks
    namespace: str = Field(NAMESPACE, min_length=1, max_length=255)
    storage_resolution: Literal[1, 60] = 60
    publish_interval_s: float | None = Field(None, ge=1, le=300)  # None: 60 s, or 10 s at resolution 1
    sample_interval_s: float | None = Field(None, ge=0.5, le=300)  # None: 10 s, or 1 s at resolution 1
    gpu: bool = True  # sample NVML; off, or no driver, publishes job metrics only
    # Utilisation, memory, power, clocks, throttling. Off keeps only the error metrics (XID, ECC,
    # lost) when the CloudWatch agent's nvidia_gpu block already collects the rest.
    gpu_detail: bool = True
    queue_backlog: bool = True  # publish QueueBacklog while this member holds partition 0
    lag_timeout_s: float = Field(5.0, gt=0, le=60)
    # Data points kept while the sink is unreachable; the oldest are dropped (and counted) beyond.
    # 10,000 is about 5 hours of one instance's metrics at standard resolution.
    max_buffered: int = Field(10_000, ge=100, le=1_000_000)
    retry_initial_backoff_s: float = Field(1.0, gt=0)
    retry_max_backoff_s: float = Field(60.0, gt=0)
    # CloudWatch sink.
    region: str | None = None  # None: the instance's region, passed in by the agent
    endpoint_url: str | None = None  # tests and VPC endpoints
    max_attempts: int = Field(3, ge=1, le=10)  # attempts per request, the first included (botocore standard mode)
    connect_timeout_s: float = Field(3.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0)
    # EMF sink: udp://host:port or tcp://host:port (the CloudWatch agent listens on 25888), or a
    # file path the CloudWatch agent (or anything else) tails.
    emf_destination: str = "udp://127.0.0.1:25888"
    emf_log_group: str | None = "/sdagent/metrics"  # the CloudWatch agent writes EMF lines here

    @field_validator("sink")
    @classmethod
    def _registered_sink(cls, name: str) -> str:
        if name not in sinks.names():
            raise ValueError(f"unknown sink {name!r}; one of: {', '.join(sinks.names())}")
        return name

    @model_validator(mode="after")
    def _intervals(self) -> MetricsConfig:
        if self.publish_interval_s is None:
            self.publish_interval_s = _DEFAULT_PUBLISH_INTERVAL_S[self.storage_resolution]
        if self.sample_interval_s is None:
            self.sample_interval_s = min(_DEFAULT_SAMPLE_INTERVAL_S[self.storage_resolution], self.publish_interval_s)
        if self.sample_interval_s > self.publish_interval_s:
            raise ValueError("sample_interval_s must not exceed publish_interval_s")
        if self.retry_max_backoff_s < self.retry_initial_backoff_s:
            raise ValueError("retry_max_backoff_s must not be below retry_initial_backoff_s")
        if "://" in self.emf_destination and not _EMF_SOCKET.match(self.emf_destination):
            raise ValueError("emf_destination: udp://host:port, tcp://host:port or a file path")
        return self
