"""The HTTP plumbing the WebUI adapters share: one place turns transport failures into errors.

Only what every adapter needs lives here: sending a request so that a refused connection, a reset
or a timeout becomes :class:`~sdagent.errors.BackendUnavailable` (transient: the job loop retries),
and reading a JSON body. How a framework's error bodies map onto the error hierarchy stays in each
adapter, because A1111 and ComfyUI shape them differently.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from sdagent.errors import BackendUnavailable

Timeout = float | httpx.Timeout | None


def send(
    client: httpx.Client, method: str, url: str, *, what: str, timeout: Timeout = None, **kwargs: Any
) -> httpx.Response:
    """Send one request and return the response whatever its status.

    ``what`` names the call in error messages (``"POST /sdapi/v1/txt2img"``). ``timeout`` of None
    keeps the client's own; pass an :class:`httpx.Timeout` with ``read=None`` to wait without limit.
    """
    extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    try:
        return client.request(method, url, **extra, **kwargs)
    except httpx.TimeoutException as exc:
        raise BackendUnavailable(f"{what}: no answer in time ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:  # refused, reset, closed mid-answer, DNS
        raise BackendUnavailable(f"{what}: {type(exc).__name__}: {exc or 'connection failed'}") from exc


def json_of(response: httpx.Response) -> Any:
    """The response's JSON body, or None when it is empty or not JSON (a proxy's HTML page)."""
    if not response.content:
        return None
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
