"""Metrics against a real moto server: what lands, with which dimensions, in how many requests; and
the fault paths (throttling, an endpoint that goes away and comes back) through a real HTTP proxy."""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from sdagent.devstack.kafka import free_loopback_port
from sdagent.devstack.moto import DUMMY_CREDENTIALS, aws_client
from sdagent.gpu.fake import FakeNvml
from sdagent.metrics import names
from sdagent.metrics.clock import ScaledClock
from sdagent.metrics.cloudwatch import CloudWatchSink, cloudwatch_client
from sdagent.metrics.datum import Datum
from sdagent.metrics.dimensions import InstanceIdentity
from sdagent.metrics.health import AutoScalingHealth
from sdagent.metrics.jobs import JobMetrics
from sdagent.metrics.nvml import GpuSampler
from sdagent.metrics.publisher import MetricsPublisher

FAST = 120  # a minute passes in half a second


@pytest.fixture
def namespace() -> str:
    """moto's state is shared by the session: each test publishes into its own namespace."""
    return f"SDAgentTest{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cloudwatch(aws_endpoint):
    return aws_client("cloudwatch", aws_endpoint)


def sdk_client(endpoint: str, **kwargs):
    """The client the agent builds, retries and timeouts included, pointed at ``endpoint``."""
    return cloudwatch_client("us-east-1", endpoint, **kwargs, **DUMMY_CREDENTIALS)


def count_put_calls(client) -> list[int]:
    """A list that grows by one each time ``client`` sends a PutMetricData (retries included)."""
    calls: list[int] = []
    client.meta.events.register("before-send.cloudwatch.PutMetricData", lambda **_: calls.append(1))
    return calls


def all_metrics(cloudwatch, namespace: str) -> list[dict]:
    paginator = cloudwatch.get_paginator("list_metrics")
    return [m for page in paginator.paginate(Namespace=namespace) for m in page["Metrics"]]


def dims(pairs) -> list[dict]:
    return [{"Name": name, "Value": value} for name, value in pairs]


def query(cloudwatch, namespace: str, metric: str, dimensions, stat: str, period: int = 60) -> list[float]:
    now = datetime.now(UTC)
    start = now.replace(second=0, microsecond=0) - timedelta(hours=1)
    result = cloudwatch.get_metric_data(
        MetricDataQueries=[
            {
                "Id": "m",
                "MetricStat": {
                    "Metric": {"Namespace": namespace, "MetricName": metric, "Dimensions": dims(dimensions)},
                    "Period": period,
                    "Stat": stat,
                },
            }
        ],
        StartTime=start,
        EndTime=now + timedelta(hours=2),  # the scaled clock runs ahead of real time
    )
    return result["MetricDataResults"][0]["Values"]


def wait_for(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# --- what lands --------------------------------------------------------------------------------


def test_published_metrics_land_with_instance_group_and_gpu_dimensions(aws_endpoint, cloudwatch, namespace):
    identity = InstanceIdentity(f"i-{uuid.uuid4().hex[:17]}", "g5.12xlarge", "sdagent-fleet")
    publisher = MetricsPublisher(
        CloudWatchSink(sdk_client(aws_endpoint), namespace),
        identity,
        jobs=JobMetrics(jobs_topic="sdagent.jobs"),
        gpus=GpuSampler(FakeNvml(2)),
        clock=ScaledClock(FAST),
    )
    publisher.start()
    jobs = publisher.jobs
    jobs.job_started()
    jobs.set_in_flight(1)
    jobs.job_finished("succeeded", None, {"total_ms": 1000.0, "inference_ms": 800.0})
    jobs.job_finished("failed", "backend_error", {"total_ms": 3000.0})
    jobs.set_in_flight(0)
    jobs.time_to_ready(88.0)
    try:
        assert wait_for(lambda: publisher.stats().intervals >= 2 and publisher.stats().buffered == 0)
    finally:
        publisher.stop()

    landed = {
        (m["MetricName"], tuple((d["Name"], d["Value"]) for d in m["Dimensions"]))
        for m in all_metrics(cloudwatch, namespace)
    }
    instance, group = identity.instance(), identity.group()
    expected = {
        (names.JOBS_STARTED, instance),
        (names.JOBS_IN_FLIGHT, instance),
        (names.JOBS_IN_FLIGHT, (("JobsTopic", "sdagent.jobs"),)),
        (names.BACKEND_RESTARTS, group),
        (names.JOBS_FINISHED, (*instance, ("Status", "succeeded"))),
        (names.JOB_FAILURES, (*group, ("Reason", "backend_error"))),
        (names.JOB_TOTAL_TIME, instance),
        (names.TIME_TO_READY, group),
        (names.GPU_UTILIZATION, identity.gpu(0)),
        (names.GPU_UTILIZATION, identity.gpu(1)),
        (names.GPU_POWER_DRAW, identity.gpu(1)),
    }
    assert expected <= landed
    assert all(len(d) <= 30 for _, d in landed)
    assert not {name for name, _ in landed} - set(names.METRICS)

    assert sum(query(cloudwatch, namespace, names.JOBS_STARTED, instance, "Sum")) == 1
    assert max(query(cloudwatch, namespace, names.JOBS_IN_FLIGHT, (("JobsTopic", "sdagent.jobs"),), "Maximum")) == 1
    # Values/Counts: the two total times of the interval, one each.
    assert sum(query(cloudwatch, namespace, names.JOB_TOTAL_TIME, instance, "SampleCount")) == 2
    assert sum(query(cloudwatch, namespace, names.JOB_TOTAL_TIME, instance, "Sum")) == 4000
    # Statistic sets: the fake GPU reads 97% on every sample.
    assert set(query(cloudwatch, namespace, names.GPU_UTILIZATION, identity.gpu(0), "Average")) == {97.0}
    # Statistic sets round-trip: each point's sum is 97 times its sample count (how many 10 s
    # samples a point holds depends on timing: at 120x, one request to moto takes simulated seconds).
    counts = query(cloudwatch, namespace, names.GPU_UTILIZATION, identity.gpu(0), "SampleCount")
    sums = query(cloudwatch, namespace, names.GPU_UTILIZATION, identity.gpu(0), "Sum")
    assert sum(counts) >= 2 and sorted(sums) == sorted(97.0 * c for c in counts)


def test_2500_metrics_take_3_put_metric_data_calls(aws_endpoint, cloudwatch, namespace):
    client = sdk_client(aws_endpoint)
    calls = count_put_calls(client)
    stamp = time.time() // 60 * 60
    data = [Datum(f"Metric{i:04d}", (("InstanceId", "i-batch"),), stamp, "Count", value=1.0) for i in range(2500)]
    result = CloudWatchSink(client, namespace).send(data)
    assert len(calls) == 3 and result.requests == 3 and result.delivered == 2500
    assert len(all_metrics(cloudwatch, namespace)) == 2500


def test_high_resolution_points_are_kept_per_second(aws_endpoint, cloudwatch, namespace):
    sink = CloudWatchSink(sdk_client(aws_endpoint), namespace, storage_resolution=1)
    start = time.time() // 60 * 60 - 120
    dimensions = (("InstanceId", "i-hires"),)
    sink.send([Datum("QueueBacklog", dimensions, start + s, "Count", value=float(s)) for s in range(0, 30, 10)])
    assert sorted(query(cloudwatch, namespace, "QueueBacklog", dimensions, "Average", period=10)) == [0.0, 10.0, 20.0]


# --- fault paths, through a proxy in front of moto ---------------------------------------------


class MotoProxy:
    """An HTTP proxy to moto that can answer Throttling or be switched off (connection refused)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.port = free_loopback_port()
        self.throttle_next = 0
        self.requests = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.requests += 1
                if proxy.throttle_next > 0:
                    proxy.throttle_next -= 1
                    self._throttled()
                    return
                connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                connection.request("POST", self.path, body, headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                connection.close()

            def _throttled(self) -> None:
                # CloudWatch's throttling answer, in the protocol the request used.
                content_type = self.headers.get("Content-Type", "")
                if "cbor" in content_type:
                    payload = bytes([0xA2, 0x66]) + b"__type" + bytes([0x6A]) + b"Throttling"
                    payload += bytes([0x67]) + b"message" + bytes([0x6D]) + b"Rate exceeded"
                    headers = {"Content-Type": "application/cbor", "smithy-protocol": "rpc-v2-cbor"}
                elif "json" in content_type:
                    payload = json.dumps({"__type": "Throttling", "message": "Rate exceeded"}).encode()
                    headers = {"Content-Type": "application/x-amz-json-1.0"}
                else:
                    payload = (
                        b"<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code>"
                        b"<Message>Rate exceeded</Message></Error></ErrorResponse>"
                    )
                    headers = {"Content-Type": "text/xml"}
                self.send_response(400)
                for key, value in {**headers, "x-amzn-query-error": "Throttling;Sender"}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def proxy(aws_endpoint):
    running = MotoProxy(aws_endpoint).start()
    yield running
    running.stop()


def test_throttling_is_retried_and_the_data_lands_once(proxy, cloudwatch, namespace):
    client = sdk_client(proxy.endpoint, max_attempts=3)
    proxy.throttle_next = 2
    dimensions = (("InstanceId", "i-throttled"),)
    result = CloudWatchSink(client, namespace).send(
        [Datum("JobsStarted", dimensions, time.time() // 60 * 60, "Count", value=5.0)]
    )
    assert result.delivered == 1
    assert proxy.requests == 3  # two Throttling answers, then through
    assert query(cloudwatch, namespace, "JobsStarted", dimensions, "Sum") == [5.0]


def test_endpoint_down_bounds_the_buffer_drops_the_oldest_and_recovers(proxy, cloudwatch, namespace):
    identity = InstanceIdentity(f"i-{uuid.uuid4().hex[:17]}", "g5.xlarge", "sdagent-fleet")
    proxy.stop()  # nothing listens: connection refused
    publisher = MetricsPublisher(
        CloudWatchSink(sdk_client(proxy.endpoint, max_attempts=1, connect_timeout_s=0.5), namespace),
        identity,
        max_buffered=100,
        initial_backoff_s=5.0,
        max_backoff_s=20.0,
        clock=ScaledClock(FAST * 4),
    )
    publisher.start()
    try:
        # Six points an interval; a full buffer after ~17 intervals.
        assert wait_for(lambda: publisher.stats().dropped > 0, timeout_s=30)
        stats = publisher.stats()
        assert stats.buffered <= 100 and stats.failures > 0 and stats.delivered == 0
        proxy.start()
        assert wait_for(lambda: publisher.stats().delivered > 0 and publisher.stats().buffered < 20, timeout_s=30)
    finally:
        publisher.stop()
    stats = publisher.stats()
    reported = sum(query(cloudwatch, namespace, names.METRICS_DROPPED, identity.instance(), "Sum"))
    assert reported == stats.dropped > 0
    # What survived the outage is the newest run of intervals: oldest dropped, no holes.
    started = query(cloudwatch, namespace, names.JOBS_STARTED, identity.instance(), "SampleCount")
    assert len(started) >= 16


# --- instance health ---------------------------------------------------------------------------


def test_set_unhealthy_marks_the_instance_in_its_group(aws_endpoint):
    ec2 = aws_client("ec2", aws_endpoint)
    autoscaling = aws_client("autoscaling", aws_endpoint)
    suffix = uuid.uuid4().hex[:8]
    ec2.create_launch_template(
        LaunchTemplateName=f"lt-{suffix}", LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "g5.xlarge"}
    )
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=f"asg-{suffix}",
        LaunchTemplate={"LaunchTemplateName": f"lt-{suffix}"},
        MinSize=1,
        MaxSize=1,
        DesiredCapacity=1,
        AvailabilityZones=["us-east-1a"],
    )
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[f"asg-{suffix}"])["AutoScalingGroups"][0]
    instance_id = group["Instances"][0]["InstanceId"]
    health = AutoScalingHealth(autoscaling)
    assert health.set_unhealthy(instance_id) is True
    status = autoscaling.describe_auto_scaling_instances(InstanceIds=[instance_id])["AutoScalingInstances"][0]
    assert status["HealthStatus"] == "Unhealthy"
    assert health.set_unhealthy("i-00000000000000000") is False  # refused: logged, not raised
