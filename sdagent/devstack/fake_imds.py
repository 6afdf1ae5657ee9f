"""A small scriptable fake of the EC2 instance metadata service, for tests and demos.

It covers what ec2-metadata-mock (AEMM) cannot: 429/503 bursts, slow answers, malformed bodies,
token expiry and invalidation, ``Warmed:*`` lifecycle states and maintenance events that change
state. IMDSv2 tokens work as on EC2: ``PUT /latest/api/token`` with a TTL of 1..21600 s, then every
GET carries the token or gets 401. Paths answer 404 until scripted.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import secrets
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sdagent.lifecycle.imds import MAX_TOKEN_TTL_S, TOKEN_HEADER, TOKEN_PATH, TOKEN_TTL_HEADER
from sdagent.lifecycle.notices import (
    LIFECYCLE_PATH,
    MAINTENANCE_PATH,
    MAINTENANCE_TIME_FORMAT,
    REBALANCE_PATH,
    SPOT_PATH,
)

IDENTITY_DOCUMENT_PATH = "/latest/dynamic/instance-identity/document"


@dataclass(frozen=True)
class Reply:
    """One scripted answer: status, body, and how long to wait before sending it."""

    status: int = 200
    body: str = ""
    delay_s: float = 0.0


@dataclass(frozen=True)
class Request:
    """A request the fake received (for assertions)."""

    method: str
    path: str
    token: str | None


@dataclass
class _Routes:
    standing: dict[str, Reply] = field(default_factory=dict)
    queued: dict[str, deque[Reply]] = field(default_factory=lambda: defaultdict(deque))

    def next_reply(self, path: str) -> Reply | None:
        queue = self.queued.get(path)
        if queue:
            return queue.popleft()
        return self.standing.get(path)


class FakeImds:
    """The fake IMDS on a loopback port. ``clock`` (monotonic seconds) decides token expiry."""

    def __init__(self, *, require_token: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.require_token = require_token
        self._clock = clock
        self._lock = threading.Lock()
        self._routes = _Routes()
        self._tokens: dict[str, float] = {}  # token -> expiry on self._clock
        self.requests: list[Request] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- server ------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeImds has not been started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeImds:
        if self._server is not None:
            return self
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True  # a slow scripted reply must not hold up stop()
        # A short poll interval: shutdown() waits for serve_forever to notice, 0.5 s by default.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-imds", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> FakeImds:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- scripting ---------------------------------------------------------------------------

    def set(self, path: str, body: str = "", status: int = 200, *, delay_s: float = 0.0) -> None:
        """Answer ``path`` with this reply from now on (after any queued ones)."""
        with self._lock:
            self._routes.standing[path] = Reply(status, body, delay_s)

    def script(self, path: str, *replies: Reply) -> None:
        """Answer the next requests for ``path`` (the token path too) with ``replies``, in order."""
        with self._lock:
            self._routes.queued[path].extend(replies)

    def burst(self, path: str, status: int, count: int) -> None:
        """The next ``count`` requests for ``path`` get ``status`` (e.g. a 429 or 503 burst)."""
        self.script(path, *[Reply(status, f"{status}\n")] * count)

    def remove(self, path: str) -> None:
        """``path`` answers 404 again, as when a notice has not been posted."""
        with self._lock:
            self._routes.standing.pop(path, None)
            self._routes.queued.pop(path, None)

    def invalidate_tokens(self) -> None:
        """Forget every issued token, as if they had expired: the next GETs get 401."""
        with self._lock:
            self._tokens.clear()

    # -- notices in IMDS's own formats -------------------------------------------------------

    def spot(self, action: str, at: datetime | str) -> None:
        self.set(SPOT_PATH, json.dumps({"action": action, "time": _rfc3339(at)}))

    def rebalance(self, notice_time: datetime | str) -> None:
        self.set(REBALANCE_PATH, json.dumps({"noticeTime": _rfc3339(notice_time)}))

    def lifecycle(self, state: str) -> None:
        self.set(LIFECYCLE_PATH, state)

    def maintenance(self, events: Iterable[dict]) -> None:
        self.set(MAINTENANCE_PATH, json.dumps(list(events), indent=1))

    def identity(self, instance_id: str, instance_type: str, region: str, zone: str | None = None) -> None:
        zone = zone or f"{region}a"
        document = {"instanceId": instance_id, "instanceType": instance_type, "region": region,
                    "availabilityZone": zone, "accountId": "123456789012"}  # fmt: skip
        self.set(IDENTITY_DOCUMENT_PATH, json.dumps(document))
        for path, value in (("instance-id", instance_id), ("instance-type", instance_type),
                            ("placement/region", region), ("placement/availability-zone", zone)):  # fmt: skip
            self.set(f"/latest/meta-data/{path}", value)

    # -- inspection --------------------------------------------------------------------------

    def count(self, path: str, method: str = "GET") -> int:
        with self._lock:
            return sum(1 for request in self.requests if request.path == path and request.method == method)

    # -- request handling (server threads) ---------------------------------------------------

    def _token_reply(self, ttl_header: str | None) -> tuple[Reply, dict[str, str]]:
        with self._lock:
            self.requests.append(Request("PUT", TOKEN_PATH, None))
            scripted = self._routes.next_reply(TOKEN_PATH)
            if scripted is not None:
                return scripted, {}
            try:
                ttl = int(ttl_header or "")
            except ValueError:
                return Reply(400, "missing or bad TTL header\n"), {}
            if not 1 <= ttl <= MAX_TOKEN_TTL_S:
                return Reply(400, "TTL out of range\n"), {}
            token = secrets.token_urlsafe(24)
            self._tokens[token] = self._clock() + ttl
            return Reply(200, token), {TOKEN_TTL_HEADER: str(ttl)}

    def _get_reply(self, path: str, token: str | None) -> Reply:
        with self._lock:
            self.requests.append(Request("GET", path, token))
            if self.require_token and not self._token_valid(token):
                return Reply(401, "Unauthorized\n")
            return self._routes.next_reply(path) or Reply(404, "Not Found\n")

    def _token_valid(self, token: str | None) -> bool:
        key = token or ""
        expiry = self._tokens.get(key)
        if expiry is None:
            return False
        if self._clock() >= expiry:
            del self._tokens[key]
            return False
        return True


def maintenance_event(
    event_id: str,
    state: str = "active",
    *,
    code: str = "system-reboot",
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> dict:
    """One scheduled-maintenance entry as IMDS writes it (times like "21 Jan 2019 09:00:43 GMT")."""
    not_before = not_before or datetime.now(UTC)
    not_after = not_after or not_before
    return {
        "Code": code,
        "Description": f"The instance is scheduled for {code}",
        "EventId": event_id,
        "NotBefore": not_before.astimezone(UTC).strftime(MAINTENANCE_TIME_FORMAT.replace("%Z", "GMT")),
        "NotAfter": not_after.astimezone(UTC).strftime(MAINTENANCE_TIME_FORMAT.replace("%Z", "GMT")),
        "State": state,
    }


def _rfc3339(value: datetime | str) -> str:
    if isinstance(value, str):
        return value
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _handler_for(fake: FakeImds) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path != TOKEN_PATH:
                self._send(Reply(405, "Method Not Allowed\n"), {})
                return
            self._send(*fake._token_reply(self.headers.get(TOKEN_TTL_HEADER)))

        def do_GET(self) -> None:  # noqa: N802
            self._send(fake._get_reply(self.path, self.headers.get(TOKEN_HEADER)), {})

        def _send(self, reply: Reply, headers: dict[str, str]) -> None:
            if reply.delay_s:
                time.sleep(reply.delay_s)
            body = reply.body.encode()
            # The client may have timed out and gone while we slept.
            with contextlib.suppress(OSError):
                self.send_response(reply.status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass  # tests assert on fake.requests instead

    return Handler
