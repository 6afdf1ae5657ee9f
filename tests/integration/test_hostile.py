"""Hostile input against a live stack (real broker, moto, an agent on the simulator, the gateway):
records and HTTP bodies made to break each layer (encodings, parsers, limits, names, paths,
headers, sizes, reply addresses). Every case must end with a reason, nothing may be written
outside the output prefix, and the agent and the gateway must keep serving."""

from __future__ import annotations

import base64
import json
import time

import boto3
import pytest
from confluent_kafka import Producer
from fastapi.testclient import TestClient
from test_pipeline import headers_of, job

from sdagent.gateway.auth import hash_key
from sdagent.gateway.server import build_app
from sdagent.jobs import Status

pytestmark = pytest.mark.integration

KEY = "sdk_hostile-input-suite-key"


def doc(**fields) -> bytes:
    return json.dumps(job(**fields)).encode()


def records(topics) -> dict[str, tuple[bytes | None, list[tuple[str, bytes]] | None]]:
    """Case name -> (value, headers). Cases whose job id can be read are named by it."""
    deep = b"[" * 100_000 + b"]" * 100_000
    return {
        # encodings and parsers
        "empty": (b"", None),
        "tombstone": (None, None),
        "binary": (bytes(range(256)), None),
        "utf16": ('{"model": "sd15.safetensors", "prompt": "p"}'.encode("utf-16"), None),
        "utf8-bom": (b"\xef\xbb\xbf" + doc(job_id="h-bom"), None),
        "deep-nesting": (deep, None),
        "deep-metadata": (doc(job_id="h-deep-metadata", metadata={"a": json.loads("[" * 400 + "]" * 400)}), None),
        "top-level-array": (b"[1, 2, 3]", None),
        "truncated": (doc(job_id="h-truncated")[:-7], None),
        "nan": (doc(job_id="h-nan").replace(b'"steps": 4', b'"steps": NaN'), None),
        # types and limits
        "steps-true": (doc(job_id="h-steps-true", steps=True), None),
        "steps-string": (doc(job_id="h-steps-string", steps="4"), None),
        "width-huge": (doc(job_id="h-width-huge", width=2**64), None),
        "width-negative": (doc(job_id="h-width-negative", width=-64), None),
        "prompt-huge": (doc(job_id="h-prompt-huge", prompt="x" * 200_000), None),
        "unknown-field": (doc(job_id="h-unknown-field", evil="1"), None),
        "schema-version-string": (doc(job_id="h-schema-version", schema_version="1"), None),
        # names and paths
        "model-traversal": (doc(job_id="h-model-traversal", model="../../etc/passwd"), None),
        "model-absolute": (doc(job_id="h-model-absolute", model="/etc/passwd"), None),
        "model-nul": (doc(job_id="h-model-nul", model="a\u0000b.safetensors"), None),
        "job-id-slash": (doc(job_id="h/../slash"), None),
        "filename-traversal": (doc(job_id="h-filename-traversal", output={"filename": "../../escaped-{index}"}), None),
        "init-s3-traversal": (
            doc(job_id="h-init-s3", kind="img2img", init_image={"s3_uri": "s3://other-bucket/../../secret"}),
            None,
        ),
        "init-base64-garbage": (
            doc(job_id="h-init-b64", kind="img2img", init_image={"base64": "!!!!not base64"}),
            None,
        ),
        "init-base64-not-image": (
            doc(job_id="h-init-b64-text", kind="img2img", init_image={"base64": base64.b64encode(b"hello").decode()}),
            None,
        ),
        "workflow-garbage": (doc(job_id="h-workflow", kind="workflow", workflow={"1": "not a node"}), None),
        # headers and reply addresses
        "bad-model-header": (doc(job_id="h-bad-header"), [("sdagent-model", b"\xff\xfe\x00"), ("x", b"y" * 100_000)]),
        "reply-to-jobs": (doc(job_id="h-reply-jobs", reply_to=topics.jobs), None),
        "reply-to-results": (doc(job_id="h-reply-results", reply_to=topics.results), None),
        "reply-partition-huge": (
            doc(job_id="h-reply-partition", reply_to=topics.replies, reply_partition=99_999),
            None,
        ),
    }


def test_every_hostile_record_ends_with_a_reason_and_the_agent_keeps_serving(pipeline, aws_endpoint, s3_bucket):
    pipeline.start_agent()
    topics = pipeline.settings.topics
    producer = Producer({"bootstrap.servers": pipeline.settings.kafka.bootstrap_servers, "message.max.bytes": 2**21})
    placed: dict[str, tuple[int, int]] = {}
    for name, (value, headers) in records(topics).items():
        producer.produce(topics.jobs, value=value, headers=headers,
                         on_delivery=lambda err, msg, name=name: placed.__setitem__(name, (msg.partition(), msg.offset())))  # fmt: skip
    producer.flush(30)
    assert len(placed) == len(records(topics))

    # Each case: a dead letter with a reason (by its place on the jobs topic), or a terminal
    # answer with a reason (by its job id), or a success that wrote only under the output prefix.
    letters = pipeline.read(topics.dead_letters, len(placed), timeout_s=60)
    lettered = {
        (int(headers_of(m)["sdagent-source-partition"]), int(headers_of(m)["sdagent-source-offset"])): headers_of(m)
        for m in letters
    }
    unanswered = []
    for name, place in placed.items():
        if place in lettered:
            assert lettered[place]["sdagent-reason"], name
            continue
        job_id = json.loads(records(topics)[name][0]).get("job_id") if name not in ("empty", "tombstone") else None
        terminal = [e for e in pipeline.events(job_id, timeout_s=20) if e.status.is_terminal] if job_id else []
        if terminal and (terminal[0].status is Status.SUCCEEDED or terminal[0].reason):
            continue
        unanswered.append(name)
    assert unanswered == []

    # Nothing outside the output prefix in the bucket.
    s3 = boto3.client("s3", endpoint_url=aws_endpoint, region_name="us-east-1")
    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
            for item in page.get("Contents", [])]  # fmt: skip
    assert all(key.startswith(pipeline.settings.outputs.prefix + "/") for key in keys), keys
    assert not any(".." in key for key in keys), keys

    # Nothing written into the fleet's own topics by the reply cases.
    def is_status(message) -> bool:  # hostile header values are not UTF-8: compare names only
        return any(name == "sdagent-status" for name, _value in message.headers() or ())

    assert pipeline.read(topics.jobs, 1, timeout_s=2, match=is_status) == []
    assert pipeline.client.run(job(), timeout_s=30).status is Status.SUCCEEDED


HTTP_BODIES = {
    "empty": b"",
    "binary": bytes(range(256)),
    "utf16": '{"model": "sd15.safetensors", "prompt": "p"}'.encode("utf-16"),
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
    "top-level-string": b'"a job"',
    "steps-true": doc(steps=True),
    "width-huge": doc(width=2**64),
    "model-traversal": doc(model="../../etc/passwd"),
    "job-id-newline": doc(job_id="a\nb"),
    "reply-to": doc(reply_to="sdagent.jobs"),
    "over-the-body-limit": doc(prompt="x" * 70_000),
}


def test_every_hostile_http_body_is_a_4xx_problem_and_the_gateway_keeps_serving(pipeline):
    pipeline.start_agent()
    config = json.loads(json.dumps(pipeline.config))
    config["gateway"] = {"api_keys": [{"name": "tests", "sha256": hash_key(KEY)}], "max_body_bytes": 64 * 1024}
    from sdagent.devstack.stack import settings_from

    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with TestClient(build_app(settings_from(config), gateway_id="hostile")) as client:
        deadline = time.monotonic() + 20
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        for name, body in HTTP_BODIES.items():
            answer = client.post("/v1/jobs", content=body, headers=auth)
            assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
            assert answer.headers["content-type"].startswith("application/problem+json"), name
            assert answer.json()["detail"], name
        # Odd headers are refused too, never a 500.
        for headers in ({"Authorization": "Bearer " + "x" * 10_000}, {"Authorization": b"Basic \xff\xfe"}, {}):
            assert client.post("/v1/jobs", content=doc(), headers=headers).status_code == 401
        answer = client.post("/v1/jobs?wait=20", content=doc(), headers=auth)
        assert answer.status_code == 200 and answer.json()["status"] == "succeeded"
