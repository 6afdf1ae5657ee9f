"""The pipeline under test: fresh topics on the session broker, agents on the simulated backend."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from sdagent.client import Client
from sdagent.config import Settings
from sdagent.devstack.stack import AgentThread, ensure_topics, local_aws_environment, settings_from, stack_config
from sdagent.jobs import StatusEvent


@dataclass
class Pipeline:
    """Topics, a client and in-process agents for one test; read back what landed on the topics."""

    settings: Settings
    config: dict
    client: Client
    agents: list[AgentThread] = field(default_factory=list)

    def start_agent(self, **sections: dict) -> AgentThread:
        config = json.loads(json.dumps(self.config))
        config["agent"]["instance_id"] = f"agent-{len(self.agents)}"
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        agent = AgentThread(settings_from(config)).start()
        self.agents.append(agent)
        return agent

    def jobs_partitions_held(self, agent: AgentThread) -> int:
        """Partitions of the jobs topic (not the priority lane) a partition-mode agent holds."""
        return sum(topic == self.settings.topics.jobs for topic, _ in agent.agent.intake._assigned)

    def produce_raw(self, value: bytes | None, key: bytes | None = None) -> None:
        producer = Producer({"bootstrap.servers": self.settings.kafka.bootstrap_servers})
        producer.produce(self.settings.topics.jobs, value=value, key=key)
        producer.flush(10)

    def read(self, topic: str, count: int, timeout_s: float = 30.0, match=lambda message: True) -> list:
        """The first ``count`` matching records of ``topic`` from its start (fewer on timeout)."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka.bootstrap_servers,
                "group.id": "test-reader",
                "enable.auto.commit": False,
            }
        )
        metadata = consumer.list_topics(topic, timeout=10)
        consumer.assign([TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions])
        found, deadline = [], time.monotonic() + timeout_s
        try:
            while len(found) < count and time.monotonic() < deadline:
                message = consumer.poll(0.2)
                if message is not None and message.error() is None and match(message):
                    found.append(message)
        finally:
            consumer.close()
        return found

    def events(self, job_id: str, until_terminal_count: int = 1, timeout_s: float = 30.0) -> list[StatusEvent]:
        """Every status event of ``job_id`` on the results topic, once the wanted number of
        terminal ones has landed (or on timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            messages = self.read(
                self.settings.topics.results, 10_000, timeout_s=1.0, match=lambda m: m.key() == job_id.encode()
            )
            events = [StatusEvent.from_bytes(m.value()) for m in messages]
            if sum(e.status.is_terminal for e in events) >= until_terminal_count or time.monotonic() > deadline:
                return events


INTAKE_MODES = ("partition", "share")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked ``both_intakes`` runs once per intake mode (partition-bound, share group)."""
    if "consumption" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_intakes"):
        metafunc.parametrize("consumption", INTAKE_MODES, indirect=True)


@pytest.fixture
def consumption(request: pytest.FixtureRequest) -> str:
    """The intake mode of the test's agents: "partition" unless the test runs in both."""
    return getattr(request, "param", "partition")


@pytest.fixture
def pipeline(kafka_bootstrap, aws_endpoint, s3_bucket, topic_prefix, consumption, monkeypatch) -> Iterator[Pipeline]:
    for name, value in local_aws_environment().items():
        monkeypatch.setenv(name, value)
    config = stack_config(
        kafka_bootstrap, aws_endpoint, s3_bucket, topic_prefix=topic_prefix, jobs_partitions=2, consumption=consumption
    )
    settings = settings_from(config)
    ensure_topics(settings)
    client = Client(settings.kafka, settings.topics)
    under_test = Pipeline(settings, config, client)
    try:
        yield under_test
    finally:
        for agent in under_test.agents:
            agent.stop()
        client.close()
