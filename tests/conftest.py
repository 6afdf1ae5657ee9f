"""Shared fixtures: a real Kafka broker and a moto server, started lazily once per session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdagent.devstack.kafka import KafkaBroker, broker_from_env
from sdagent.devstack.moto import MotoServer, aws_client

INTEGRATION_DIR = Path(__file__).parent / "integration"
CONFORMANCE_DIR = Path(__file__).parent / "conformance"
CONFORMANCE_TIMEOUT_S = 600  # a module's first test waits for its WebUI to start


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration needs the real services: mark it so `-m` can select."""
    for item in items:
        if item.path.is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)
        if item.path.is_relative_to(CONFORMANCE_DIR):  # the real WebUIs, under the real agent
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.conformance)
            item.add_marker(pytest.mark.timeout(CONFORMANCE_TIMEOUT_S))


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """The session's broker: ours, or the one named by SDAGENT_TEST_KAFKA."""
    broker = broker_from_env() or KafkaBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.cleanup()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="session")
def aws_endpoint(moto_server: MotoServer) -> str:
    return moto_server.endpoint


@pytest.fixture
def s3_bucket(aws_endpoint: str) -> str:
    """A fresh, empty bucket for one test (moto's state is shared by the whole session)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    aws_client("s3", aws_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def topic_prefix() -> str:
    """A unique topic-name prefix, so each test works on fresh topics of the shared broker."""
    return f"t{uuid.uuid4().hex[:8]}."
