"""A FAKE of the Auto Scaling query API, only the lifecycle-action calls moto's server lacks.

moto answers CompleteLifecycleAction and RecordLifecycleActionHeartbeat with a 500, so the agent's
side of lifecycle hooks is tested against this small stand-in: a loopback HTTP server that speaks
the same form-encoded query protocol and XML answers as the real endpoint, enough for boto3.
"""

from __future__ import annotations

import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

_NAMESPACE = "http://autoscaling.amazonaws.com/doc/2011-01-01/"
_LIFECYCLE_CALLS = {"CompleteLifecycleAction", "RecordLifecycleActionHeartbeat"}


class FakeAutoScaling:
    """Records every call; lifecycle calls fail like AWS until :meth:`activate` opens an action."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self._active: set[tuple[str, str]] = set()  # (hook, instance id)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeAutoScaling:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def activate(self, hook: str, instance_id: str) -> None:
        """The group put the instance in a wait state: an action is now waiting for it."""
        with self._lock:
            self._active.add((hook, instance_id))

    def actions(self, name: str) -> list[dict[str, str]]:
        with self._lock:
            return [call for call in self.calls if call["Action"] == name]

    def _answer(self, params: dict[str, str]) -> tuple[int, str]:
        action = params.get("Action", "")
        with self._lock:
            self.calls.append(params)
            key = (params.get("LifecycleHookName", ""), params.get("InstanceId", ""))
            if action in _LIFECYCLE_CALLS and key not in self._active:
                return 400, _error("ValidationError", f"No active Lifecycle Action found with instance ID {key[1]}")
            if action == "CompleteLifecycleAction":
                self._active.discard(key)
        return 200, _success(action)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                params = {name: values[0] for name, values in parse_qs(body).items()}
                status, xml = fake._answer(params)
                payload = xml.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_args) -> None:
                pass

        return Handler


def _success(action: str) -> str:
    return (
        f'<{action}Response xmlns="{_NAMESPACE}"><{action}Result/>'
        f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata></{action}Response>"
    )


def _error(code: str, message: str) -> str:
    return (
        f'<ErrorResponse xmlns="{_NAMESPACE}"><Error><Type>Sender</Type><Code>{code}</Code>'
        f"<Message>{message}</Message></Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
    )
