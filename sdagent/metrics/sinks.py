"""Every metrics sink by name (``metrics.sink``): each name maps to the factory that builds it.
An unknown name is refused naming ``metrics.sink``, never taken for another sink. Factories import
their sink's module only when called, so the configuration needs none of their libraries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdagent.metrics.sink import MetricsSink

# (the [metrics] section, the instance's region, a boto3 CloudWatch client that replaces the
# configured one). The section is typed Any: metrics.config imports this registry to check names.
SinkFactory = Callable[[Any, "str | None", Any], MetricsSink]

_SINKS: dict[str, SinkFactory] = {}


def register(name: str, factory: SinkFactory) -> None:
    if name in _SINKS:
        raise ValueError(f"metrics sink {name!r} is registered already")
    _SINKS[name] = factory


def unregister(name: str) -> None:
    """Forget ``name`` (tests that register a sink of their own)."""
    _SINKS.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(sorted(_SINKS))


def build(config: Any, region: str | None, cloudwatch: Any = None) -> MetricsSink:
    # The name was checked against this registry when the configuration was read.
    return _SINKS[config.sink](config, region, cloudwatch)


def _cloudwatch(config: Any, region: str | None, cloudwatch: Any) -> MetricsSink:
    from sdagent.metrics.cloudwatch import CloudWatchSink, cloudwatch_client

    client = cloudwatch or cloudwatch_client(
        config.region or region,
        config.endpoint_url,
        max_attempts=config.max_attempts,
        connect_timeout_s=config.connect_timeout_s,
        read_timeout_s=config.read_timeout_s,
    )
    return CloudWatchSink(client, config.namespace, config.storage_resolution)


def _emf(config: Any, _region: str | None, _cloudwatch: Any) -> MetricsSink:
    from sdagent.metrics.emf import EmfSink, writer_for

    return EmfSink(writer_for(config.emf_destination), config.namespace, config.storage_resolution,
                   log_group=config.emf_log_group)  # fmt: skip


register("cloudwatch", _cloudwatch)
register("emf", _emf)
