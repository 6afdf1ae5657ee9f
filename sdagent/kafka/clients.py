"""librdkafka settings for each client the agent and its callers create, in one place.

Every setting that departs from librdkafka's default carries the reason; see docs/kafka.md.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from confluent_kafka import KafkaException

from sdagent.errors import KafkaUnavailable
from sdagent.kafka.config import KafkaConfig

_LIBRDKAFKA_LOG = logging.getLogger("sdagent.librdkafka")
_LOG = structlog.get_logger(__name__)
T = TypeVar("T")

LEDGER_FETCH_MIN_BYTES = 64 * 1024
LEDGER_FETCH_WAIT_MS = 100


def _base(kafka: KafkaConfig, client_id: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": kafka.bootstrap_servers,
        "client.id": client_id,
        # librdkafka's own log lines go through logging (and so into the structured log), not stderr.
        "logger": _LIBRDKAFKA_LOG,
        **(_msk_iam(kafka.msk_iam_region) if kafka.msk_iam_region else {}),
        **kafka.client_config,
    }


def _msk_iam(region: str) -> dict[str, Any]:
    """SASL/OAUTHBEARER with tokens from AWS's MSK IAM signer: a SigV4-presigned
    ``kafka-cluster:Connect`` request made with the default credentials (the instance role),
    valid 15 minutes. librdkafka calls ``oauth_cb`` at connect time and again before expiry."""
    from aws_msk_iam_sasl_signer import MSKAuthTokenProvider

    def oauth_cb(_config: str) -> tuple[str, float]:
        try:
            token, expiry_ms = MSKAuthTokenProvider.generate_auth_token(region)
        except Exception as exc:
            # Raising is the client's failure signal: it asks again 10 s later (no credentials
            # yet, IMDS briefly away). Logged here, where the reason is known. (With no credentials
            # at all, signer 1.0.2 fails with an AttributeError: the message says what it means.)
            _LOG.warning("kafka.msk_iam_token_failed", region=region, error=f"{type(exc).__name__}: {exc}")
            raise KafkaUnavailable(f"no MSK IAM token for {region}: are AWS credentials (the instance role) "
                                   f"available? {type(exc).__name__}: {exc}") from exc  # fmt: skip
        return token, expiry_ms / 1000  # the signer gives milliseconds; librdkafka wants seconds

    return {"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER", "oauth_cb": oauth_cb}


def producer_config(kafka: KafkaConfig, client_id: str) -> dict[str, Any]:
    """Results, replies and dead letters: durable and in order, sent at once."""
    return {
        **_base(kafka, client_id),
        # acks=all + idempotence: a result is durable before the job's offset is committed, and a
        # retried produce never duplicates or reorders it.
        "acks": "all",
        "enable.idempotence": True,
        # A caller may be waiting for the answer: do not hold records back to batch them.
        "linger.ms": 0,
    }


def submitter_config(kafka: KafkaConfig, client_id: str) -> dict[str, Any]:
    """Job submissions (client, gateway): as :func:`producer_config`; one job per batch for a
    share group."""
    config = producer_config(kafka, client_id)
    if kafka.consumption == "share":
        # A share group hands a whole producer batch to one consumer, which takes one job and
        # hands the rest back, each hand-back a delivery (docs/share-groups.md). The cost,
        # measured with bench/gateway_load.py: ~1290 -> ~900 submissions/s, p99 31 -> 60-70 ms;
        # so only in share mode, where batches cost deliveries.
        config["batch.num.messages"] = 1
    return config


def jobs_consumer_config(kafka: KafkaConfig, instance_id: str) -> dict[str, Any]:
    """The agent's member of the fleet's consumer group on the jobs topic."""
    config = {
        **_base(kafka, f"sdagent-{instance_id}"),
        "group.id": kafka.group_id,
        "group.protocol": kafka.group_protocol,
        # Offsets are committed by the agent itself, only after the job's result is durable.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # A new group must start from the oldest job, never skip the backlog.
        "auto.offset.reset": "earliest",
        # Partitions are paused while a job runs and pausing drops the prefetch: keep it small.
        # (queued.min.messages stays at its default: a low value makes librdkafka back off each
        # fetch by fetch.queue.backoff.ms, a second, as soon as one record waits.)
        "queued.max.messages.kbytes": 1024,
        # fetch.wait.max.ms stays at its default (500): measured with librdkafka 2.16, a lower value
        # delays the first fetch after resume() by ~800 ms (bench/pipeline.py shows it).
    }
    if kafka.group_protocol == "consumer":
        # Range assigns each topic's partitions over the members on its own, so every member holds
        # jobs-topic partitions and priority-lane partitions alike; "uniform" balances the count
        # over both topics, and one member could hold only the lane (docs/delivery.md#priority).
        config.setdefault("group.remote.assignor", "range")
    if kafka.group_protocol == "classic":
        # Incremental rebalancing: a scale event moves only the partitions that must move
        # (kafka.client_config may choose another assignor).
        config.setdefault("partition.assignment.strategy", "cooperative-sticky")
    if kafka.static_membership:
        config["group.instance.id"] = instance_id
    return config


def share_consumer_config(kafka: KafkaConfig, instance_id: str, group_id: str) -> dict[str, Any]:
    """The agent's member of one of the fleet's share groups: one job taken per poll, settled
    explicitly."""
    return {
        **_base(kafka, f"sdagent-{instance_id}"),
        "group.id": group_id,
        # Accepted only once the answer is durable, released when taken back (docs/share-groups.md).
        "share.acknowledgement.mode": "explicit",
        # One job per poll (best effort: the broker hands over whole producer batches).
        "max.poll.records": 1,
        # No poll while a job runs (its record stays unacknowledged): the member must outlive the
        # longest job, which the lock bounds.
        "max.poll.interval.ms": int(max(300.0, kafka.share.lock_duration_s + 60.0) * 1000),
        # A consumer whose poll came back empty keeps its fetch open this long and acquires what
        # arrives meanwhile, even once the agent has taken a job from its other lane: no longer
        # than the intake's idle poll (0.1 s), so nothing is acquired after the poll returned.
        "fetch.wait.max.ms": 100,
    }


def reader_config(kafka: KafkaConfig, purpose: str) -> dict[str, Any]:
    """A consumer that assigns partitions itself (no group membership, never commits)."""
    return {
        **_base(kafka, f"sdagent-{purpose}"),
        # librdkafka wants a group id even for assign(); it is never joined or committed to.
        "group.id": f"sdagent-{purpose}-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "latest",
    }


def committed_reader_config(kafka: KafkaConfig) -> dict[str, Any]:
    """A consumer of the fleet's group that never subscribes (so never joins it): it only reads
    the group's committed offsets, for the backlog metric (sdagent.metrics.lag)."""
    return {
        **_base(kafka, "sdagent-backlog"),
        "group.id": kafka.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
    }


def ledger_reader_config(kafka: KafkaConfig) -> dict[str, Any]:
    """The agent's reader of every answer and cancel request of the fleet: batched fetches.

    With librdkafka's defaults (fetch.min.bytes=1) every record produced to the results topic ends
    the ledger's waiting fetch at the broker and a new one is sent: a request per record per agent,
    and the results topic gets two or three records a job. The ledger needs no record at once: it is read
    before a redelivered job runs (the catch-up waits for it) and for cancel requests. So the
    broker answers once it has LEDGER_FETCH_MIN_BYTES or after LEDGER_FETCH_WAIT_MS, whichever
    comes first: a cancel or a catch-up waits at most that long more (docs/kafka.md).
    """
    return {
        **reader_config(kafka, "ledger"),
        "fetch.min.bytes": LEDGER_FETCH_MIN_BYTES,
        "fetch.wait.max.ms": LEDGER_FETCH_WAIT_MS,
        **kafka.client_config,  # an operator's explicit choice still wins
    }


def webhooks_consumer_config(kafka: KafkaConfig, member_id: str, start_from: str = "latest") -> dict[str, Any]:
    """A gateway's member of the webhook senders' group on the results topic."""
    return {
        **_base(kafka, f"sdagent-webhooks-{member_id}"),
        "group.id": f"{kafka.group_id}-webhooks",
        # The dispatcher stores a record's offset once its webhook was delivered or given up on;
        # librdkafka commits what is stored every 5 s and on close and rebalance (not per record:
        # at 100 jobs/s that would be hundreds of commits a second).
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
        # "latest": a new group sends the webhooks of what is answered from now on.
        "auto.offset.reset": start_from,
    }


def admin_config(kafka: KafkaConfig) -> dict[str, Any]:
    return _base(kafka, "sdagent-admin")


def with_metadata_retries(query: Callable[[], T], timeout_s: float = 10.0, pause_s: float = 0.2) -> T:
    """Run a metadata query, retrying what a fresh topic or a restarting broker answers for a
    moment (NOT_LEADER_FOR_PARTITION, leader not available...): worth waiting out, not failing."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return query()
        except KafkaException as exc:
            if exc.args[0].fatal() or time.monotonic() >= deadline:
                raise
            _LOG.info("kafka.metadata_retry", error=str(exc))
            time.sleep(pause_s)
