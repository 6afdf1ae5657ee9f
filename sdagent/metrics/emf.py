"""The Embedded Metric Format sink: JSON lines CloudWatch Logs turns into metrics.

Lines go to the CloudWatch agent's EMF listener (UDP or TCP 25888, enabled by
``logs.metrics_collected.emf`` in ``cloudwatch/agent.json``) or to a file. No PutMetricData request
is made, so there is no request charge; the lines are billed as log ingestion.

EMF has no statistic sets and no counts (a metric's value is a number or an array of at most 100
numbers), so a statistic set is written as values that keep its count, sum, minimum and maximum
exactly, and a distribution's values are repeated by their counts.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import structlog

from sdagent.metrics.datum import Datum, Dimensions
from sdagent.metrics.names import NAMESPACE
from sdagent.metrics.sink import MetricsSink, SendResult, SinkUnavailable

log = structlog.get_logger(__name__)

# EMF specification limits: 100 metrics a directive, 100 values a metric, 30 dimensions a set.
MAX_METRICS_PER_LINE = 100
MAX_VALUES_PER_METRIC = 100
# A log event is at most 256 KB; a UDP datagram much less in practice: lines stay under this.
MAX_LINE_BYTES = 60_000
SOCKET_TIMEOUT_S = 2.0


class LineWriter(Protocol):
    def write(self, lines: Sequence[str]) -> None: ...

    def close(self) -> None: ...


class EmfSink(MetricsSink):
    """Writes data points as EMF lines, one line per timestamp and dimension set."""

    def __init__(
        self,
        writer: LineWriter,
        namespace: str = NAMESPACE,
        storage_resolution: int = 60,
        log_group: str | None = None,
    ) -> None:
        if storage_resolution not in (1, 60):
            raise ValueError("storage_resolution is 1 or 60")
        self._writer = writer
        self._namespace = namespace
        self._resolution = storage_resolution
        self._log_group = log_group

    def lines(self, data: Sequence[Datum]) -> list[str]:
        """The EMF lines for ``data``."""
        groups: dict[tuple[float, Dimensions], dict[str, tuple[str, list[float]]]] = defaultdict(dict)
        for datum in data:
            values = _values(datum)
            if not values:
                continue
            metrics = groups[(datum.timestamp, datum.dimensions)]
            if datum.name in metrics:
                metrics[datum.name][1].extend(values)
            else:
                metrics[datum.name] = (datum.unit, values)
        lines: list[str] = []
        for (timestamp, dimensions), metrics in groups.items():
            for chunk in _chunks(metrics):
                lines.extend(self._render(timestamp, dimensions, chunk))
        return lines

    def send(self, data: Sequence[Datum]) -> SendResult:
        lines = self.lines(data)
        try:
            self._writer.write(lines)
        except OSError as exc:
            raise SinkUnavailable(f"EMF write failed: {exc}") from exc
        return SendResult(len(data), 0, len(lines))

    def close(self) -> None:
        self._writer.close()

    def _render(
        self, timestamp: float, dimensions: Dimensions, metrics: dict[str, tuple[str, list[float]]]
    ) -> Iterator[str]:
        aws: dict = {
            "Timestamp": int(timestamp * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": self._namespace,
                    "Dimensions": [[name for name, _ in dimensions]],
                    "Metrics": [
                        {"Name": name, "Unit": unit, "StorageResolution": self._resolution}
                        for name, (unit, _) in metrics.items()
                    ],
                }
            ],
        }
        if self._log_group:
            aws["LogGroupName"] = self._log_group  # read by the CloudWatch agent, not by the spec
        document: dict = {"_aws": aws, **dict(dimensions)}
        for name, (_, values) in metrics.items():
            document[name] = values[0] if len(values) == 1 else values
        line = json.dumps(document, separators=(",", ":"))
        if len(line) > MAX_LINE_BYTES and len(metrics) > 1:
            half = len(metrics) // 2
            items = list(metrics.items())
            yield from self._render(timestamp, dimensions, dict(items[:half]))
            yield from self._render(timestamp, dimensions, dict(items[half:]))
            return
        yield line


def _values(datum: Datum) -> list[float]:
    if datum.value is not None:
        return [float(datum.value)] if math.isfinite(datum.value) else []
    if datum.stats is not None:
        stats = datum.stats
        count = int(stats.sample_count)
        if count <= 0 or not all(math.isfinite(v) for v in (stats.sum, stats.minimum, stats.maximum)):
            return []
        if count == 1:
            return [stats.sum]
        if count == 2:
            return [stats.minimum, stats.maximum]
        # min, max and count-2 copies of the rest's mean: same count, sum, minimum and maximum.
        rest = (stats.sum - stats.minimum - stats.maximum) / (count - 2)
        return [stats.minimum, stats.maximum, *([rest] * (count - 2))]
    counts: Sequence[float] = datum.counts or (1.0,) * len(datum.values)
    expanded: list[float] = []
    for value, weight in zip(datum.values, counts):
        if math.isfinite(value):
            expanded.extend([float(value)] * max(1, round(weight)))
    return expanded


def _chunks(metrics: dict[str, tuple[str, list[float]]]) -> Iterator[dict[str, tuple[str, list[float]]]]:
    """Split into directives of at most 100 metrics with at most 100 values each.

    A metric with more values continues on further lines (same timestamp and dimensions): CloudWatch
    aggregates them as one.
    """
    pending = {name: (unit, list(values)) for name, (unit, values) in metrics.items()}
    while pending:
        chunk: dict[str, tuple[str, list[float]]] = {}
        for name in list(pending):
            if len(chunk) >= MAX_METRICS_PER_LINE:
                break
            unit, values = pending[name]
            chunk[name] = (unit, values[:MAX_VALUES_PER_METRIC])
            if len(values) > MAX_VALUES_PER_METRIC:
                pending[name] = (unit, values[MAX_VALUES_PER_METRIC:])
            else:
                del pending[name]
        yield chunk


# --- where the lines go ------------------------------------------------------------------------


class FileWriter:
    """Appends lines to a file (the CloudWatch agent, or a test, reads it)."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)

    def write(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        # Opened per write: logrotate may move the file between two intervals.
        with self._path.open("a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))

    def close(self) -> None:
        pass


class StreamWriter:
    """Writes lines to an open text stream the caller owns."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, lines: Sequence[str]) -> None:
        self._stream.write("".join(line + "\n" for line in lines))
        self._stream.flush()

    def close(self) -> None:
        pass


class UdpWriter:
    """One datagram per line to the CloudWatch agent; a lost datagram loses one interval's line."""

    def __init__(self, host: str, port: int) -> None:
        self._address = (host, port)
        self._socket: socket.socket | None = None

    def write(self, lines: Sequence[str]) -> None:
        if self._socket is None:
            family = socket.AF_INET6 if ":" in self._address[0] else socket.AF_INET
            self._socket = socket.socket(family, socket.SOCK_DGRAM)
        for line in lines:
            self._socket.sendto(line.encode() + b"\n", self._address)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class TcpWriter:
    """Newline-delimited lines over one TCP connection, reopened after a failure."""

    def __init__(self, host: str, port: int, timeout_s: float = SOCKET_TIMEOUT_S) -> None:
        self._address = (host, port)
        self._timeout_s = timeout_s
        self._socket: socket.socket | None = None

    def write(self, lines: Sequence[str]) -> None:
        payload = "".join(line + "\n" for line in lines).encode()
        if not payload:
            return
        try:
            if self._socket is None:
                self._socket = socket.create_connection(self._address, timeout=self._timeout_s)
            self._socket.sendall(payload)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def writer_for(destination: str) -> LineWriter:
    """``udp://host:port``, ``tcp://host:port`` or a file path."""
    for scheme, writer in (("udp://", UdpWriter), ("tcp://", TcpWriter)):
        if destination.startswith(scheme):
            host, _, port = destination[len(scheme) :].rpartition(":")
            return writer(host, int(port))
    return FileWriter(Path(os.path.expanduser(destination)))
