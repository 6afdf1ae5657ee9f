"""sdagent.lifecycle.systemd against a real datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from sdagent.lifecycle.systemd import Notifier, from_environment


@pytest.fixture
def manager(tmp_path):
    """A bound datagram socket, as PID 1 holds one; yields (NOTIFY_SOCKET value, socket)."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def nothing_waiting(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        sock.recv(4096)
    except TimeoutError:
        return True
    return False


def test_ready_sends_ready_with_status(manager):
    address, sock = manager
    notifier = from_environment({"NOTIFY_SOCKET": address})
    assert notifier.ready("backend a1111 ready, 2 models warm")
    assert received(sock) == ["READY=1", "STATUS=backend a1111 ready, 2 models warm"]


def test_stopping_status_and_extend_timeout(manager):
    address, sock = manager
    notifier = Notifier(address)
    notifier.stopping()
    assert received(sock) == ["STOPPING=1"]
    notifier.status("draining: job j-1 released")
    assert received(sock) == ["STATUS=draining: job j-1 released"]
    notifier.extend_timeout(12.5)
    assert received(sock) == ["EXTEND_TIMEOUT_USEC=12500000"]


def test_status_text_is_kept_on_one_line(manager):
    address, sock = manager
    Notifier(address).status("line one\nREADY=1")
    assert received(sock) == ["STATUS=line one READY=1"]


def test_abstract_namespace_address_is_supported():
    name = f"sdagent-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert Notifier("@" + name).ready()
        assert received(sock) == ["READY=1"]
    finally:
        sock.close()


def test_without_notify_socket_every_call_is_a_no_op():
    notifier = from_environment({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.stopping()
    assert not notifier.status("x")
    assert not notifier.extend_timeout(5)
    assert not notifier.watchdog_ping()


@pytest.mark.parametrize("address", ["", "relative/path", "@", "vsock:2:1234"])
def test_unusable_addresses_disable_the_notifier(address):
    assert not Notifier(address).enabled


def test_watchdog_period_applies_only_to_the_named_pid():
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    assert from_environment(env).watchdog_period() == 30.0
    assert from_environment({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_period() == 30.0
    assert from_environment({**env, "WATCHDOG_PID": "1"}, pid=4242).watchdog_period() is None
    assert from_environment({"WATCHDOG_USEC": "nonsense"}).watchdog_period() is None
    assert from_environment({}).watchdog_period() is None


def test_watchdog_ping_is_rate_limited_to_a_quarter_period(manager):
    address, sock = manager
    now = [100.0]
    notifier = Notifier(address, watchdog_usec="20000000", clock=lambda: now[0])
    assert notifier.watchdog_ping()
    assert received(sock) == ["WATCHDOG=1"]
    now[0] += 4.9  # under 20 s / 4
    assert not notifier.watchdog_ping()
    assert nothing_waiting(sock)
    now[0] += 0.2
    assert notifier.watchdog_ping()
    assert received(sock) == ["WATCHDOG=1"]


def test_watchdog_ping_without_a_watchdog_sends_nothing(manager):
    address, sock = manager
    assert not Notifier(address).watchdog_ping()
    assert nothing_waiting(sock)


def test_a_vanished_socket_is_logged_not_raised(tmp_path):
    notifier = Notifier(str(tmp_path / "gone.sock"))
    assert notifier.enabled
    assert not notifier.ready()
    assert not notifier.stopping()  # and again, quietly
    notifier.close()
