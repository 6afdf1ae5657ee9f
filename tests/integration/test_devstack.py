"""The test harness itself: a real broker and a real moto server round-trip data."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from sdagent.devstack.kafka import KafkaBroker
from sdagent.devstack.moto import aws_client


def create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    futures[topic].result(timeout=10)


def produce(bootstrap: str, topic: str, value: bytes) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, value=value)
    assert producer.flush(10) == 0, "message was not delivered"


def consume_one(bootstrap: str, topic: str, timeout: float = 20.0) -> bytes:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"g-{uuid.uuid4().hex[:8]}",
            "group.protocol": "consumer",  # KIP-848, as the agent uses
            "auto.offset.reset": "earliest",
        }
    )
    try:
        consumer.subscribe([topic])
        message = consumer.poll(timeout)
        assert message is not None, f"no message on {topic} within {timeout}s"
        assert message.error() is None, message.error()
        return message.value()
    finally:
        consumer.close()


def test_broker_round_trips_a_message(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}roundtrip"
    create_topic(kafka_bootstrap, topic)

    produce(kafka_bootstrap, topic, b"hello")

    assert consume_one(kafka_bootstrap, topic) == b"hello"


@pytest.fixture
def own_broker():
    """A broker of this test's own, since restarting the session broker would disturb others."""
    with KafkaBroker() as broker:
        yield broker


def test_restart_keeps_topic_data(own_broker: KafkaBroker) -> None:
    bootstrap_before = own_broker.bootstrap
    create_topic(bootstrap_before, "durable")
    produce(bootstrap_before, "durable", b"survives")

    own_broker.restart()

    assert own_broker.bootstrap == bootstrap_before
    assert consume_one(own_broker.bootstrap, "durable") == b"survives"


def test_s3_put_get_round_trip(aws_endpoint: str, s3_bucket: str) -> None:
    s3 = aws_client("s3", aws_endpoint)

    s3.put_object(Bucket=s3_bucket, Key="outputs/image.png", Body=b"\x89PNG fake")

    body = s3.get_object(Bucket=s3_bucket, Key="outputs/image.png")["Body"].read()
    assert body == b"\x89PNG fake"


def test_the_session_moto_server_runs_through_the_nagle_free_launcher(moto_server):
    assert moto_server._process.args[1:3] == ["-m", "sdagent.devstack.moto_server"]
