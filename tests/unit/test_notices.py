"""The notice watcher against the project's fake IMDS: what becomes a notice, once, and what never does."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from sdagent.devstack.fake_imds import FakeImds, Reply, maintenance_event
from sdagent.lifecycle.imds import TOKEN_PATH, ImdsClient, ImdsUnavailable
from sdagent.lifecycle.notices import (
    BACKOFF_MAX_S,
    LIFECYCLE_PATH,
    MAINTENANCE_PATH,
    REBALANCE_PATH,
    SPOT_PATH,
    SPOT_WARNING,
    Notice,
    NoticeKind,
    NoticeWatcher,
    backoff_delay,
)

INTERVAL_S = 2.0
START = datetime(2030, 5, 1, 12, 0, 0, tzinfo=UTC)


class FakeWallClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Harness:
    """A fake IMDS, a client with a short timeout, and a watcher whose notices land in a list."""

    def __init__(self, fake: FakeImds) -> None:
        self.fake = fake
        self.clock = FakeWallClock()
        self.notices: list[Notice] = []
        self.client = ImdsClient(fake.endpoint, timeout_s=0.2)
        self.watcher = NoticeWatcher(self.client, INTERVAL_S, self.notices.append, clock=self.clock)

    def poll(self, times: int = 1) -> float:
        delay = 0.0
        for _ in range(times):
            delay = self.watcher.poll()
            self.clock.advance(delay)
        return delay


@pytest.fixture
def imds() -> Iterator[Harness]:
    with FakeImds() as fake:
        harness = Harness(fake)
        yield harness
        harness.client.close()


# -- spot interruptions ---------------------------------------------------------------------


def test_no_notice_while_every_path_answers_404(imds):
    assert imds.poll() == INTERVAL_S
    assert imds.notices == []
    assert imds.watcher.check_now() == []


@pytest.mark.parametrize("action", ["terminate", "stop"])
def test_spot_notice_keeps_the_given_time_two_minutes_ahead(imds, action):
    at = START + timedelta(seconds=110)
    imds.fake.spot(action, at)
    imds.poll()
    [notice] = imds.notices
    assert (notice.kind, notice.action, notice.deadline, notice.seen_at) == (
        NoticeKind.SPOT_INTERRUPTION, action, at, START
    )  # fmt: skip
    assert '"action"' in notice.raw


@pytest.mark.parametrize("offset_s", [-600, 0, 3600], ids=["past", "now", "hour-ahead"])
def test_spot_time_past_or_skewed_counts_from_when_it_was_seen(imds, offset_s):
    stated = START + timedelta(seconds=offset_s)
    imds.fake.spot("terminate", stated)
    imds.poll()
    assert imds.notices[0].deadline == START + SPOT_WARNING
    assert imds.notices[0].stated_time == stated  # kept, e.g. to tell a notice older than this boot


def test_spot_time_that_does_not_parse_counts_from_when_it_was_seen(imds):
    imds.fake.set(SPOT_PATH, '{"action": "terminate", "time": "soon"}')
    imds.poll()
    assert imds.notices[0].deadline == START + SPOT_WARNING


def test_hibernate_has_no_two_minute_warning(imds):
    imds.fake.spot("hibernate", START + timedelta(minutes=2))
    imds.poll()
    [notice] = imds.notices
    assert (notice.action, notice.deadline) == ("hibernate", START)


def test_the_same_notice_on_every_poll_is_announced_once(imds):
    imds.fake.spot("terminate", START + timedelta(minutes=2))
    imds.poll(times=5)
    assert len(imds.notices) == 1
    assert imds.fake.count(SPOT_PATH) == 5


def test_a_restated_spot_time_is_still_the_same_notice(imds):
    for second in range(4):  # AEMM without a pinned time restates it on every request
        imds.fake.spot("terminate", START + timedelta(seconds=100 + second))
        imds.poll()
    assert len(imds.notices) == 1
    assert imds.watcher.current_notices()[0].deadline == START + timedelta(seconds=100)


def test_a_different_action_is_a_new_notice(imds):
    imds.fake.spot("stop", START + timedelta(minutes=2))
    imds.poll()
    imds.fake.spot("terminate", START + timedelta(minutes=2))
    imds.poll()
    assert [n.action for n in imds.notices] == ["stop", "terminate"]


def test_a_notice_that_goes_away_and_comes_back_is_announced_again(imds):
    imds.fake.spot("stop", START + timedelta(minutes=2))
    imds.poll()
    imds.fake.remove(SPOT_PATH)
    imds.poll()
    assert imds.watcher.current_notices() == []
    imds.fake.spot("stop", START + timedelta(minutes=4))
    imds.poll()
    assert [n.action for n in imds.notices] == ["stop", "stop"]


# -- rebalance ------------------------------------------------------------------------------


def test_rebalance_recommendation_is_a_notice_without_deadline(imds):
    imds.fake.rebalance(START - timedelta(seconds=5))
    imds.poll(times=3)
    [notice] = imds.notices
    assert (notice.kind, notice.deadline, notice.action) == (NoticeKind.REBALANCE, None, None)
    assert notice.stated_time == START - timedelta(seconds=5)


def test_rebalance_and_interruption_together_are_two_notices(imds):
    imds.fake.rebalance(START)
    imds.fake.spot("terminate", START + timedelta(minutes=2))
    imds.poll()
    assert {n.kind for n in imds.notices} == {NoticeKind.REBALANCE, NoticeKind.SPOT_INTERRUPTION}


# -- Auto Scaling target lifecycle state -----------------------------------------------------


def test_lifecycle_transitions_from_warm_pool_to_in_service_to_terminated(imds):
    for state in ["Warmed:Stopped", "Warmed:Stopped", "Warmed:Running", "InService", "InService", "Terminated"]:
        imds.fake.lifecycle(state)
        imds.poll()
    assert [n.state for n in imds.notices] == ["Warmed:Stopped", "Warmed:Running", "InService", "Terminated"]
    assert {n.kind for n in imds.notices} == {NoticeKind.LIFECYCLE}


def test_lifecycle_404_is_unknown_never_terminated(imds):
    imds.poll()
    assert imds.notices == []
    imds.fake.lifecycle("InService")
    imds.poll()
    imds.fake.remove(LIFECYCLE_PATH)
    imds.poll(times=2)
    imds.fake.lifecycle("InService")
    imds.poll()
    assert [n.state for n in imds.notices] == ["InService"]
    assert [n.state for n in imds.watcher.current_notices()] == ["InService"]


def test_lifecycle_body_that_is_not_a_state_is_ignored(imds):
    imds.fake.lifecycle("<html>oops</html>")
    with capture_logs() as logs:
        assert imds.poll() == INTERVAL_S
    assert imds.notices == []
    assert any(entry["event"] == "notices.malformed" for entry in logs)


# -- scheduled maintenance ------------------------------------------------------------------


def test_active_maintenance_event_is_a_notice_with_its_start_as_deadline(imds):
    not_before = START + timedelta(days=2)
    imds.fake.maintenance([maintenance_event("instance-event-1", code="instance-stop", not_before=not_before)])
    imds.poll(times=3)
    [notice] = imds.notices
    assert (notice.kind, notice.action, notice.state, notice.event_id) == (
        NoticeKind.MAINTENANCE, "instance-stop", "active", "instance-event-1"
    )  # fmt: skip
    assert (notice.deadline, notice.cleared) == (not_before, False)


def test_maintenance_already_due_counts_from_when_it_was_seen(imds):
    imds.fake.maintenance([maintenance_event("e-1", not_before=START - timedelta(hours=1))])
    imds.poll()
    assert imds.notices[0].deadline == START


@pytest.mark.parametrize("final_state", ["canceled", "completed"])
def test_canceled_or_completed_maintenance_is_a_cleared_notice(imds, final_state):
    imds.fake.maintenance([maintenance_event("e-1")])
    imds.poll()
    imds.fake.maintenance([maintenance_event("e-1", final_state)])
    imds.poll(times=3)
    assert [(n.state, n.cleared) for n in imds.notices] == [("active", False), (final_state, True)]
    assert imds.watcher.current_notices() == []


def test_maintenance_event_that_leaves_the_list_is_cleared(imds):
    imds.fake.maintenance([maintenance_event("e-1"), maintenance_event("e-2")])
    imds.poll()
    imds.fake.maintenance([maintenance_event("e-2")])
    imds.poll()
    assert [(n.event_id, n.state) for n in imds.notices] == [("e-1", "active"), ("e-2", "active"), ("e-1", "removed")]
    assert imds.notices[-1].cleared
    assert [n.event_id for n in imds.watcher.current_notices()] == ["e-2"]


def test_maintenance_first_seen_canceled_is_not_news(imds):
    imds.fake.maintenance([maintenance_event("e-1", "canceled")])
    imds.poll(times=2)
    imds.fake.maintenance([])
    imds.poll()
    assert imds.notices == []


# -- what is never a notice -----------------------------------------------------------------


def test_malformed_json_is_logged_once_and_ignored(imds):
    imds.fake.set(SPOT_PATH, '{"action": "termin')
    imds.fake.set(MAINTENANCE_PATH, "[{]")
    with capture_logs() as logs:
        assert imds.poll(times=3) == INTERVAL_S  # no backoff: IMDS answered
    assert imds.notices == []
    malformed = [entry["path"] for entry in logs if entry["event"] == "notices.malformed"]
    assert sorted(malformed) == [MAINTENANCE_PATH, SPOT_PATH]
    imds.fake.spot("terminate", START + timedelta(minutes=2))
    imds.poll()
    assert [n.action for n in imds.notices] == ["terminate"]


def test_malformed_answer_keeps_the_notice_already_seen(imds):
    imds.fake.spot("terminate", START + timedelta(minutes=2))
    imds.poll()
    imds.fake.set(SPOT_PATH, "garbage")
    imds.poll()
    imds.fake.spot("terminate", START + timedelta(minutes=2))
    imds.poll()
    assert len(imds.notices) == 1
    assert len(imds.watcher.current_notices()) == 1


@pytest.mark.parametrize("status", [429, 500, 503])
def test_error_bursts_back_off_and_never_become_notices(imds, status):
    imds.fake.burst(SPOT_PATH, status, 3)
    with capture_logs() as logs:
        delays = [imds.poll() for _ in range(4)]
    assert delays == [*(backoff_delay(failures, INTERVAL_S) for failures in (1, 2, 3)), INTERVAL_S]
    assert imds.notices == []
    events = [entry["event"] for entry in logs]
    assert events.count("notices.poll_failed") == 3 and "notices.poll_recovered" in events


def test_a_notice_after_an_outage_is_announced(imds):
    imds.fake.burst(SPOT_PATH, 503, 2)
    imds.poll(times=2)
    imds.fake.spot("terminate", START + timedelta(minutes=2))
    imds.poll()
    assert [n.action for n in imds.notices] == ["terminate"]


def test_throttling_skips_the_rest_of_the_poll(imds):
    imds.fake.burst(SPOT_PATH, 429, 1)
    imds.poll()
    assert imds.fake.count(LIFECYCLE_PATH) == imds.fake.count(MAINTENANCE_PATH) == 0


def test_a_failing_path_does_not_hide_the_others(imds):
    imds.fake.set(MAINTENANCE_PATH, "", status=500)
    imds.fake.spot("terminate", START + timedelta(minutes=2))
    delay = imds.poll()
    assert [n.kind for n in imds.notices] == [NoticeKind.SPOT_INTERRUPTION]
    assert delay == backoff_delay(1, INTERVAL_S)


def test_unexpected_status_is_a_failed_poll_not_a_notice(imds):
    imds.fake.set(SPOT_PATH, "forbidden", status=403)
    assert imds.poll() == backoff_delay(1, INTERVAL_S)
    assert imds.notices == []


def test_timeouts_back_off_and_never_become_notices(imds):
    imds.fake.set(SPOT_PATH, '{"action": "terminate"}', delay_s=0.5)  # longer than the 0.2 s timeout
    assert imds.poll() == backoff_delay(1, INTERVAL_S)
    assert imds.notices == []
    assert imds.fake.count(REBALANCE_PATH) == 0  # an unreachable IMDS is not asked four times


def test_token_refusal_is_recovered_within_the_poll(imds):
    imds.fake.spot("terminate", START + timedelta(minutes=2))
    imds.poll()
    imds.fake.invalidate_tokens()
    assert imds.poll() == INTERVAL_S
    assert len(imds.notices) == 1
    assert imds.fake.count(TOKEN_PATH, "PUT") == 2


def test_backoff_grows_and_is_bounded():
    delays = [backoff_delay(failures, 0.5) for failures in range(0, 10)]
    assert delays[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert max(delays) == BACKOFF_MAX_S
    assert backoff_delay(1, 30.0) == 30.0  # never polls faster than the interval


# -- start-up check and the thread ----------------------------------------------------------


def test_check_now_returns_what_is_pending_and_the_watcher_does_not_repeat_it(imds):
    imds.fake.spot("stop", START + timedelta(minutes=1))
    imds.fake.lifecycle("Warmed:Running")
    pending = imds.watcher.check_now()
    assert {(n.kind, n.action, n.state) for n in pending} == {
        (NoticeKind.SPOT_INTERRUPTION, "stop", None), (NoticeKind.LIFECYCLE, None, "Warmed:Running")
    }  # fmt: skip
    imds.poll(times=2)
    assert imds.notices == []  # already handed over by check_now
    imds.fake.lifecycle("InService")
    imds.poll()
    assert [n.state for n in imds.notices] == ["InService"]


def test_check_now_raises_when_imds_cannot_answer(imds):
    imds.fake.spot("terminate", START + timedelta(minutes=2))
    imds.fake.burst(MAINTENANCE_PATH, 503, 1)
    with pytest.raises(ImdsUnavailable):
        imds.watcher.check_now()
    assert imds.watcher.check_now()[0].action == "terminate"  # nothing was lost by the failure


def test_watcher_thread_survives_errors_and_callback_failures():
    announced = threading.Event()
    calls: list[Notice] = []

    def on_notice(notice: Notice) -> None:
        calls.append(notice)
        if len(calls) == 1:
            raise RuntimeError("the agent's handler failed")
        announced.set()

    with FakeImds() as fake, ImdsClient(fake.endpoint, timeout_s=0.5) as client:
        fake.script(TOKEN_PATH, Reply(503))  # the first poll fails: one backoff of 1 s
        fake.rebalance(START)
        fake.spot("terminate", START + timedelta(minutes=2))
        watcher = NoticeWatcher(client, 0.02, on_notice).start()
        try:
            assert announced.wait(10), "the second notice never arrived"
        finally:
            started = time.monotonic()
            watcher.stop()
        assert time.monotonic() - started < 1.0
    assert {n.kind for n in calls} == {NoticeKind.REBALANCE, NoticeKind.SPOT_INTERRUPTION}


def test_interval_must_be_positive():
    with pytest.raises(ValueError):
        NoticeWatcher(None, 0)
