"""ComfyUI's websocket (``/ws?clientId=``): one socket per client id, JSON ``{type, data}`` messages.

As in ``server.py``, a new socket sends ``status`` (with its ``sid``) at once, and a client that
reconnects while its prompt runs is told the node being executed. Previews are binary frames.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog
from aiohttp import web

log = structlog.get_logger(__name__, simulator=True)

# The send errors server.py's send_socket_catch_exception swallows (a client gone mid-send).
_SEND_ERRORS = (aiohttp.ClientError, ConnectionResetError, BrokenPipeError, ConnectionError, RuntimeError)


class SocketHub:
    """The connected clients; ``queue_info`` gives the ``status`` payload's ``exec_info``."""

    def __init__(self, queue_info: Callable[[], dict[str, Any]]) -> None:
        self._queue_info = queue_info
        self._sockets: dict[str, tuple[web.WebSocketResponse, web.Request]] = {}
        self.running_client: str | None = None  # the running prompt's client_id
        self.last_node: str | None = None  # the node it is executing

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        self._sockets[sid] = (ws, request)  # reusing a client id replaces the old socket
        log.info("sim.ws_connected", client_id=sid)
        try:
            await self.send("status", {"status": self._queue_info(), "sid": sid}, sid)
            if self.running_client == sid and self.last_node is not None:
                await self.send("executing", {"node": self.last_node}, sid)
            async for _ in ws:  # clients send nothing the server acts on
                pass
        finally:
            if self._sockets.get(sid, (None,))[0] is ws:
                del self._sockets[sid]
            log.info("sim.ws_disconnected", client_id=sid)
        return ws

    async def send(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        """Send to one client, or to every client when ``sid`` is None."""
        message = {"type": event, "data": data}
        for ws in self._targets(sid):
            try:
                await ws.send_json(message)
            except _SEND_ERRORS as exc:
                log.info("sim.ws_send_failed", error=str(exc))

    async def send_bytes(self, event: int, data: bytes, sid: str | None = None) -> None:
        """server.py's send_bytes: the event type as a big-endian int, then the data."""
        frame = struct.pack(">I", event) + data
        for ws in self._targets(sid):
            try:
                await ws.send_bytes(frame)
            except _SEND_ERRORS as exc:
                log.info("sim.ws_send_failed", error=str(exc))

    def _targets(self, sid: str | None) -> list[web.WebSocketResponse]:
        if sid is None:
            return [ws for ws, _ in self._sockets.values()]
        return [self._sockets[sid][0]] if sid in self._sockets else []

    async def send_status(self) -> None:
        await self.send("status", {"status": self._queue_info()})

    def drop(self, sid: str | None = None) -> int:
        """Cut sockets without a close frame, as a network failure would; returns how many."""
        targets = [sid] if sid is not None else list(self._sockets)
        dropped = 0
        for key in targets:
            entry = self._sockets.pop(key, None)
            if entry is None:
                continue
            transport = entry[1].transport
            if transport is not None:
                transport.abort()
                dropped += 1
        log.info("sim.ws_dropped", client_id=sid, sockets=dropped)
        return dropped

    async def close_all(self) -> None:
        for ws, _ in list(self._sockets.values()):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutdown")
        self._sockets.clear()
