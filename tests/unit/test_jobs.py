import base64
import json
from datetime import UTC, datetime, timedelta

import pytest

from sdagent.errors import JobRejected
from sdagent.jobs import Job, JobKind, Limits, Status, StatusEvent, job_json_schema, parse_job, peek_caller

LIMITS = Limits()


def raw(**fields) -> bytes:
    return json.dumps({"model": "sd15.safetensors", **fields}).encode()


def rejection(data: bytes, limits: Limits = LIMITS) -> JobRejected:
    with pytest.raises(JobRejected) as caught:
        parse_job(data, limits)
    return caught.value


def test_minimal_job_gets_defaults_and_a_generated_id():
    job = parse_job(raw(prompt="a cat"), LIMITS)
    assert job.kind is JobKind.TXT2IMG
    assert (job.width, job.height, job.steps, job.batch_size) == (512, 512, 20, 1)
    assert len(job.job_id) == 36
    assert job.output_format.value == "png"


def test_caller_chosen_job_id_is_kept():
    assert parse_job(raw(job_id="order-42:a"), LIMITS).job_id == "order-42:a"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"{not json", "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"[1, 2]", "invalid"),
        (None, "invalid"),
        (raw(schema_version=2), "schema_version"),
        (raw(width=100), "invalid"),
        (raw(steps=0), "invalid"),
        (raw(colour="blue"), "invalid"),
        (raw(kind="img2img"), "invalid"),
        (raw(kind="txt2vid", output={"format": "png"}), "invalid"),
    ],
)
def test_bad_messages_are_rejected_with_a_reason(data, reason):
    assert rejection(data).reason == reason


def test_invalid_field_is_named_in_the_message():
    message = rejection(raw(width=100, steps=0)).message
    assert "width" in message and "steps" in message


@pytest.mark.parametrize(
    "model", ["../etc/passwd", "/abs/model.ckpt", "a/../../b", "sub//x", ".hidden", "a\\b", "x/./y", ""]
)
def test_model_name_cannot_escape_the_model_directory(model):
    assert rejection(raw(model=model)).reason == "invalid"


def test_model_name_may_name_a_subdirectory():
    assert parse_job(raw(model="sdxl/juggernaut v9.safetensors"), LIMITS).model == "sdxl/juggernaut v9.safetensors"


def test_oversize_message_is_rejected_before_parsing():
    limits = Limits(max_message_bytes=1024)
    assert rejection(raw(prompt="x" * 2000), limits).reason == "oversize"


def test_deployment_limits_narrow_the_schema():
    limits = Limits(max_width=1024, max_steps=50, max_prompt_chars=10)
    assert "width" in rejection(raw(width=1536), limits).message
    assert "steps" in rejection(raw(steps=51), limits).message
    assert "prompt" in rejection(raw(prompt="x" * 11), limits).message


def test_rejection_keeps_what_identifies_the_caller():
    caught = rejection(raw(job_id="j1", reply_to="replies", reply_partition=3, correlation_id="c1", width=7))
    assert (caught.job_id, caught.reply_to, caught.reply_partition, caught.correlation_id) == ("j1", "replies", 3, "c1")


def test_img2img_takes_exactly_one_init_image_source():
    image = base64.b64encode(b"png bytes").decode()
    assert parse_job(raw(kind="img2img", init_image={"base64": image}), LIMITS).init_image.base64 == image
    assert (
        rejection(raw(kind="img2img", init_image={"base64": image, "s3_uri": "s3://bucket/a.png"})).reason == "invalid"
    )


def test_ttl_counts_from_submission_or_from_receipt():
    received = datetime(2026, 1, 1, tzinfo=UTC)
    submitted = received - timedelta(seconds=30)
    assert parse_job(raw(ttl_s=60), LIMITS).expires_at(received) == received + timedelta(seconds=60)
    job = parse_job(raw(ttl_s=60, submitted_at=submitted.isoformat()), LIMITS)
    assert job.expires_at(received) == submitted + timedelta(seconds=60)


def test_deadline_and_ttl_are_exclusive():
    assert rejection(raw(ttl_s=5, deadline="2030-01-01T00:00:00Z")).reason == "invalid"


def test_json_schema_describes_the_job():
    schema = job_json_schema()
    assert schema["properties"]["model"]["type"] == "string"
    assert schema["additionalProperties"] is False
    assert "txt2vid" in json.dumps(schema)


def test_status_event_round_trips_and_knows_terminal_states():
    event = StatusEvent(job_id="j", status=Status.SUCCEEDED, timings_ms={"total_ms": 3.0})
    assert StatusEvent.from_bytes(event.to_bytes()) == event
    assert Status.SUCCEEDED.is_terminal and not Status.RELEASED.is_terminal and not Status.PROGRESS.is_terminal


def test_job_defaults_round_trip_through_json():
    job = Job(model="m.safetensors", prompt="p")
    assert parse_job(job.model_dump_json().encode(), LIMITS) == job


def test_a_job_without_an_id_gets_the_one_derived_from_its_record():
    assert parse_job(raw(), LIMITS, default_job_id="record-1").job_id == "record-1"
    assert parse_job(raw(job_id="own"), LIMITS, default_job_id="record-1").job_id == "own"


# --- one strict parser for every path (the gateway's rules) ----------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"model": "m.safetensors", "prompt": "p", "steps": true}', "steps"),  # was taken as 1
        (b'{"model": "m.safetensors", "prompt": "p", "steps": "20"}', "steps"),
        (b'{"model": "m.safetensors", "prompt": "p", "steps": 20.0}', "steps"),
        (b'{"model": "m.safetensors", "prompt": "p", "seed": false}', "seed"),
        (b'{"model": "m.safetensors", "prompt": 7}', "prompt"),
        (b'{"model": "m.safetensors", "prompt": "p", "width": "512"}', "width"),
    ],
)
def test_a_field_of_the_wrong_json_type_is_rejected_not_coerced(body, field):
    with pytest.raises(JobRejected) as rejected:
        parse_job(body, LIMITS)
    assert rejected.value.reason == "invalid" and rejected.value.errors[0]["loc"][0] == field


@pytest.mark.parametrize(
    "body",
    [
        '{"model": "m.safetensors", "prompt": "p"}'.encode("utf-16"),  # was decoded by json.loads
        '{"model": "m.safetensors", "prompt": "p"}'.encode("utf-32"),
        b"\xef\xbb\xbf" + b'{"model": "m.safetensors", "prompt": "p"}',  # a UTF-8 byte-order mark
        b'{"model": "m.safetensors", "prompt": "\xff\xfe"}',  # not UTF-8 at all
        b"[" * 100_000 + b"]" * 100_000,  # nested deeper than any parser goes
    ],
)
def test_only_utf8_json_is_a_job(body):
    with pytest.raises(JobRejected) as rejected:
        parse_job(body, Limits(max_message_bytes=1_000_000))
    assert rejected.value.reason == "not_json"


def test_a_schema_version_of_true_is_not_version_1():
    with pytest.raises(JobRejected) as rejected:
        parse_job(raw(schema_version=True), LIMITS)
    assert rejected.value.reason == "schema_version"


def test_a_limit_beyond_the_deployment_names_its_field_for_every_caller():
    with pytest.raises(JobRejected) as rejected:
        parse_job(raw(steps=200), Limits(max_steps=50))
    (error,) = rejected.value.errors
    assert error == {"loc": ["steps"], "msg": "steps is 200, over this deployment's limit of 50", "type": "over_limit"}


def test_peek_caller_never_raises_and_reads_what_it_can():
    assert peek_caller(None) == {} and peek_caller(b"[" * 100_000) == {} and peek_caller(b"\xff") == {}
    assert peek_caller(b'{"job_id": "a", "reply_to": "t", "reply_partition": -1, "steps": true}') == {
        "job_id": "a",
        "reply_to": "t",
    }
