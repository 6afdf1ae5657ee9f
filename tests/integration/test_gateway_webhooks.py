"""Webhook delivery on the real broker: terminal events with a webhook reach a loopback receiver
once, signed; failures are retried, then given up with the offset committed."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import threading
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from sdagent.devstack.process import wait_until
from sdagent.gateway.config import WebhookConfig
from sdagent.gateway.webhooks import TargetRefused, WebhookDispatcher, check_target, sign
from sdagent.jobs import Status, StatusEvent, Webhook
from sdagent.kafka.publisher import StatusPublisher

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"a-32-byte-secret-for-the-tests!!").decode()


class Receiver:
    """A loopback HTTP server answering each POST with the next planned status (200 after them)."""

    def __init__(self, statuses: list[int] | None = None, hold: threading.Event | None = None) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        planned = list(statuses or [])
        received = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["content-length"]))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                if hold is not None:
                    hold.wait(30)  # a slow receiver: answers once the test lets it
                self.send_response(planned.pop(0) if planned else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_port}/hook?token=abc"

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture
def receiver():
    made = []

    holds = []

    def make(statuses: list[int] | None = None, hold: threading.Event | None = None) -> Receiver:
        made.append(Receiver(statuses, hold))
        holds.append(hold)
        return made[-1]

    yield make
    for hold in holds:
        if hold is not None:
            hold.set()
    for server in made:
        server.close()


@pytest.fixture
def dispatcher(pipeline):
    started = []

    def start(**config) -> WebhookDispatcher:
        settings = WebhookConfig(enabled=True, secrets=[SECRET], allow_private_targets=True, max_backoff_s=0.2,
                                 start_from="earliest", **config)  # fmt: skip
        made = WebhookDispatcher(pipeline.settings.kafka, pipeline.settings.topics.results, settings,
                                 member_id=f"test-{len(started)}")  # fmt: skip
        made.start()
        started.append(made)
        return made

    yield start
    for made in started:
        made.stop()


def publish(pipeline, job_id: str, status: Status, url: str | None) -> None:
    producer = Producer({"bootstrap.servers": pipeline.settings.kafka.bootstrap_servers})
    event = StatusEvent(job_id=job_id, status=status, webhook=Webhook(url=url) if url else None)
    StatusPublisher(producer, pipeline.settings.topics, "agent-x").publish_durably(event, None)


def wait_assigned(made: WebhookDispatcher) -> None:
    assert made.assigned.wait(30)


def test_a_terminal_event_is_posted_once_and_signed(pipeline, receiver, dispatcher):
    target = receiver()
    made = dispatcher()
    wait_assigned(made)

    publish(pipeline, "hooked-1", Status.SUCCEEDED, target.url)

    assert wait_until(lambda: len(target.requests) == 1)
    headers, body = target.requests[0]
    assert headers["webhook-id"] == "hooked-1:succeeded"
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(base64.b64decode(SECRET[6:]), signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert StatusEvent.model_validate_json(body).status is Status.SUCCEEDED
    time.sleep(0.5)
    assert len(target.requests) == 1


def test_non_terminal_events_and_events_without_a_webhook_are_not_sent(pipeline, receiver, dispatcher):
    target = receiver()
    made = dispatcher()
    wait_assigned(made)

    publish(pipeline, "hooked-2", Status.STARTED, target.url)
    publish(pipeline, "hooked-3", Status.SUCCEEDED, None)
    publish(pipeline, "hooked-4", Status.FAILED, target.url)  # the marker that the others were read

    assert wait_until(lambda: len(target.requests) == 1)
    assert target.requests[0][0]["webhook-id"] == "hooked-4:failed"


def test_a_failing_receiver_is_retried_until_it_takes_the_webhook(pipeline, receiver, dispatcher):
    target = receiver([500, 503])
    made = dispatcher(max_attempts=5)
    wait_assigned(made)

    publish(pipeline, "hooked-5", Status.SUCCEEDED, target.url)

    assert wait_until(lambda: made.delivered == 1)
    assert [headers["webhook-id"] for headers, _ in target.requests] == ["hooked-5:succeeded"] * 3


def test_a_receiver_that_keeps_failing_is_given_up_and_the_offset_committed(pipeline, receiver, dispatcher):
    target = receiver([500] * 10)
    made = dispatcher(max_attempts=3)
    wait_assigned(made)

    publish(pipeline, "hooked-6", Status.SUCCEEDED, target.url)

    assert wait_until(lambda: made.given_up == 1)
    assert len(target.requests) == 3
    group = f"{pipeline.settings.kafka.group_id}-webhooks"
    reader = Consumer({"bootstrap.servers": pipeline.settings.kafka.bootstrap_servers, "group.id": group})
    partitions = [TopicPartition(pipeline.settings.topics.results, p) for p in range(2)]
    assert wait_until(lambda: sum(max(tp.offset, 0) for tp in reader.committed(partitions, timeout=5)) >= 1)
    reader.close()


def committed_total(pipeline) -> int:
    group = f"{pipeline.settings.kafka.group_id}-webhooks"
    reader = Consumer({"bootstrap.servers": pipeline.settings.kafka.bootstrap_servers, "group.id": group})
    try:
        partitions = [TopicPartition(pipeline.settings.topics.results, p) for p in range(2)]
        return sum(max(tp.offset, 0) for tp in reader.committed(partitions, timeout=5))
    finally:
        reader.close()


def test_a_slow_receiver_holds_up_neither_other_webhooks_nor_loses_its_own(pipeline, receiver, dispatcher):
    hold = threading.Event()
    slow, fast = receiver(hold=hold), receiver()
    made = dispatcher(concurrency=4, timeout_s=2)
    wait_assigned(made)
    before = committed_total(pipeline)

    publish(pipeline, "slow-1", Status.SUCCEEDED, slow.url)
    assert wait_until(lambda: len(slow.requests) == 1)
    for index in range(3):  # keyed by job id: some land behind the slow one on its partition
        publish(pipeline, f"fast-{index}", Status.SUCCEEDED, fast.url)

    assert wait_until(lambda: len(fast.requests) == 3, timeout_s=10)  # while slow-1 is still unanswered
    # The receiver records a request before its answer reaches the dispatcher, which counts it then.
    assert wait_until(lambda: made.delivered == 3, timeout_s=5) and not hold.is_set()
    # The gateway stops with slow-1 in flight: its offset, and those after it on its partition, stay
    # uncommitted; the next member sends it again, and only it.
    made.stop()
    hold.set()
    assert committed_total(pipeline) - before < 4
    again = dispatcher()
    assert wait_until(lambda: again.delivered >= 1, timeout_s=30)
    assert [headers["webhook-id"] for headers, _ in slow.requests].count("slow-1:succeeded") == 2


def test_a_client_error_is_not_retried(pipeline, receiver, dispatcher):
    target = receiver([410])
    made = dispatcher()
    wait_assigned(made)

    publish(pipeline, "hooked-7", Status.FAILED, target.url)

    assert wait_until(lambda: made.given_up == 1)
    assert len(target.requests) == 1


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:9/hook",
                                 "http://10.0.0.8/hook", "http://[::1]/hook", "file:///etc/passwd"])  # fmt: skip
def test_private_and_metadata_targets_are_refused(url):
    with pytest.raises(TargetRefused):
        check_target(url, allow_private=False)


def test_signatures_list_every_secret_for_rotation():
    second = "whsec_" + base64.b64encode(b"another-secret").decode()
    header = sign([SECRET, second], "id-1", 1_700_000_000, b"{}")
    assert len(header.split(" ")) == 2 and all(part.startswith("v1,") for part in header.split(" "))


def test_a_job_submitted_through_the_gateway_calls_its_webhook_when_done(pipeline, receiver):
    import json

    from fastapi.testclient import TestClient

    from sdagent.devstack.stack import settings_from
    from sdagent.gateway.auth import hash_key
    from sdagent.gateway.server import build_app

    target = receiver()
    config = json.loads(json.dumps(pipeline.config))
    config["gateway"] = {"api_keys": [{"name": "t", "sha256": hash_key("sdk_k")}],
                         "webhooks": {"enabled": True, "secrets": [SECRET], "allow_private_targets": True,
                                      "start_from": "earliest"}}  # fmt: skip
    pipeline.start_agent()
    with TestClient(build_app(settings_from(config))) as client:
        job = {"model": "sd15.safetensors", "width": 64, "height": 64, "steps": 2, "webhook": {"url": target.url}}
        accepted = client.post("/v1/jobs", json=job, headers={"X-API-Key": "sdk_k"})
        assert accepted.status_code == 202
        assert wait_until(lambda: len(target.requests) == 1, timeout_s=30)
    headers, body = target.requests[0]
    assert headers["webhook-id"] == f"{accepted.json()['job_id']}:succeeded"
    event = StatusEvent.model_validate_json(body)
    assert event.status is Status.SUCCEEDED and event.outputs and event.webhook is None  # not echoed back
