"""The job loop's recorder: per-interval values, bounded dimensions, thread-safe and cheap."""

from __future__ import annotations

import threading
import time

from sdagent.metrics import names
from sdagent.metrics.dimensions import InstanceIdentity
from sdagent.metrics.jobs import MAX_REASONS, JobMetrics

IDENTITY = InstanceIdentity("i-0abc", "g5.xlarge", "sdagent-fleet")
NO_GROUP = InstanceIdentity("laptop")
TS = 1_700_000_040.0


def by_key(data):
    return {(d.name, d.dimensions): d for d in data}


def test_an_idle_interval_still_publishes_in_flight_and_the_counters_as_zero():
    data = by_key(JobMetrics(jobs_topic="sdagent.jobs").collect(TS, IDENTITY))
    instance = IDENTITY.instance()
    assert data[(names.JOBS_IN_FLIGHT, instance)].value == 0
    # The fleet-wide stream the scaling math averages: zeros count, or idle agents would vanish.
    assert data[(names.JOBS_IN_FLIGHT, (("JobsTopic", "sdagent.jobs"),))].value == 0
    assert data[(names.JOBS_STARTED, instance)].value == 0
    assert data[(names.BACKEND_RESTARTS, instance)].value == 0
    assert data[(names.BACKEND_RESTARTS, IDENTITY.group())].value == 0
    assert data[(names.DRAINING, instance)].value == 0
    assert all(d.timestamp == TS for d in data.values())


def test_counts_are_per_interval_not_running_totals():
    metrics = JobMetrics()
    for _ in range(3):
        metrics.job_started()
    metrics.backend_restarted()
    first = by_key(metrics.collect(TS, IDENTITY))
    metrics.job_started()
    second = by_key(metrics.collect(TS + 60, IDENTITY))
    instance = IDENTITY.instance()
    assert first[(names.JOBS_STARTED, instance)].value == 3
    assert second[(names.JOBS_STARTED, instance)].value == 1
    assert first[(names.BACKEND_RESTARTS, IDENTITY.group())].value == 1
    assert second[(names.BACKEND_RESTARTS, IDENTITY.group())].value == 0


def test_finished_jobs_count_by_status_and_failures_by_reason_for_the_group():
    metrics = JobMetrics()
    metrics.job_finished("succeeded", None, {"total_ms": 1000})
    metrics.job_finished("succeeded", None, {})
    metrics.job_finished("failed", "backend_error", {})
    metrics.job_finished("failed", "hung", {})
    metrics.job_finished("released", "draining", {})
    data = by_key(metrics.collect(TS, IDENTITY))
    instance, group = IDENTITY.instance(), IDENTITY.group()
    assert data[(names.JOBS_FINISHED, (*instance, ("Status", "succeeded")))].value == 2
    assert data[(names.JOBS_FINISHED, (*instance, ("Status", "failed")))].value == 2
    assert data[(names.JOB_FAILURES, (*group, ("Reason", "hung")))].value == 1
    assert data[(names.JOB_FAILURES, (*group, ("Reason", "draining")))].value == 1


def test_failures_outside_a_group_are_counted_per_instance():
    metrics = JobMetrics()
    metrics.job_finished("failed", "hung")
    data = by_key(metrics.collect(TS, NO_GROUP))
    assert data[(names.JOB_FAILURES, (*NO_GROUP.instance(), ("Reason", "hung")))].value == 1
    assert not [key for key in data if key[1] == ()]


def test_reasons_are_bounded_so_free_text_cannot_explode_the_metric_count():
    metrics = JobMetrics()
    for index in range(MAX_REASONS + 10):
        metrics.job_finished("failed", f"reason-{index}")
    reasons = [dict(d.dimensions)["Reason"] for d in metrics.collect(TS, IDENTITY) if d.name == names.JOB_FAILURES]
    assert len(reasons) == MAX_REASONS + 1 and "other" in reasons


def test_timings_become_values_and_counts_distributions():
    metrics = JobMetrics()
    for total in (1000, 1000, 2000, 1234.5):
        metrics.job_finished("succeeded", None, {"total_ms": total, "inference_ms": 800, "unknown_ms": 1})
    data = by_key(metrics.collect(TS, IDENTITY))
    total = data[(names.JOB_TOTAL_TIME, IDENTITY.instance())]
    assert total.unit == "Milliseconds"
    assert dict(zip(total.values, total.counts)) == {1000: 2, 1230: 1, 2000: 1}  # 3 significant digits
    assert data[(names.INFERENCE_TIME, IDENTITY.instance())].sample_count == 4
    assert (names.UPLOAD_TIME, IDENTITY.instance()) not in data  # nothing measured, nothing sent


def test_without_a_topic_there_is_no_fleet_stream():
    keys = by_key(JobMetrics().collect(TS, IDENTITY))
    assert [dims for name, dims in keys if name == names.JOBS_IN_FLIGHT] == [IDENTITY.instance()]


def test_in_flight_and_draining_report_the_intervals_maximum():
    metrics = JobMetrics()
    metrics.set_in_flight(1)
    metrics.set_in_flight(0)  # busy for most of the interval, idle at its end
    metrics.set_draining(True)
    metrics.set_draining(False)
    data = by_key(metrics.collect(TS, IDENTITY))
    assert data[(names.JOBS_IN_FLIGHT, IDENTITY.instance())].value == 1
    assert data[(names.DRAINING, IDENTITY.instance())].value == 1
    data = by_key(metrics.collect(TS + 60, IDENTITY))
    assert data[(names.JOBS_IN_FLIGHT, IDENTITY.instance())].value == 0
    assert data[(names.DRAINING, IDENTITY.instance())].value == 0


def test_a_job_still_running_carries_into_the_next_interval():
    metrics = JobMetrics()
    metrics.set_in_flight(1)
    metrics.collect(TS, IDENTITY)
    data = by_key(metrics.collect(TS + 60, IDENTITY))
    assert data[(names.JOBS_IN_FLIGHT, IDENTITY.instance())].value == 1


def test_model_cache_hits_and_misses():
    metrics = JobMetrics()
    metrics.model_cache(True)
    metrics.model_cache(True)
    metrics.model_cache(False)
    data = by_key(metrics.collect(TS, IDENTITY))
    assert data[(names.MODEL_CACHE_HITS, IDENTITY.instance())].value == 2
    assert data[(names.MODEL_CACHE_MISSES, IDENTITY.instance())].value == 1


def test_time_to_ready_is_published_once_per_boot():
    metrics = JobMetrics()
    metrics.time_to_ready(93.5)
    metrics.time_to_ready(10.0)  # a second call (a WebUI restart) is not a boot
    first = by_key(metrics.collect(TS, IDENTITY))
    assert first[(names.TIME_TO_READY, IDENTITY.instance())].value == 93.5
    assert first[(names.TIME_TO_READY, IDENTITY.group())].value == 93.5
    metrics.time_to_ready(5.0)
    assert not [d for d in metrics.collect(TS + 60, IDENTITY) if d.name == names.TIME_TO_READY]


def test_disabled_recorder_records_nothing():
    metrics = JobMetrics(enabled=False)
    metrics.job_started()
    metrics.set_in_flight(3)
    assert metrics.collect(TS, IDENTITY) == []


def test_concurrent_callers_lose_no_count():
    metrics = JobMetrics()
    threads, per_thread = 8, 5_000

    def work() -> None:
        for _ in range(per_thread):
            metrics.job_started()
            metrics.job_finished("succeeded", None, {"total_ms": 10.0})

    workers = [threading.Thread(target=work) for _ in range(threads)]
    collected = []
    for worker in workers:
        worker.start()
    while any(w.is_alive() for w in workers):
        collected.extend(metrics.collect(TS, IDENTITY))  # collecting concurrently with the callers
    for worker in workers:
        worker.join()
    collected.extend(metrics.collect(TS, IDENTITY))
    started = sum(d.value for d in collected if d.name == names.JOBS_STARTED)
    finished = sum(d.value for d in collected if d.name == names.JOBS_FINISHED)
    timed = sum(d.sample_count for d in collected if d.name == names.JOB_TOTAL_TIME)
    assert started == finished == timed == threads * per_thread


def test_recording_is_cheap():
    metrics = JobMetrics()
    timings = {"queue_wait_ms": 12.0, "switch_ms": 0.0, "inference_ms": 950.0, "upload_ms": 80.0, "total_ms": 1050.0}
    calls = 20_000
    started = time.perf_counter()
    for _ in range(calls):
        metrics.job_started()
        metrics.set_in_flight(1)
        metrics.job_finished("succeeded", None, timings)
        metrics.set_in_flight(0)
    per_job_us = (time.perf_counter() - started) / calls * 1e6
    assert per_job_us < 100  # a job takes seconds; its bookkeeping takes microseconds
