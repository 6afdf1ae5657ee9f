"""The gateway's HTTP protocol: uvicorn's, plus a deadline for each request's headers.

uvicorn closes a keep-alive connection that stays idle after a response, but not one that never
finishes a request: a client can open connections and send nothing, or a header byte every few
seconds ("slowloris"), and hold them for ever. Here every connection must deliver a complete set
of request headers within ``headers_timeout_s`` of opening (and of its previous response), or it
is closed; the body has its own deadline in the app (``gateway.body_timeout_s``, answered 408).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = structlog.get_logger(__name__)


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that closes a connection whose request headers come too late."""

    headers_timeout_s: float = 10.0  # set per server by :func:`with_headers_timeout`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_deadline: asyncio.TimerHandle | None = None
        self._arm_headers_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_headers_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_headers_deadline()  # the next request on this connection gets the same time

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_headers_deadline()
        super().connection_lost(exc)

    def _arm_headers_deadline(self) -> None:
        self._disarm_headers_deadline()
        self._headers_deadline = self.loop.call_later(self.headers_timeout_s, self._headers_too_late)

    def _disarm_headers_deadline(self) -> None:
        deadline = getattr(self, "_headers_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._headers_deadline = None

    def _headers_too_late(self) -> None:
        self._headers_deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered: its own deadlines apply
        log.info("gateway.connection_closed", reason="no complete request headers in time",
                 timeout_s=self.headers_timeout_s, client=_client(self.client))  # fmt: skip
        self.transport.close()


def with_headers_timeout(timeout_s: float) -> type[DeadlineProtocol]:
    """The protocol class for one server (uvicorn takes a class, not an instance)."""
    return type("DeadlineProtocol", (DeadlineProtocol,), {"headers_timeout_s": timeout_s})


def _client(address: Any) -> str | None:
    return f"{address[0]}:{address[1]}" if address else None
