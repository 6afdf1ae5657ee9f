"""The websocket a prompt is followed on, and what its messages say about the prompt."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from sdagent.backends.comfyui.errors import history_status

# ComfyUI's messages are small JSON; previews are binary frames of a few hundred kB.
MAX_WS_MESSAGE_BYTES = 16 * 1024 * 1024


class MessageSocket(Protocol):
    """What the follower needs of a websocket client (``websockets.sync.client.ClientConnection``).

    ``recv`` raises TimeoutError when nothing came in ``timeout`` seconds and any other exception
    when the connection is gone.
    """

    def recv(self, timeout: float | None = None) -> str | bytes: ...

    def close(self) -> None: ...


SocketFactory = Callable[[str, float], AbstractContextManager[MessageSocket]]
"""Open a websocket to ``url`` within ``timeout`` seconds (on the call or on entering), or raise;
leaving the context closes it."""


@contextlib.contextmanager
def connect_websocket(url: str, timeout: float) -> Iterator[MessageSocket]:
    """The default :data:`SocketFactory`: websockets' threaded client (it answers pings itself)."""
    from websockets.sync.client import connect

    with connect(url, open_timeout=timeout, close_timeout=timeout, max_size=MAX_WS_MESSAGE_BYTES) as websocket:
        yield websocket


@dataclass
class PromptWatch:
    """What the websocket told about one prompt."""

    prompt_id: str
    ended: bool = False
    interrupted: bool = False
    error: dict[str, Any] | None = None
    via_websocket: bool = False
    cached: list[str] = field(default_factory=list)
    node_ms: dict[str, float] = field(default_factory=dict)
    last_progress: tuple[int, int] | None = None
    _node: tuple[str, float] | None = None  # the node executing and since when

    def on_message(self, raw: str | bytes, now: float) -> tuple[int, int] | None:
        """Take one message in; returns (step, steps) for a new progress report."""
        if isinstance(raw, bytes):
            return None  # a preview image
        try:
            message = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
            return None
        kind, data = message.get("type"), message["data"]
        if data.get("prompt_id", self.prompt_id) != self.prompt_id:
            return None  # another client's prompt, broadcast
        self.via_websocket = True
        if kind == "execution_cached":
            self.cached = [str(node) for node in data.get("nodes") or []]
        elif kind == "executing":
            if self._node is not None:
                node, since = self._node
                self.node_ms[node] = round(self.node_ms.get(node, 0.0) + (now - since) * 1000.0, 1)
                self._node = None
            if data.get("node") is not None:
                self._node = (str(data["node"]), now)
            elif data.get("prompt_id") == self.prompt_id:
                self.ended = True
        elif kind == "execution_success":
            self.ended = True
        elif kind == "execution_error":
            self.error = data
        elif kind == "execution_interrupted":
            self.interrupted = True
        elif kind == "progress":
            step = (data.get("value"), data.get("max"))
            if isinstance(step[0], int) and isinstance(step[1], int) and step[1] > 0 and step != self.last_progress:
                self.last_progress = (step[0], step[1])
                return self.last_progress
        return None

    def timings(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Node timings seen on the websocket, and the execution time from the history's messages."""
        result: dict[str, Any] = {}
        if self.node_ms:
            result["node_ms"] = dict(self.node_ms)
        if self.cached:
            result["cached_nodes"] = list(self.cached)
        stamps = {}
        for message in history_status(entry).get("messages") or []:
            if isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict):
                stamps[message[0]] = message[1].get("timestamp")
        start, end = stamps.get("execution_start"), stamps.get("execution_success")
        if isinstance(start, (int, float)) and isinstance(end, (int, float)):
            result["execution_ms"] = end - start
        return result


def close_quietly(socket: MessageSocket) -> None:
    with contextlib.suppress(Exception):  # closing a dead socket may fail any way
        socket.close()
