"""The gateway against clients that misbehave on the wire: idle and slow connections, a slow body,
a body declared too large, a client gone mid-body. Served by `sdagent gateway` (real uvicorn)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest

from sdagent.devstack.kafka import free_loopback_port
from sdagent.devstack.stack import write_config
from sdagent.gateway.auth import hash_key

pytestmark = pytest.mark.integration

KEY = "sdk_test-key-for-the-wire-tests"
TIMEOUT_S = 1.0  # headers, body and keep-alive deadlines of the gateway under test


@contextmanager
def served(pipeline, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    config = json.loads(json.dumps(pipeline.config))
    port = free_loopback_port()
    config["gateway"] = {
        "api_keys": [{"name": "tests", "sha256": hash_key(KEY)}],
        "port": port,
        "headers_timeout_s": TIMEOUT_S,
        "body_timeout_s": TIMEOUT_S,
        "keep_alive_timeout_s": 1,
    }
    config["logging"] = {"format": "json"}
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "sdagent", "gateway", "--config", str(write_config(config, tmp_path / "gw.toml"))],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            yield port, log_path
        finally:
            process.terminate()
            process.wait(30)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True once the server closed the connection (recv reads EOF) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def response_head(sock: socket.socket) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


def post_head(length: int) -> bytes:
    return (
        f"POST /v1/jobs HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def log_events(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]


def test_misbehaving_clients_are_cut_off_and_leave_no_error_behind(pipeline, tmp_path):
    pipeline.start_agent()
    with served(pipeline, tmp_path) as (port, log_path):
        # A connection that never says anything is closed.
        idle = connect(port)
        assert closed_within(idle, TIMEOUT_S + 3)

        # Headers one line at a time, never finished (slowloris): closed, however busy it looks.
        slow = connect(port)
        slow.sendall(b"POST /v1/jobs HTTP/1.1\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < TIMEOUT_S + 3 and not closed:
            try:
                slow.sendall(b"X-Drip: 1\r\n")
            except OSError:
                closed = True
                break
            slow.settimeout(0.3)
            with suppress(TimeoutError):
                closed = slow.recv(1) == b""
        assert closed

        # A body that stalls halfway is answered 408.
        stalled = connect(port)
        stalled.sendall(post_head(100) + b'{"model"')
        since = time.monotonic()
        head = response_head(stalled)
        assert head.startswith("HTTP/1.1 408") and time.monotonic() - since < TIMEOUT_S + 3

        # A body declared at a terabyte is refused at once, before a byte of it is read.
        huge = connect(port)
        since = time.monotonic()
        huge.sendall(post_head(1 << 40))
        head = response_head(huge)
        assert head.startswith("HTTP/1.1 413") and time.monotonic() - since < 1.0
        assert "connection: close" in head.lower() and closed_within(huge, 3)

        # A client that goes away mid-body is an event, not an error with a traceback.
        gone = connect(port)
        gone.sendall(post_head(1000) + b'{"model": "sd15')
        time.sleep(0.2)
        gone.close()
        time.sleep(0.5)

        # And the gateway still serves.
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/jobs?wait=20", headers={"Authorization": f"Bearer {KEY}"},
                            json={"model": "sd15.safetensors", "prompt": "p", "width": 64, "height": 64, "steps": 2},
                            timeout=30)  # fmt: skip
        assert answer.status_code == 200
    events = log_events(log_path)
    names = [event.get("event") for event in events]
    assert "gateway.connection_closed" in names and "gateway.body_too_slow" in names
    assert "gateway.client_disconnected" in names
    errors = [event for event in events if event.get("level") in ("error", "critical")]
    assert errors == []
    assert "Traceback" not in log_path.read_text()
