"""Webhook delivery: a job's final status POSTed to the URL it named, signed, retried.

The gateways share the work as one consumer group over the results topic (``<group>-webhooks``),
so each job's webhook is sent by one replica. A replica sends up to ``concurrency`` webhooks at once,
so one slow or failing receiver does not hold up the others; a partition's offset moves past a
record only once it and every record before it were delivered or given up on (at-least-once: a
replica that dies or loses the partition mid-delivery leaves it to the next owner, which sends it
again; receivers dedupe by ``webhook-id``). Signatures follow the Standard
Webhooks scheme (docs/webhooks.md). Targets on loopback, private, link-local (the instance metadata
service at 169.254.169.254) and other non-public addresses are refused unless allowed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import socket
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from urllib.parse import urlsplit

import httpx
import structlog
import tenacity
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from sdagent.errors import WebhookError
from sdagent.gateway.config import WebhookConfig, secret_bytes
from sdagent.jobs import StatusEvent
from sdagent.kafka.clients import webhooks_consumer_config
from sdagent.kafka.config import KafkaConfig
from sdagent.kafka.ledger import terminal_status
from sdagent.kafka.records import position

log = structlog.get_logger(__name__)

POLL_S = 0.2
RETRYABLE_STATUS = {408, 425, 429}


class TargetRefused(WebhookError):
    """The webhook URL points where the gateway must not send requests."""


class DeliveryFailed(WebhookError):
    """The receiver did not take the webhook; ``retryable`` says whether to try again."""

    def __init__(self, message: str, *, retryable: bool, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


def sign(secrets: list[str], message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` per secret."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()).decode()
        for secret in secrets
    )


def check_target(url: str, allow_private: bool) -> None:
    """Refuse URLs whose host resolves to a non-public address (unless allowed)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused(f"not an http(s) URL: {url}")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except OSError as exc:
        raise TargetRefused(f"cannot resolve {parts.hostname}: {exc}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise TargetRefused(f"{parts.hostname} resolves to a non-public address ({address})")


class WebhookDispatcher:
    """Sends the webhooks of terminal status events, one consumer-group member per gateway."""

    def __init__(self, kafka: KafkaConfig, results_topic: str, config: WebhookConfig, *, member_id: str) -> None:
        self._config = config
        self._topic = results_topic
        self._consumer = Consumer(webhooks_consumer_config(kafka, member_id, config.start_from))
        self._http = httpx.Client(timeout=config.timeout_s, follow_redirects=False,
                                  limits=httpx.Limits(max_connections=config.concurrency))  # fmt: skip
        self._pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="gateway-webhook")
        # Per partition, its records in offset order with their delivery (None: nothing to send).
        self._pending: dict[int, deque[tuple[int, Future | None]]] = {}
        self._sending: set[Future] = set()  # deliveries not yet ended, whatever their partition
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.assigned = threading.Event()  # the group gave this member partitions
        self._count_lock = threading.Lock()
        self.delivered = 0
        self.given_up = 0

    def start(self) -> None:
        self._consumer.subscribe([self._topic], on_assign=lambda _consumer, _partitions: self.assigned.set(),
                                 on_revoke=self._forget, on_lost=self._forget)  # fmt: skip
        self._thread = threading.Thread(target=self._run, name="gateway-webhooks", daemon=True)
        self._thread.start()
        log.info("webhooks.started", topic=self._topic)

    def stop(self) -> None:
        self._stop.set()  # deliveries waiting to retry give up at once, uncommitted
        if self._thread is not None:
            self._thread.join(self._config.timeout_s + 5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._store_finished()
        self._consumer.close()  # commits the offsets stored so far
        self._http.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._wait_for_room()
                message = self._consumer.poll(POLL_S)
                if message is not None and message.error() is None:
                    _topic, partition, offset = position(message)
                    self._pending.setdefault(partition, deque()).append((offset, self._dispatch(message)))
                self._store_finished()
            except KafkaException as exc:  # the broker is away: librdkafka reconnects
                log.warning("webhooks.kafka_error", error=str(exc))
                self._stop.wait(1.0)
            except Exception:  # one bad record must not stop every webhook
                log.exception("webhooks.handle_failed")

    def _wait_for_room(self) -> None:
        """Read no further while ``concurrency`` webhooks are being sent (bounded: each delivery
        ends within its attempts' timeouts and backoffs, well inside max.poll.interval.ms)."""
        while not self._stop.is_set() and len(self._sending) >= self._config.concurrency:
            # Not a scan of _pending: behind a stuck receiver it holds every record read since.
            wait(list(self._sending), timeout=POLL_S, return_when=FIRST_COMPLETED)

    def _dispatch(self, message: Message) -> Future | None:
        """Start sending the record's webhook; None when it has none to send."""
        if terminal_status(message.headers()) is None:
            return None  # only final answers are sent
        try:
            event = StatusEvent.from_bytes(message.value())
        except ValueError:  # not JSON, not an event (pydantic's ValidationError is one), a tombstone
            log.warning("webhooks.bad_record", offset=message.offset())
            return None
        if event.webhook is None:
            return None
        delivery = self._pool.submit(self._deliver_for_job, event)
        self._sending.add(delivery)
        delivery.add_done_callback(self._sending.discard)  # on the pool's thread, or here if done
        return delivery

    def _deliver_for_job(self, event: StatusEvent) -> bool:
        with structlog.contextvars.bound_contextvars(job_id=event.job_id):
            return self.deliver(event)

    def _store_finished(self) -> None:
        """Per partition, move the stored offset past the records whose webhook is settled, in
        order: a record still being sent holds back the ones after it, done or not."""
        settled: list[TopicPartition] = []
        for partition, records in self._pending.items():
            last = None
            while records and _settled(records[0][1]):
                last, _ = records.popleft()
            if last is not None:
                settled.append(TopicPartition(self._topic, partition, last + 1))
        if settled:
            self._consumer.store_offsets(offsets=settled)  # committed in the background

    def _forget(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Revoked or lost: what is settled is stored (revocation commits it); the rest is the
        next owner's to send, so its deliveries here no longer count for this member."""
        self._store_finished()
        for tp in partitions:
            self._pending.pop(tp.partition, None)

    def deliver(self, event: StatusEvent) -> bool:
        """POST ``event`` to its webhook, retried; True when the receiver took it."""
        if event.webhook is None:  # _dispatch sends only the events that name one
            return True
        url = event.webhook.url
        try:
            check_target(url, self._config.allow_private_targets)
            self._with_retries(lambda: self._post(url, event))
        except (TargetRefused, DeliveryFailed) as exc:
            with self._count_lock:
                self.given_up += 1
            log.warning("webhooks.given_up", url=_redacted(url), error=str(exc))
            return False
        with self._count_lock:
            self.delivered += 1
        log.info("webhooks.delivered", url=_redacted(url), status=event.status.value)
        return True

    def _post(self, url: str, event: StatusEvent) -> None:
        body = event.model_dump_json(exclude_none=True, exclude={"webhook"}).encode()
        message_id = f"{event.job_id}:{event.status.value}"  # the same on every retry and replica
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": message_id,
                   "webhook-timestamp": str(timestamp), "webhook-signature": sign(self._config.secrets, message_id,
                                                                                   timestamp, body)}  # fmt: skip
        try:
            response = self._http.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}", retryable=True) from exc
        if response.is_success:
            return
        retryable = response.status_code >= 500 or response.status_code in RETRYABLE_STATUS
        raise DeliveryFailed(f"HTTP {response.status_code}", retryable=retryable,
                             retry_after_s=_retry_after(response.headers.get("retry-after")))  # fmt: skip

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopping()

    def _with_retries(self, attempt) -> None:
        backoff = tenacity.wait_exponential_jitter(multiplier=0.5, max=self._config.max_backoff_s)

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            hinted = getattr(error, "retry_after_s", None)
            return min(hinted, self._config.max_backoff_s) if hinted else backoff(state)

        tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._config.max_attempts),
            wait=wait,
            retry=tenacity.retry_if_exception(lambda exc: isinstance(exc, DeliveryFailed) and exc.retryable),
            sleep=self._sleep,
            reraise=True,
        )(attempt)


class _Stopping(WebhookError):
    """The gateway stops during a retry's wait: leave the webhook uncommitted for the next owner."""


def _settled(delivery: Future | None) -> bool:
    """Nothing to send, or sent or given up on; a delivery cut short by a stop is not settled."""
    return delivery is None or (delivery.done() and not delivery.cancelled() and delivery.exception() is None)


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _redacted(url: str) -> str:
    """Scheme, host and path: a query string may carry the receiver's token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{parts.path}"
