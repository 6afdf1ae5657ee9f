"""The ``[metrics]`` section: defaults that follow the resolution, and bad values refused with their key."""

from __future__ import annotations

import tomllib

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdagent.gpu.fake import FakeNvml
from sdagent.metrics.assembly import DisabledPublisher, build_metrics
from sdagent.metrics.cloudwatch import CloudWatchSink
from sdagent.metrics.config import MetricsConfig
from sdagent.metrics.dimensions import InstanceIdentity
from sdagent.metrics.emf import EmfSink


class Mounted(BaseModel):
    """How the agent's Settings mounts the section."""

    model_config = ConfigDict(extra="forbid")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)


def test_standard_resolution_publishes_once_a_minute():
    config = MetricsConfig()
    assert (config.storage_resolution, config.publish_interval_s, config.sample_interval_s) == (60, 60.0, 10.0)
    assert config.sink == "cloudwatch" and config.namespace == "SDAgent"


def test_high_resolution_defaults_to_10_s_publishes_and_1_s_samples():
    config = MetricsConfig(storage_resolution=1)
    assert (config.publish_interval_s, config.sample_interval_s) == (10.0, 1.0)


def test_explicit_intervals_are_kept():
    config = MetricsConfig(publish_interval_s=30, sample_interval_s=5)
    assert (config.publish_interval_s, config.sample_interval_s) == (30, 5)


def test_a_short_publish_interval_caps_the_default_sample_interval():
    assert MetricsConfig(publish_interval_s=5).sample_interval_s == 5


def test_the_section_mounts_from_toml():
    text = """
    [metrics]
    sink = "emf"
    storage_resolution = 1
    emf_destination = "tcp://127.0.0.1:25888"
    gpu_detail = false
    """
    mounted = Mounted.model_validate(tomllib.loads(text))
    assert mounted.metrics.sink == "emf" and mounted.metrics.publish_interval_s == 10.0


@pytest.mark.parametrize(
    "values, key",
    [
        ({"unknown_key": 1}, "unknown_key"),
        ({"storage_resolution": 10}, "storage_resolution"),
        ({"sink": "prometheus"}, "sink"),
        ({"sample_interval_s": 30, "publish_interval_s": 10}, "sample_interval_s"),
        ({"emf_destination": "http://127.0.0.1:25888"}, "emf_destination"),
        ({"max_buffered": 5}, "max_buffered"),
    ],
)
def test_bad_values_are_refused_naming_the_key(values, key):
    with pytest.raises(ValidationError) as raised:
        Mounted.model_validate({"metrics": values})
    assert key in str(raised.value)


IDENTITY = InstanceIdentity("i-0abc", "g5.xlarge", "fleet")


def test_build_metrics_chooses_the_sink_from_the_config(tmp_path):
    emf = build_metrics(
        MetricsConfig(sink="emf", emf_destination=str(tmp_path / "emf.log")), IDENTITY, nvml=FakeNvml(1)
    )
    assert isinstance(emf._sink, EmfSink)
    cloudwatch = build_metrics(MetricsConfig(), IDENTITY, region="us-east-1", nvml=FakeNvml(1))
    assert isinstance(cloudwatch._sink, CloudWatchSink)
    assert cloudwatch.lag is None  # no admin client given: no backlog
    assert cloudwatch.gpus is not None


def test_disabled_metrics_keep_the_api_and_do_nothing():
    publisher = build_metrics(MetricsConfig(enabled=False), IDENTITY)
    assert isinstance(publisher, DisabledPublisher)
    publisher.start()
    publisher.jobs.job_started()
    publisher.stop()
    assert publisher.jobs.collect(0.0, IDENTITY) == []


def test_the_cloudwatch_client_has_explicit_retries():
    publisher = build_metrics(MetricsConfig(max_attempts=4, read_timeout_s=7), IDENTITY, region="eu-west-1")
    config = publisher._sink._client.meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 4}  # the first attempt and 3 retries
    assert config.read_timeout == 7
