"""The gateway's status view keeps the latest event per job, bounded; fed records directly.

The consumer is a real confluent-kafka Consumer that never connects: these tests feed the view the
records its reader thread would take from the results topic.
"""

from __future__ import annotations

import pytest
from confluent_kafka import Consumer

from sdagent.gateway.status import StatusView
from sdagent.jobs import Status, StatusEvent
from sdagent.kafka.records import STATUS_HEADER


@pytest.fixture
def view():
    consumer = Consumer({"bootstrap.servers": "127.0.0.1:9", "group.id": "unit-status-view"})
    yield StatusView(consumer, "sdagent.results", window_s=3600, max_jobs=100)
    consumer.close()


def _feed(view: StatusView, job_id: str, status: Status) -> None:
    event = StatusEvent(job_id=job_id, status=status)
    view._take(job_id.encode(), event.model_dump_json().encode(), [(STATUS_HEADER, status.value.encode())], 0)


def test_the_latest_event_per_job_is_kept_and_unknown_jobs_are_none(view):
    _feed(view, "j1", Status.QUEUED)
    _feed(view, "j1", Status.STARTED)
    assert view.get("j1").status is Status.STARTED
    assert view.get("nope") is None


def test_a_terminal_answer_is_not_hidden_by_a_late_progress_event(view):
    _feed(view, "j1", Status.SUCCEEDED)
    _feed(view, "j1", Status.PROGRESS)
    assert view.get("j1").status is Status.SUCCEEDED


def test_records_without_key_or_status_header_are_skipped(view):
    view._take(None, b"{}", [(STATUS_HEADER, b"queued")], 0)
    view._take(b"j2", b"{}", [], 0)
    view._take(b"j3", b"{}", [(STATUS_HEADER, b"not-a-status")], 0)
    assert view.get("j2") is None and view.get("j3") is None


def test_the_view_holds_at_most_max_jobs_dropping_the_oldest(view):
    for n in range(150):
        _feed(view, f"j{n}", Status.QUEUED)
    assert view.get("j0") is None and view.get("j49") is None
    assert view.get("j50").status is Status.QUEUED and view.get("j149").status is Status.QUEUED
