"""Both sinks without a network: CloudWatch request shaping and error sorting; EMF lines and transports."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from sdagent.metrics.cloudwatch import MAX_REQUEST_BYTES, CloudWatchSink
from sdagent.metrics.datum import Datum, StatisticSet
from sdagent.metrics.emf import EmfSink, FileWriter, StreamWriter, TcpWriter, UdpWriter, writer_for
from sdagent.metrics.sink import SinkUnavailable

DIMS = (("InstanceId", "i-0abc"), ("InstanceType", "g5.xlarge"), ("AutoScalingGroupName", "fleet"))
TS = 1_700_000_040.0


def simple(count: int, name: str = "M") -> list[Datum]:
    return [Datum(f"{name}{i}", DIMS, TS, "Count", value=float(i)) for i in range(count)]


class FakeCloudWatch:
    """Records put_metric_data calls; ``errors`` are raised by the next calls, one each."""

    def __init__(self, errors: list[Exception] | None = None) -> None:
        self.calls: list[dict] = []
        self.errors = list(errors or [])

    def put_metric_data(self, **kwargs):
        if self.errors:
            raise self.errors.pop(0)
        self.calls.append(kwargs)
        return {}


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "PutMetricData")


# --- CloudWatch --------------------------------------------------------------------------------


def test_2500_metrics_go_out_in_3_requests_of_at_most_1000():
    client = FakeCloudWatch()
    result = CloudWatchSink(client).send(simple(2500))
    assert [len(call["MetricData"]) for call in client.calls] == [1000, 1000, 500]
    assert result.delivered == 2500 and result.requests == 3
    assert all(call["Namespace"] == "SDAgent" for call in client.calls)


def test_entries_carry_dimensions_unit_timestamp_and_resolution():
    client = FakeCloudWatch()
    stats = StatisticSet(6, 540, 80, 99)
    CloudWatchSink(client, storage_resolution=1).send(
        [Datum("GpuUtilization", DIMS, TS, "Percent", stats=stats), Datum("JobsStarted", DIMS, TS, "Count", value=2)]
    )
    first, second = client.calls[0]["MetricData"]
    assert first["StatisticValues"] == {"SampleCount": 6.0, "Sum": 540.0, "Minimum": 80.0, "Maximum": 99.0}
    assert first["Dimensions"][0] == {"Name": "InstanceId", "Value": "i-0abc"}
    assert first["StorageResolution"] == 1 and first["Unit"] == "Percent"
    assert first["Timestamp"].timestamp() == TS
    assert second["Value"] == 2.0


def test_more_than_150_distinct_values_are_split_into_several_entries():
    client = FakeCloudWatch()
    values = tuple(float(v) for v in range(400))
    CloudWatchSink(client).send([Datum("JobTotalTime", DIMS, TS, "Milliseconds", values=values, counts=(2.0,) * 400)])
    entries = client.calls[0]["MetricData"]
    assert [len(e["Values"]) for e in entries] == [150, 150, 100]
    assert sum(sum(e["Counts"]) for e in entries) == 800


def test_requests_stay_under_the_size_limit():
    sink = CloudWatchSink(FakeCloudWatch())
    values = tuple(float(v) for v in range(150))
    data = [Datum(f"T{i}", DIMS, TS, "Milliseconds", values=values) for i in range(500)]
    requests = list(sink.requests(data))
    assert len(requests) > 1
    for _, metric_data in requests:
        assert len(metric_data) <= 1000
        assert len(json.dumps(metric_data, default=str)) < MAX_REQUEST_BYTES


def test_non_finite_values_are_not_sent():
    client = FakeCloudWatch()
    CloudWatchSink(client).send([Datum("A", DIMS, TS, value=float("nan")), Datum("B", DIMS, TS, value=1.0)])
    assert [e["MetricName"] for e in client.calls[0]["MetricData"]] == ["B"]


def test_unreachable_endpoint_raises_sink_unavailable_with_what_went_out():
    client = FakeCloudWatch()
    sink = CloudWatchSink(client)
    original = client.put_metric_data
    calls = {"n": 0}

    def second_fails(**kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return original(**kwargs)

    client.put_metric_data = second_fails
    with pytest.raises(SinkUnavailable) as raised:
        sink.send(simple(2500))
    assert raised.value.consumed == 1000 and raised.value.delivered == 1000


@pytest.mark.parametrize("code", ["Throttling", "InternalFailure", "ServiceUnavailable", "AccessDenied"])
def test_transient_answers_are_retried_later(code):
    with pytest.raises(SinkUnavailable):
        CloudWatchSink(FakeCloudWatch([client_error(code)])).send(simple(3))


def test_invalid_data_is_dropped_and_counted_not_retried_forever():
    client = FakeCloudWatch([client_error("InvalidParameterValue")])
    result = CloudWatchSink(client).send(simple(1500))
    assert result.rejected == 1000 and result.delivered == 500


def test_storage_resolution_must_be_1_or_60():
    with pytest.raises(ValueError):
        CloudWatchSink(FakeCloudWatch(), storage_resolution=10)


def test_a_datum_refuses_more_than_30_dimensions():
    with pytest.raises(ValueError):
        Datum("M", tuple((f"D{i}", "v") for i in range(31)), TS, value=1.0)


# --- EMF ---------------------------------------------------------------------------------------

# The document structure of the EMF specification
# (docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html).
EMF_SCHEMA = {
    "type": "object",
    "required": ["_aws"],
    "properties": {
        "_aws": {
            "type": "object",
            "required": ["Timestamp", "CloudWatchMetrics"],
            "properties": {
                "Timestamp": {"type": "integer", "minimum": 0},
                "LogGroupName": {"type": "string", "minLength": 1},
                "CloudWatchMetrics": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["Namespace", "Dimensions", "Metrics"],
                        "additionalProperties": False,
                        "properties": {
                            "Namespace": {"type": "string", "minLength": 1, "maxLength": 1024},
                            "Dimensions": {
                                "type": "array",
                                "items": {
                                    "type": "array",
                                    "maxItems": 30,
                                    "items": {"type": "string", "minLength": 1, "maxLength": 250},
                                },
                            },
                            "Metrics": {
                                "type": "array",
                                "maxItems": 100,
                                "items": {
                                    "type": "object",
                                    "required": ["Name"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "Name": {"type": "string", "minLength": 1, "maxLength": 1024},
                                        "Unit": {"type": "string"},
                                        "StorageResolution": {"enum": [1, 60]},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        }
    },
}


def assert_valid_emf(line: str) -> dict:
    jsonschema = pytest.importorskip("jsonschema")
    document = json.loads(line)
    jsonschema.validate(document, EMF_SCHEMA)
    # Rules the schema cannot state: every referenced member exists at the root with the right type.
    for directive in document["_aws"]["CloudWatchMetrics"]:
        for dimension_set in directive["Dimensions"]:
            for name in dimension_set:
                assert isinstance(document[name], str) and len(document[name]) <= 1024
        for metric in directive["Metrics"]:
            value = document[metric["Name"]]
            assert isinstance(value, (int, float)) or (isinstance(value, list) and 0 < len(value) <= 100)
    assert len(line.encode()) < 256 * 1024
    return document


def test_emf_lines_follow_the_specification():
    sink = EmfSink(StreamWriter(None), storage_resolution=1, log_group="/sdagent/metrics")
    data = [
        Datum("JobsStarted", DIMS, TS, "Count", value=3),
        Datum("GpuUtilization", (*DIMS, ("GpuIndex", "0")), TS, "Percent", stats=StatisticSet(4, 300, 50, 100)),
        Datum("JobTotalTime", DIMS, TS, "Milliseconds", values=(1000.0, 2000.0), counts=(2.0, 1.0)),
    ]
    lines = sink.lines(data)
    assert len(lines) == 2  # one per dimension set
    documents = [assert_valid_emf(line) for line in lines]
    instance = next(d for d in documents if "GpuIndex" not in d)
    assert instance["_aws"]["Timestamp"] == int(TS * 1000)
    assert instance["_aws"]["LogGroupName"] == "/sdagent/metrics"
    assert instance["JobsStarted"] == 3
    assert sorted(instance["JobTotalTime"]) == [1000.0, 1000.0, 2000.0]
    metric = instance["_aws"]["CloudWatchMetrics"][0]
    assert metric["Namespace"] == "SDAgent"
    assert metric["Dimensions"] == [["InstanceId", "InstanceType", "AutoScalingGroupName"]]
    assert {"Name": "JobsStarted", "Unit": "Count", "StorageResolution": 1} in metric["Metrics"]
    gpu = next(d for d in documents if "GpuIndex" in d)
    values = gpu["GpuUtilization"]  # a statistic set as values: same count, sum, min and max
    assert (len(values), sum(values), min(values), max(values)) == (4, 300, 50, 100)


def test_emf_splits_past_100_metrics_and_100_values():
    sink = EmfSink(StreamWriter(None))
    data = simple(250)
    data.append(Datum("Big", DIMS, TS, "Milliseconds", values=tuple(float(v) for v in range(250))))
    lines = sink.lines(data)
    documents = [assert_valid_emf(line) for line in lines]
    names = [m["Name"] for d in documents for m in d["_aws"]["CloudWatchMetrics"][0]["Metrics"]]
    assert len(set(names)) == 251
    big = [v for d in documents if "Big" in d for v in d["Big"]]
    assert sorted(big) == [float(v) for v in range(250)]


def test_emf_file_writer_appends_lines(tmp_path):
    path = tmp_path / "emf.log"
    sink = EmfSink(FileWriter(path))
    sink.send(simple(3))
    sink.send(simple(2))
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert_valid_emf(line)


def test_emf_udp_writer_sends_one_datagram_per_line():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    writer = writer_for(f"udp://127.0.0.1:{receiver.getsockname()[1]}")
    assert isinstance(writer, UdpWriter)
    sink = EmfSink(writer)
    try:
        sink.send(simple(3) + [Datum("X", (("InstanceId", "i-1"),), TS, value=1.0)])
        datagrams = [receiver.recv(65536) for _ in range(2)]
    finally:
        sink.close()
        receiver.close()
    for datagram in datagrams:
        assert datagram.endswith(b"\n")
        assert_valid_emf(datagram.decode().strip())


def test_emf_tcp_writer_streams_lines_and_reports_a_closed_port():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = bytearray()

    def accept() -> None:
        connection, _ = server.accept()
        with connection:
            while chunk := connection.recv(65536):
                received.extend(chunk)

    reader = threading.Thread(target=accept)
    reader.start()
    writer = writer_for(f"tcp://127.0.0.1:{port}")
    assert isinstance(writer, TcpWriter)
    sink = EmfSink(writer)
    sink.send(simple(2))
    sink.close()
    reader.join(5)
    server.close()
    lines = received.decode().splitlines()
    assert len(lines) == 1
    assert_valid_emf(lines[0])
    # Nothing listens any more: the agent is down, the batch is kept for later.
    with pytest.raises(SinkUnavailable):
        EmfSink(TcpWriter("127.0.0.1", port, timeout_s=0.5)).send(simple(1))
