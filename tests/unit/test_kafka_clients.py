"""librdkafka settings per client: what departs from the defaults, and that an operator's wins."""

import base64
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from sdagent.config import load_settings
from sdagent.errors import ConfigError, KafkaUnavailable
from sdagent.kafka.clients import (
    LEDGER_FETCH_WAIT_MS,
    jobs_consumer_config,
    ledger_reader_config,
    producer_config,
    reader_config,
)
from sdagent.kafka.config import KafkaConfig


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


def test_msk_iam_signs_every_client_in_with_tokens_of_the_instance_credentials(monkeypatch):
    # Dummy credentials: the signer presigns locally, nothing is sent anywhere.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    kafka = KafkaConfig(msk_iam_region="eu-west-1", client_config={"ssl.ca.location": "/etc/ssl/certs/ca.pem"})
    for config in (producer_config(kafka, "p"), jobs_consumer_config(kafka, "i-1"), ledger_reader_config(kafka)):
        assert config["security.protocol"] == "SASL_SSL" and config["sasl.mechanism"] == "OAUTHBEARER"
        assert config["ssl.ca.location"] == "/etc/ssl/certs/ca.pem"  # the operator's settings stay

    token, expiry_s = producer_config(kafka, "p")["oauth_cb"]("")
    url = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    query = parse_qs(urlsplit(url).query)
    assert urlsplit(url).hostname == "kafka.eu-west-1.amazonaws.com"
    assert query["Action"] == ["kafka-cluster:Connect"] and "eu-west-1/kafka-cluster" in query["X-Amz-Credential"][0]
    assert time.time() < expiry_s < time.time() + 3600  # seconds since the epoch, not milliseconds


def test_an_msk_iam_token_that_cannot_be_made_is_reported_to_the_client(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role here
    oauth_cb = producer_config(KafkaConfig(msk_iam_region="us-east-1"), "p")["oauth_cb"]
    with pytest.raises(KafkaUnavailable, match="no MSK IAM token for us-east-1: are AWS credentials"):
        oauth_cb("")  # raising is the client's signal to ask again later


def test_a_bad_msk_region_names_its_key(tmp_path):
    path = tmp_path / "sdagent.toml"
    path.write_text('[kafka]\nmsk_iam_region = "Europe"\n')
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    assert raised.value.key == "kafka.msk_iam_region"


def test_submitters_send_one_job_per_batch_only_to_a_share_group():
    from sdagent.kafka.clients import submitter_config

    assert "batch.num.messages" not in submitter_config(KafkaConfig(consumption="partition"), "gw")
    assert submitter_config(KafkaConfig(consumption="share"), "gw")["batch.num.messages"] == 1
