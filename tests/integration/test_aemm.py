"""The IMDS client and notice watcher against the real amazon-ec2-metadata-mock (IMDSv2 required)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from structlog.testing import capture_logs

from sdagent.devstack.aemm import AemmServer, ensure_binary
from sdagent.lifecycle.imds import ImdsClient, InstanceIdentity, instance_identity
from sdagent.lifecycle.notices import SPOT_PATH, SPOT_WARNING, Notice, NoticeKind, NoticeWatcher

POLL_INTERVAL_S = 0.05


@pytest.fixture(scope="module", autouse=True)
def aemm_binary():
    """Build AEMM before the first test (once per machine; about a minute on a cold Go cache)."""
    return ensure_binary()


@pytest.fixture
def run_aemm() -> Iterator[Callable[[AemmServer], AemmServer]]:
    servers: list[AemmServer] = []

    def run(server: AemmServer) -> AemmServer:
        servers.append(server)
        return server.start()

    yield run
    for server in servers:
        server.stop()


class Watch:
    """A client and a watcher on one AEMM; notices collected in a list."""

    def __init__(self, endpoint: str, **client_options) -> None:
        self.client = ImdsClient(endpoint, **client_options)
        self.notices: list[Notice] = []
        self.watcher = NoticeWatcher(self.client, POLL_INTERVAL_S, self.notices.append)

    def poll_until(self, predicate: Callable[[list[Notice]], bool], timeout_s: float = 10.0) -> list[Notice]:
        deadline = time.monotonic() + timeout_s
        while not predicate(self.notices) and time.monotonic() < deadline:
            time.sleep(self.watcher.poll())
        return self.notices

    def close(self) -> None:
        self.watcher.stop()
        self.client.close()


@pytest.fixture
def watch() -> Iterator[Callable[[AemmServer], Watch]]:
    watches: list[Watch] = []

    def make(server: AemmServer, **client_options) -> Watch:
        watches.append(Watch(server.endpoint, **client_options))
        return watches[-1]

    yield make
    for one in watches:
        one.close()


def whole_seconds_from_now(seconds: float) -> datetime:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).replace(microsecond=0)


@pytest.mark.parametrize("action", ["terminate", "stop"])
def test_spot_interruption_notice_with_its_pinned_time(run_aemm, watch, action):
    at = whole_seconds_from_now(100)
    aemm = run_aemm(AemmServer.spot(action, at, rebalance_delay_s=3600))
    notices = watch(aemm).poll_until(lambda found: len(found) >= 1)
    [notice] = notices
    assert (notice.kind, notice.action, notice.deadline) == (NoticeKind.SPOT_INTERRUPTION, action, at)


def test_hibernate_notice_has_no_warning(run_aemm, watch):
    aemm = run_aemm(AemmServer.spot("hibernate", whole_seconds_from_now(120), rebalance_delay_s=3600))
    [notice] = watch(aemm).poll_until(lambda found: len(found) >= 1)
    assert (notice.action, notice.deadline) == ("hibernate", notice.seen_at)


def test_spot_notice_appears_after_404s_and_is_announced_once_across_polls(run_aemm, watch):
    aemm = run_aemm(AemmServer.spot("terminate", delay_s=2, rebalance_delay_s=3600))  # time not pinned
    one = watch(aemm)
    assert one.watcher.check_now() == []  # AEMM answers 404 until the delay has passed
    one.watcher.start()
    deadline = time.monotonic() + 10
    while not one.notices and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
    time.sleep(1.0)  # ~20 more polls, each with a restated time
    assert [(n.kind, n.action) for n in one.notices] == [(NoticeKind.SPOT_INTERRUPTION, "terminate")]
    # Unpinned, AEMM says "two minutes from this request": a plausible deadline, kept from the first poll.
    notice = one.notices[0]
    assert notice.seen_at < notice.deadline <= notice.seen_at + SPOT_WARNING + timedelta(seconds=2)


def test_rebalance_recommendation(run_aemm, watch):
    aemm = run_aemm(AemmServer.spot("terminate", delay_s=3600, rebalance_delay_s=0))
    one = watch(aemm)
    one.poll_until(lambda found: len(found) >= 1)
    one.poll_until(lambda found: False, timeout_s=0.3)
    assert [n.kind for n in one.notices] == [NoticeKind.REBALANCE]


def test_asg_target_lifecycle_state_transitions(run_aemm, watch):
    aemm = run_aemm(AemmServer.asg_lifecycle(termination_delay_s=2))
    notices = watch(aemm).poll_until(lambda found: len(found) >= 2)
    assert [n.kind for n in notices] == [NoticeKind.LIFECYCLE, NoticeKind.LIFECYCLE]
    assert [n.state for n in notices] == ["InService", "Terminated"]


def test_scheduled_maintenance_event(run_aemm, watch):
    not_before = whole_seconds_from_now(3600)
    aemm = run_aemm(AemmServer.maintenance("instance-stop", "active", not_before=not_before))
    [notice] = watch(aemm).poll_until(lambda found: len(found) >= 1)
    assert (notice.kind, notice.action, notice.state, notice.deadline) == (
        NoticeKind.MAINTENANCE, "instance-stop", "active", not_before
    )  # fmt: skip
    assert notice.event_id


def test_imdsv2_is_enforced_and_the_client_recovers_from_an_expired_token(run_aemm):
    aemm = run_aemm(AemmServer.spot("terminate", whole_seconds_from_now(120)))
    assert httpx.get(aemm.endpoint + SPOT_PATH, trust_env=False).status_code == 401  # no token, no answer

    # A client whose clock stands still keeps a 1 s token past its expiry: AEMM answers 401,
    # the client fetches a new token and retries.
    with ImdsClient(aemm.endpoint, token_ttl_s=1, clock=lambda: 0.0) as client:
        assert client.get(SPOT_PATH).status == 200
        time.sleep(1.1)
        with capture_logs() as logs:
            response = client.get(SPOT_PATH)
    assert response.status == 200 and '"terminate"' in response.text
    assert [entry["event"] for entry in logs].count("imds.token.rejected") == 1


def test_instance_identity_from_aemm(run_aemm):
    aemm = run_aemm(AemmServer.asg_lifecycle(termination_delay_s=3600))
    with ImdsClient(aemm.endpoint) as client:
        identity = instance_identity(client)
    assert identity == InstanceIdentity("i-1234567890abcdef0", "m4.xlarge", "us-east-1", "us-east-1f")
