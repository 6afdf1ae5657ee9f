"""Model affinity: job keys, the model header, and which held job an agent runs next."""

from __future__ import annotations

import collections

import pytest

from sdagent.agent.affinity import pick_next
from sdagent.jobs import Job
from sdagent.kafka.config import TopicsConfig
from sdagent.kafka.records import MODEL_HEADER, Delivery, job_headers, job_key, model_of


def a_job(model: str, job_id: str) -> Job:
    return Job(model=model, job_id=job_id)


def held(*records: tuple[int, str]) -> list[Delivery]:
    """Deliveries (partition, model), oldest first, with increasing offsets per partition."""
    offsets: collections.Counter[int] = collections.Counter()
    deliveries = []
    for partition, model in records:
        deliveries.append(Delivery("jobs", partition, offsets[partition], b"{}", None, model=model))
        offsets[partition] += 1
    return deliveries


def test_keyed_by_model_a_model_uses_exactly_its_lanes():
    topics = TopicsConfig(jobs_key="model", model_lanes=3)
    keys = {job_key(a_job("sdxl.safetensors", f"job-{i}"), topics) for i in range(300)}
    assert keys == {b"sdxl.safetensors#0", b"sdxl.safetensors#1", b"sdxl.safetensors#2"}


def test_the_key_is_stable_for_a_job_so_a_requeue_lands_where_the_job_was():
    topics = TopicsConfig(jobs_key="model", model_lanes=4)
    job = a_job("sd15.safetensors", "8a1f0c7e-1111-4c6e-9d0b-2c1c5e1e0a01")
    assert job_key(job, topics) == job_key(job.model_copy(update={"attempt": 3}), topics)


def test_one_lane_keys_by_the_model_alone():
    assert (
        job_key(a_job("sd15.safetensors", "x-1"), TopicsConfig(jobs_key="model", model_lanes=1)) == b"sd15.safetensors"
    )


def test_keyed_by_job_id_ignores_the_model():
    topics = TopicsConfig(jobs_key="job_id")
    assert job_key(a_job("sd15.safetensors", "job-7"), topics) == b"job-7"


def test_the_model_header_round_trips():
    headers = job_headers(a_job("sd15.safetensors", "job-1"))
    assert headers == [(MODEL_HEADER, b"sd15.safetensors")]
    assert model_of([("other", b"x"), *headers]) == "sd15.safetensors"
    assert model_of(None) is None and model_of([("other", b"x")]) is None


def test_with_nothing_loaded_the_oldest_runs():
    assert pick_next(held((0, "a"), (1, "b")), None, 0, 4) == 0


def test_the_oldest_runs_when_it_needs_the_loaded_model():
    assert pick_next(held((0, "a"), (1, "a")), "a", 0, 4) == 0


def test_another_partitions_next_job_for_the_loaded_model_goes_first():
    assert pick_next(held((0, "b"), (1, "c"), (2, "a")), "a", 0, 4) == 2


def test_a_partitions_later_record_is_never_taken_before_its_earlier_one():
    # Partition 0's second record needs "a", but its first needs "b": order within a partition holds.
    assert pick_next(held((0, "b"), (0, "a"), (1, "c")), "a", 0, 4) == 0


def test_no_job_for_the_loaded_model_means_the_oldest():
    assert pick_next(held((0, "b"), (1, "c")), "a", 0, 4) == 0


def test_the_oldest_is_passed_over_at_most_the_bound():
    records = held((0, "b"), (1, "a"), (2, "a"))
    assert pick_next(records, "a", 3, 4) == 1
    assert pick_next(records, "a", 4, 4) == 0


@pytest.mark.parametrize("jobs_key", ["model", "job_id"])
def test_the_jobs_key_setting_is_validated(jobs_key):
    assert TopicsConfig(jobs_key=jobs_key).jobs_key == jobs_key
    with pytest.raises(ValueError):
        TopicsConfig(jobs_key="partition")
