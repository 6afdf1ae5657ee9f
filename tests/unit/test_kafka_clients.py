"""librdkafka settings per client: what departs from the defaults, and that an operator's wins."""

from sdagent.config import KafkaConfig
from sdagent.kafka_clients import (
    LEDGER_FETCH_WAIT_MS,
    jobs_consumer_config,
    ledger_reader_config,
    producer_config,
    reader_config,
)


def test_the_ledger_asks_the_broker_to_batch_its_fetches_for_a_bounded_time():
    config = ledger_reader_config(KafkaConfig())
    # One fetch answered per record of the results topic is what this setting avoids.
    assert config["fetch.min.bytes"] > 1
    # A cancel request or a catch-up before a redelivered job waits at most this much more.
    assert config["fetch.wait.max.ms"] == LEDGER_FETCH_WAIT_MS <= 100
    assert config["enable.auto.commit"] is False and config["group.id"].startswith("sdagent-ledger-")


def test_clients_that_wait_for_one_record_do_not_batch():
    kafka = KafkaConfig()
    for config in (jobs_consumer_config(kafka, "i-1"), reader_config(kafka, "replies")):
        assert "fetch.min.bytes" not in config and "fetch.wait.max.ms" not in config
    assert producer_config(kafka, "p")["linger.ms"] == 0


def test_an_operators_client_config_wins_over_the_ledger_batching():
    kafka = KafkaConfig(client_config={"fetch.wait.max.ms": 20, "security.protocol": "SSL"})
    config = ledger_reader_config(kafka)
    assert config["fetch.wait.max.ms"] == 20 and config["security.protocol"] == "SSL"
