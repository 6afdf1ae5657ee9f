"""Instance notices from IMDS: spot interruptions, rebalance recommendations, Auto Scaling target
lifecycle states and scheduled maintenance, turned into :class:`Notice` values.

This module only reports what IMDS says; what to do about a notice (stop intake, drain, resume) is
the agent's policy. :class:`NoticeWatcher` polls in a daemon thread and hands each *new* notice to a
callback once; :meth:`NoticeWatcher.check_now` answers "what is pending right now" at start-up.
"""

from __future__ import annotations

import enum
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import structlog

from sdagent.errors import SdagentError
from sdagent.lifecycle.imds import TOKEN_PATH, ImdsClient, ImdsError, ImdsResponse, ImdsUnavailable

log = structlog.get_logger(__name__)

SPOT_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
LIFECYCLE_PATH = "/latest/meta-data/autoscaling/target-lifecycle-state"
MAINTENANCE_PATH = "/latest/meta-data/events/maintenance/scheduled"

# AWS suggests polling every 5 s; 2 s (as NTH does) leaves more of the two-minute warning.
DEFAULT_INTERVAL_S = 2.0
# After a failed poll the next one waits BACKOFF_INITIAL_S, doubling per failure up to
# BACKOFF_MAX_S. The cap is far below the two-minute spot warning, so a notice that arrives during
# an IMDS outage is still seen with most of its warning left.
BACKOFF_INITIAL_S = 1.0
BACKOFF_FACTOR = 2.0
BACKOFF_MAX_S = 16.0
STOP_TIMEOUT_S = 5.0

# terminate and stop come two minutes ahead; a given time outside (seen, seen + warning +
# tolerance] is a skewed clock or a stale notice, and the warning then counts from when it was seen.
SPOT_WARNING = timedelta(minutes=2)
CLOCK_SKEW_TOLERANCE = timedelta(seconds=30)

SPOT_ACTIONS = ("terminate", "stop", "hibernate")
LIFECYCLE_IN_SERVICE = "InService"
LIFECYCLE_TERMINATED = "Terminated"
LIFECYCLE_WARMED_PREFIX = "Warmed:"
MAINTENANCE_ACTIVE = "active"
MAINTENANCE_REMOVED = "removed"  # an active event that left the list without saying canceled/completed
MAINTENANCE_TIME_FORMAT = "%d %b %Y %H:%M:%S %Z"  # e.g. "21 Jan 2019 09:00:43 GMT"

_LIFECYCLE_STATE = re.compile(r"[A-Za-z]+(:[A-Za-z]+)*")
_RAW_LOG_CHARS = 200


class NoticeKind(enum.StrEnum):
    SPOT_INTERRUPTION = "spot_interruption"
    REBALANCE = "rebalance"
    LIFECYCLE = "lifecycle"
    MAINTENANCE = "maintenance"


@dataclass(frozen=True)
class Notice:
    """One thing IMDS told us about this instance.

    - ``spot_interruption``: ``action`` is terminate, stop (the instance comes back later and the
      agent starts again) or hibernate (no two-minute warning: ``deadline`` is ``seen_at``).
    - ``rebalance``: elevated interruption risk; no deadline.
    - ``lifecycle``: ``state`` is the Auto Scaling *target* state (``InService``, ``Warmed:*``,
      ``Terminated``...); each change is a new notice.
    - ``maintenance``: ``action`` is the event code, ``state`` active, canceled, completed or
      removed; the last three are ``cleared`` notices for an event that was active.

    ``deadline`` is when the action is expected, counted from ``seen_at`` when the given time is
    past or implausible; ``stated_time`` is the time IMDS gave, unadjusted (spot ``time``, rebalance
    ``noticeTime``, maintenance ``NotBefore``), e.g. to judge a notice older than this boot.
    ``raw`` is the IMDS body the notice came from.
    """

    kind: NoticeKind
    seen_at: datetime
    raw: str
    action: str | None = None
    state: str | None = None
    deadline: datetime | None = None
    event_id: str | None = None
    stated_time: datetime | None = None

    @property
    def cleared(self) -> bool:
        """True for a maintenance event that is no longer active (intake may resume)."""
        return self.kind == NoticeKind.MAINTENANCE and self.state != MAINTENANCE_ACTIVE

    @property
    def _slot(self) -> tuple:
        return (self.kind, self.event_id)

    @property
    def _identity(self) -> tuple:
        # The spot time and rebalance noticeTime are left out on purpose: a mock (and possibly
        # IMDS) may restate them on every request, and it is still the same notice.
        return (self.kind, self.event_id, self.action, self.state)


def utc_now() -> datetime:
    return datetime.now(UTC)


def backoff_delay(failures: int, interval_s: float) -> float:
    """Seconds to wait after ``failures`` consecutive failed polls (never less than the interval)."""
    if failures <= 0:
        return interval_s
    return max(interval_s, min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * BACKOFF_FACTOR ** (failures - 1)))


class _Malformed(SdagentError):
    """A body that does not parse; logged and ignored, never a notice."""


# -- reading one path ------------------------------------------------------------------------
# Each reader turns one IMDS answer into the notices it shows now ([] = none), or None when the
# answer says nothing (the previous state stands).


def _read_spot(response: ImdsResponse, seen_at: datetime) -> list[Notice] | None:
    if response.status == 404:
        return []
    document = _json_object(response.text)
    action = document.get("action")
    if not isinstance(action, str) or not action:
        raise _Malformed("no action")
    stated = _parse_rfc3339(document.get("time"))
    return [
        Notice(
            NoticeKind.SPOT_INTERRUPTION,
            seen_at,
            response.text,
            action=action,
            deadline=_spot_deadline(action, stated, seen_at),
            stated_time=stated,
        )
    ]


def _read_rebalance(response: ImdsResponse, seen_at: datetime) -> list[Notice] | None:
    if response.status == 404:
        return []
    document = _json_object(response.text)
    stated = _parse_rfc3339(document.get("noticeTime"))
    return [Notice(NoticeKind.REBALANCE, seen_at, response.text, stated_time=stated)]


def _read_lifecycle(response: ImdsResponse, seen_at: datetime) -> list[Notice] | None:
    if response.status == 404:
        return None  # unknown (no lifecycle hook, or not populated yet): never "terminate"
    state = response.text.strip()
    if not _LIFECYCLE_STATE.fullmatch(state):
        raise _Malformed("not a lifecycle state")
    return [Notice(NoticeKind.LIFECYCLE, seen_at, response.text, state=state)]


def _read_maintenance(response: ImdsResponse, seen_at: datetime) -> list[Notice] | None:
    if response.status == 404:
        return []
    try:
        events = json.loads(response.text)
    except ValueError as exc:
        raise _Malformed(str(exc)) from exc
    if not isinstance(events, list) or not all(isinstance(event, dict) for event in events):
        raise _Malformed("not a list of events")
    return [_maintenance_notice(event, seen_at) for event in events]


def _maintenance_notice(event: dict, seen_at: datetime) -> Notice:
    not_before = _parse_maintenance_time(event.get("NotBefore"))
    return Notice(
        NoticeKind.MAINTENANCE,
        seen_at,
        json.dumps(event, sort_keys=True),
        action=event.get("Code"),
        # An event without a State is taken as active: better to pause intake needlessly.
        state=str(event.get("State") or MAINTENANCE_ACTIVE).lower(),
        deadline=max(not_before, seen_at) if not_before else None,
        event_id=str(event.get("EventId") or f"{event.get('Code')}@{event.get('NotBefore')}"),
        stated_time=not_before,
    )


def _json_object(text: str) -> dict:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise _Malformed(str(exc)) from exc
    if not isinstance(document, dict):
        raise _Malformed("not a JSON object")
    return document


def _spot_deadline(action: str, given: datetime | None, seen_at: datetime) -> datetime:
    if action == "hibernate":
        return seen_at  # hibernation begins at once: AWS gives no two-minute warning
    if given is None or not seen_at < given <= seen_at + SPOT_WARNING + CLOCK_SKEW_TOLERANCE:
        return seen_at + SPOT_WARNING
    return given


def _parse_rfc3339(value) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _parse_maintenance_time(value) -> datetime | None:
    try:
        return datetime.strptime(value, MAINTENANCE_TIME_FORMAT).replace(tzinfo=UTC)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class _Source:
    path: str
    read: Callable[[ImdsResponse, datetime], list[Notice] | None]


# Polled in this order: if IMDS fails part-way through a poll, the interruption was asked first.
SOURCES = (
    _Source(SPOT_PATH, _read_spot),
    _Source(LIFECYCLE_PATH, _read_lifecycle),
    _Source(REBALANCE_PATH, _read_rebalance),
    _Source(MAINTENANCE_PATH, _read_maintenance),
)


def _changes(previous: dict[tuple, Notice], current: list[Notice], now: datetime):
    """The new state of one source and the notices to announce, given what it shows now."""
    state: dict[tuple, Notice] = {}
    announce: list[Notice] = []
    for notice in current:
        old = previous.get(notice._slot)
        if old is not None and old._identity == notice._identity:
            state[notice._slot] = old  # the same notice: keep when it was first seen
            continue
        state[notice._slot] = notice
        # A canceled or completed event is news only if we had seen it active.
        if not notice.cleared or (old is not None and not old.cleared):
            announce.append(notice)
    for slot, old in previous.items():
        if slot not in state and old.kind == NoticeKind.MAINTENANCE and not old.cleared:
            announce.append(replace(old, state=MAINTENANCE_REMOVED, seen_at=now, deadline=None))
    return state, announce


class NoticeWatcher:
    """Polls IMDS every ``interval_s`` in a daemon thread and calls ``on_notice`` once per new notice.

    A notice seen on every poll is announced once; one that goes away and comes back is announced
    again. Timeouts, 429, 5xx and malformed bodies are logged and never become notices; failed
    polls back off (:func:`backoff_delay`) and the thread carries on. ``on_notice`` runs on the
    watcher thread, so it should hand the notice over and return (polling waits for it); an
    exception from it is logged. ``clock`` returns an aware UTC datetime.
    """

    def __init__(
        self,
        client: ImdsClient,
        interval_s: float = DEFAULT_INTERVAL_S,
        on_notice: Callable[[Notice], None] | None = None,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s}")
        self._client = client
        self._interval_s = interval_s
        self._on_notice = on_notice
        self._clock = clock
        self._state: dict[str, dict[tuple, Notice]] = {source.path: {} for source in SOURCES}
        self._state_lock = threading.Lock()
        # One poll at a time (thread and check_now): an older reading must not be committed last.
        self._poll_lock = threading.Lock()
        self._failures = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._malformed_logged: dict[str, str] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> NoticeWatcher:
        """Start polling in a daemon thread (the first poll is immediate)."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="imds-notice-watcher", daemon=True)
        self._thread.start()
        log.info("notices.watch.started", interval_s=self._interval_s)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop polling; waits for a poll in flight (bounded by the client's timeout)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("notices.watch.stop_timeout", timeout=timeout)
            self._thread = None
            log.info("notices.watch.stopped")

    # -- polling -----------------------------------------------------------------------------

    def check_now(self) -> list[Notice]:
        """Ask IMDS once and return every notice pending now (cleared ones left out).

        For start-up: a restart in the middle of a drain must see the notice before taking work.
        Notices returned here count as delivered: the watcher will not announce them again.
        Raises :class:`ImdsUnavailable` (or :class:`ImdsError`) if any path could not be read.
        """
        with self._poll_lock:
            now = self._clock()
            readings = {source.path: self._read(source, now) for source in SOURCES}
            with self._state_lock:
                self._commit(readings, now)
                return self._pending()

    def current_notices(self) -> list[Notice]:
        """The notices pending as of the last poll (cleared ones left out), without asking IMDS."""
        with self._state_lock:
            return self._pending()

    def poll(self) -> float:
        """One watch cycle: read every path, announce new notices; returns seconds until the next."""
        with self._poll_lock:
            now = self._clock()
            readings, failed = self._read_all(now)
            with self._state_lock:
                announce = self._commit(readings, now)
        for notice in announce:
            self._announce(notice)
        return self._next_delay(failed)

    def _read_all(self, now: datetime) -> tuple[dict[str, list[Notice] | None], bool]:
        """Each path's reading (paths that failed or were skipped are left out) and whether any failed."""
        readings: dict[str, list[Notice] | None] = {}
        failed = False
        for source in SOURCES:
            try:
                readings[source.path] = self._read(source, now)
            except ImdsError as exc:
                failed = True
                log.warning("notices.poll_failed", path=exc.path or source.path, status=exc.status, error=str(exc))
                if _stop_cycle(exc):
                    break
        return readings, failed

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                delay = self.poll()
            except Exception:
                # A bug must not end the watch: the agent would silently miss an interruption.
                self._failures += 1
                delay = backoff_delay(self._failures, self._interval_s)
                log.exception("notices.poll_crashed", failures=self._failures, retry_in_s=delay)
            self._stopping.wait(delay)

    def _read(self, source: _Source, now: datetime) -> list[Notice] | None:
        response = self._client.get(source.path)
        if response.status != 404 and not response.ok:
            status = response.status
            raise ImdsError(f"IMDS answered {status} for {source.path}", path=source.path, status=status)
        try:
            reading = source.read(response, now)
        except _Malformed as exc:
            self._log_malformed(source.path, response.text, str(exc))
            return None
        self._malformed_logged.pop(source.path, None)
        return reading

    def _pending(self) -> list[Notice]:
        return [notice for slots in self._state.values() for notice in slots.values() if not notice.cleared]

    def _commit(self, readings: dict[str, list[Notice] | None], now: datetime) -> list[Notice]:
        announce: list[Notice] = []
        for path, current in readings.items():
            if current is None:
                continue
            self._state[path], news = _changes(self._state[path], current, now)
            announce.extend(news)
        return announce

    def _announce(self, notice: Notice) -> None:
        log.info(
            "notice.received",
            kind=str(notice.kind),
            action=notice.action,
            state=notice.state,
            event_id=notice.event_id,
            deadline=notice.deadline.isoformat() if notice.deadline else None,
            seen_at=notice.seen_at.isoformat(),
        )
        if self._on_notice is None:
            return
        try:
            self._on_notice(notice)
        except Exception:
            log.exception("notices.callback_failed", kind=str(notice.kind))

    def _next_delay(self, failed: bool) -> float:
        if not failed:
            if self._failures:
                log.info("notices.poll_recovered", failures=self._failures)
            self._failures = 0
            return self._interval_s
        self._failures += 1
        delay = backoff_delay(self._failures, self._interval_s)
        log.warning("notices.backoff", failures=self._failures, retry_in_s=delay)
        return delay

    def _log_malformed(self, path: str, body: str, reason: str) -> None:
        # Once per distinct body, so a path stuck on garbage does not log every two seconds.
        if self._malformed_logged.get(path) == body:
            return
        self._malformed_logged[path] = body
        log.warning("notices.malformed", path=path, reason=reason, body=body[:_RAW_LOG_CHARS])


def _stop_cycle(exc: ImdsError) -> bool:
    """Whether the rest of this poll should be skipped after ``exc``.

    Unreachable, token trouble (401, a failed token request) and throttling affect every path:
    asking the others would only add timeouts or more throttling. A 5xx or odd status on one path
    does not stop the others.
    """
    if not isinstance(exc, ImdsUnavailable):
        return False
    return exc.status in (None, 401, 429) or exc.path == TOKEN_PATH
