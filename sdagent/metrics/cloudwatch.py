"""The CloudWatch sink: PutMetricData in as few requests as the API limits allow."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from sdagent.metrics.datum import Datum
from sdagent.metrics.names import NAMESPACE
from sdagent.metrics.sink import MetricsSink, SendResult, SinkUnavailable

log = structlog.get_logger(__name__)

# PutMetricData limits (AWS API reference): 1,000 metrics a request, 150 values a metric, 1 MB a
# request. botocore gzips the body, so the size budget below, counted uncompressed, is conservative.
MAX_DATUMS_PER_REQUEST = 1000
MAX_VALUES_PER_DATUM = 150
MAX_REQUEST_BYTES = 900_000
# Answers that no retry will change: the data is dropped (and counted) instead of retried forever.
# The query-compatible codes and their JSON/CBOR-protocol spellings.
PERMANENT_ERRORS = frozenset(
    {
        "InvalidParameterValue",
        "InvalidParameterValueException",
        "InvalidParameterCombination",
        "InvalidParameterCombinationException",
        "MissingParameter",
        "MissingRequiredParameterException",
    }
)


def cloudwatch_client(
    region: str | None,
    endpoint_url: str | None = None,
    *,
    max_attempts: int = 3,
    connect_timeout_s: float = 3.0,
    read_timeout_s: float = 10.0,
    **credentials: str,
):
    """A CloudWatch client with its retry policy set explicitly.

    Standard mode retries throttling (HTTP 400 ``Throttling``), 5xx and dropped connections with
    exponential backoff and a retry quota; the publisher backs off on top of that when a request
    still fails. Short timeouts: a hung connection must not hold the publisher's buffer for minutes.
    """
    config = Config(
        # total_max_attempts counts the first attempt; botocore's "max_attempts" key counts retries.
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
    )
    return boto3.client("cloudwatch", region_name=region, endpoint_url=endpoint_url, config=config, **credentials)


class CloudWatchSink(MetricsSink):
    """Sends data points with PutMetricData, batched within the API's limits."""

    def __init__(self, client, namespace: str = NAMESPACE, storage_resolution: int = 60) -> None:
        if storage_resolution not in (1, 60):
            raise ValueError("storage_resolution is 1 or 60")
        self._client = client
        self._namespace = namespace
        self._resolution = storage_resolution

    def requests(self, data: Sequence[Datum]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """The ``MetricData`` lists of the requests ``data`` needs, each with how many data points it carries."""
        batch: list[dict[str, Any]] = []
        batch_bytes = 0
        carried = 0
        for datum in data:
            entries = list(self._entries(datum))
            for index, entry in enumerate(entries):
                size = _estimated_bytes(entry)
                if batch and (len(batch) >= MAX_DATUMS_PER_REQUEST or batch_bytes + size > MAX_REQUEST_BYTES):
                    yield carried, batch
                    batch, batch_bytes, carried = [], 0, 0
                batch.append(entry)
                batch_bytes += size
                if index == len(entries) - 1:
                    carried += 1  # a datum counts as carried by the request holding its last part
            if not entries:
                carried += 1  # nothing sendable (non-finite): counted with the next request
        if batch:
            yield carried, batch

    def send(self, data: Sequence[Datum]) -> SendResult:
        consumed = delivered = rejected = requests = 0
        for carried, metric_data in self.requests(data):
            try:
                self._client.put_metric_data(Namespace=self._namespace, MetricData=metric_data)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code not in PERMANENT_ERRORS:
                    raise SinkUnavailable(f"PutMetricData failed: {code}: {exc}", consumed, delivered) from exc
                log.error("metrics.rejected", code=code, data_points=carried, error=str(exc))
                rejected += carried
            except ParamValidationError as exc:  # our bug, not the network's: retrying cannot help
                log.error("metrics.rejected", code="ParamValidationError", data_points=carried, error=str(exc))
                rejected += carried
            except BotoCoreError as exc:  # connection refused, timeouts, DNS
                raise SinkUnavailable(f"PutMetricData failed: {exc}", consumed, delivered) from exc
            else:
                delivered += carried
            consumed += carried
            requests += 1
        return SendResult(delivered, rejected, requests)

    def _entries(self, datum: Datum) -> Iterator[dict[str, Any]]:
        base: dict[str, Any] = {
            "MetricName": datum.name,
            "Dimensions": [{"Name": name, "Value": value} for name, value in datum.dimensions],
            "Timestamp": datetime.fromtimestamp(datum.timestamp, tz=UTC),
            "Unit": datum.unit,
            "StorageResolution": self._resolution,
        }
        if datum.value is not None:
            if math.isfinite(datum.value):
                yield {**base, "Value": float(datum.value)}
            return
        if datum.stats is not None:
            stats = datum.stats
            if all(math.isfinite(v) for v in (stats.sum, stats.minimum, stats.maximum)):
                yield {
                    **base,
                    "StatisticValues": {
                        "SampleCount": float(stats.sample_count),
                        "Sum": float(stats.sum),
                        "Minimum": float(stats.minimum),
                        "Maximum": float(stats.maximum),
                    },
                }
            return
        counts = datum.counts or (1.0,) * len(datum.values)
        pairs = [(v, c) for v, c in zip(datum.values, counts) if math.isfinite(v)]
        # More distinct values than one datum takes: several data points of the same metric and
        # timestamp, which CloudWatch aggregates as one.
        for start in range(0, len(pairs), MAX_VALUES_PER_DATUM):
            chunk = pairs[start : start + MAX_VALUES_PER_DATUM]
            yield {**base, "Values": [float(v) for v, _ in chunk], "Counts": [float(c) for _, c in chunk]}


def _estimated_bytes(entry: dict[str, Any]) -> int:
    """An upper bound of the entry's size in the query encoding, the most verbose botocore uses."""
    size = 160 + len(entry["MetricName"])
    for dimension in entry["Dimensions"]:
        size += 70 + len(dimension["Name"]) + len(dimension["Value"])
    size += 60 * len(entry.get("Values", ()))
    return size
