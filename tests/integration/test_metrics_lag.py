"""The queue signal against the real broker: the jobs group's lag, published only by the holder of
partition 0, and landing in (moto's) CloudWatch as QueueBacklog by JobsTopic."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from structlog.testing import capture_logs

from sdagent.devstack.moto import DUMMY_CREDENTIALS, aws_client
from sdagent.metrics import names
from sdagent.metrics.clock import ScaledClock
from sdagent.metrics.cloudwatch import CloudWatchSink, cloudwatch_client
from sdagent.metrics.dimensions import InstanceIdentity
from sdagent.metrics.lag import LagReporter
from sdagent.metrics.publisher import MetricsPublisher

PARTITIONS = 3
PER_PARTITION = 10


@pytest.fixture
def admin(kafka_bootstrap) -> AdminClient:
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def jobs_topic(admin, kafka_bootstrap, topic_prefix) -> str:
    """A jobs topic with ten records on each of its three partitions."""
    topic = f"{topic_prefix}jobs"
    for future in admin.create_topics([NewTopic(topic, PARTITIONS, 1)]).values():
        future.result(30)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for partition in range(PARTITIONS):
        for index in range(PER_PARTITION):
            producer.produce(topic, value=f"job-{partition}-{index}".encode(), partition=partition)
    assert producer.flush(30) == 0
    return topic


def reader(kafka_bootstrap: str, group: str) -> Consumer:
    """The committed-offsets reader the agent builds: a consumer of ``group`` that never subscribes."""
    return Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})


def commit(kafka_bootstrap: str, group: str, offsets: list[TopicPartition]) -> None:
    """Commit offsets for ``group`` the way a member does after finishing jobs."""
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


def test_backlog_is_what_the_group_has_not_committed(admin, kafka_bootstrap, jobs_topic):
    group = f"sdagent-{uuid.uuid4().hex[:8]}"
    reporter = LagReporter(admin, reader(kafka_bootstrap, group), jobs_topic, group)
    assert reporter.backlog() == PARTITIONS * PER_PARTITION  # a new group starts at the oldest job
    commit(kafka_bootstrap, group, [TopicPartition(jobs_topic, 0, 4), TopicPartition(jobs_topic, 1, PER_PARTITION)])
    assert reporter.backlog() == (PER_PARTITION - 4) + 0 + PER_PARTITION


def test_jobs_removed_by_retention_are_not_backlog(admin, kafka_bootstrap, jobs_topic):
    group = f"sdagent-{uuid.uuid4().hex[:8]}"
    for future in admin.delete_records([TopicPartition(jobs_topic, 2, 7)]).values():
        future.result(30)
    assert LagReporter(admin, reader(kafka_bootstrap, group), jobs_topic, group).backlog() == 2 * PER_PARTITION + (
        PER_PARTITION - 7
    )


def test_only_the_holder_of_partition_zero_publishes(admin, kafka_bootstrap, jobs_topic):
    reporter = LagReporter(admin, reader(kafka_bootstrap, (g := f"sdagent-{uuid.uuid4().hex[:8]}")), jobs_topic, g)
    assert reporter.collect(60.0) == []
    reporter.set_holds_partition_zero(True)
    (datum,) = reporter.collect(60.0)
    assert datum.name == names.QUEUE_BACKLOG and datum.value == PARTITIONS * PER_PARTITION
    assert datum.dimensions == ((names.JOBS_TOPIC, jobs_topic),)
    reporter.set_holds_partition_zero(False)  # partition 0 moved to another member
    assert reporter.collect(120.0) == []


def test_a_missing_topic_publishes_nothing_and_logs_once(admin, kafka_bootstrap, topic_prefix):
    reporter = LagReporter(
        admin, reader(kafka_bootstrap, "sdagent"), f"{topic_prefix}missing", "sdagent", timeout_s=2.0
    )
    reporter.set_holds_partition_zero(True)
    with capture_logs() as logs:
        assert reporter.collect(60.0) == []
        assert reporter.collect(120.0) == []
    assert len([e for e in logs if e["event"] == "metrics.backlog_failed"]) == 1


def test_lag_of_a_consuming_member_goes_down_as_it_commits(admin, kafka_bootstrap, jobs_topic):
    group = f"sdagent-{uuid.uuid4().hex[:8]}"
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "group.protocol": "consumer",
        }
    )
    consumer.subscribe([jobs_topic])
    reporter = LagReporter(admin, reader(kafka_bootstrap, group), jobs_topic, group)
    try:
        done, deadline = 0, time.monotonic() + 60
        while done < 12 and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                consumer.commit(message=message, asynchronous=False)
                done += 1
        assert done == 12
        assert reporter.backlog() == PARTITIONS * PER_PARTITION - 12
    finally:
        consumer.close()


def test_queue_backlog_lands_in_cloudwatch_with_its_topic_dimension(admin, kafka_bootstrap, aws_endpoint, jobs_topic):
    namespace = f"SDAgentTest{uuid.uuid4().hex[:8]}"
    reporter = LagReporter(admin, reader(kafka_bootstrap, (g := f"sdagent-{uuid.uuid4().hex[:8]}")), jobs_topic, g)
    reporter.set_holds_partition_zero(True)
    publisher = MetricsPublisher(
        CloudWatchSink(cloudwatch_client("us-east-1", aws_endpoint, **DUMMY_CREDENTIALS), namespace),
        InstanceIdentity("i-0000000000000000a", "g5.xlarge", "sdagent-fleet"),
        lag=reporter,
        clock=ScaledClock(120),
    )
    publisher.start()
    deadline = time.monotonic() + 30
    while publisher.stats().delivered == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    publisher.stop()
    cloudwatch = aws_client("cloudwatch", aws_endpoint)
    (metric,) = cloudwatch.list_metrics(Namespace=namespace, MetricName=names.QUEUE_BACKLOG)["Metrics"]
    assert metric["Dimensions"] == [{"Name": "JobsTopic", "Value": jobs_topic}]
    now = datetime.now(UTC)
    values = cloudwatch.get_metric_data(
        MetricDataQueries=[{"Id": "b", "MetricStat": {"Metric": metric, "Period": 60, "Stat": "Maximum"}}],
        StartTime=now.replace(second=0, microsecond=0) - timedelta(hours=1),
        EndTime=now + timedelta(hours=1),
    )["MetricDataResults"][0]["Values"]
    assert values and set(values) == {float(PARTITIONS * PER_PARTITION)}


class NoCoordinatorRequests:
    """A real AdminClient without its coordinator-based offsets request: librdkafka 2.16.1 aborts
    the process when a broker goes away while one is in flight (docs/upstream/)."""

    def __init__(self, admin: AdminClient) -> None:
        self._admin = admin

    def __getattr__(self, name: str):
        if name == "list_consumer_group_offsets":
            raise AssertionError("the backlog must not use the admin coordinator request")
        return getattr(self._admin, name)


def test_backlog_reads_committed_offsets_without_the_admin_coordinator_request(admin, kafka_bootstrap, jobs_topic):
    group = f"sdagent-{uuid.uuid4().hex[:8]}"
    commit(kafka_bootstrap, group, [TopicPartition(jobs_topic, 0, 3)])
    reporter = LagReporter(NoCoordinatorRequests(admin), reader(kafka_bootstrap, group), jobs_topic, group)
    assert reporter.backlog() == PARTITIONS * PER_PARTITION - 3
