"""The HTTP gateway on the real broker, with an agent on the simulated backend behind it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pytest
from fastapi.testclient import TestClient

from sdagent.devstack.kafka import free_loopback_port
from sdagent.devstack.stack import settings_from, write_config
from sdagent.gateway.auth import hash_key
from sdagent.gateway.server import build_app
from sdagent.jobs import Status

pytestmark = pytest.mark.integration

KEY = "sdk_test-key-for-the-gateway-tests"
OTHER_KEY = "sdk_a-second-caller-with-a-tiny-limit"
AUTH = {"Authorization": f"Bearer {KEY}"}


def job(**fields) -> dict:
    return {"model": "sd15.safetensors", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, **fields}


def gateway_settings(pipeline, **gateway):
    config = json.loads(json.dumps(pipeline.config))
    config["gateway"] = {
        "api_keys": [{"name": "tests", "sha256": hash_key(KEY), "rate_per_s": 1000},
                     {"name": "tiny", "sha256": hash_key(OTHER_KEY), "rate_per_s": 2}],
        "max_body_bytes": 64 * 1024,
        "max_wait_s": 20,
        **gateway,
    }  # fmt: skip
    return settings_from(config)


@contextmanager
def gateway(pipeline, **config):
    with TestClient(build_app(gateway_settings(pipeline, **config), gateway_id="test")) as client:
        deadline = time.monotonic() + 20
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield client


def wait_status(client, job_id: str, wanted: set[str], timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if body.get("status") in wanted or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_an_async_submission_is_queued_then_followed_to_its_links(pipeline):
    pipeline.start_agent()
    with gateway(pipeline) as client:
        response = client.post("/v1/jobs", json=job(metadata={"order": 7}), headers=AUTH)

        assert response.status_code == 202, response.text
        queued = response.json()
        assert queued["status"] == "queued" and response.headers["location"] == queued["status_url"]
        final = wait_status(client, queued["job_id"], {"succeeded", "failed"})
    assert final["status"] == "succeeded" and final["metadata"] == {"order": 7}
    assert httpx.get(final["outputs"][0]["url"]).status_code == 200


def test_sync_mode_answers_with_the_result_when_it_is_done_in_time(pipeline):
    pipeline.start_agent()
    with gateway(pipeline) as client:
        by_query = client.post("/v1/jobs?wait=20", json=job(), headers=AUTH)
        by_prefer = client.post("/v1/jobs", json=job(), headers={**AUTH, "Prefer": "wait=20"})

    for response in (by_query, by_prefer):
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "succeeded" and response.json()["outputs"]
        assert response.headers["preference-applied"] == "wait=20"


def test_sync_mode_answers_202_when_the_job_is_not_done_in_time(pipeline):
    pipeline.start_agent(backend={"step_latency_s": 1.0})
    with gateway(pipeline) as client:
        response = client.post("/v1/jobs?wait=0.5", json=job(steps=5), headers=AUTH)
    assert response.status_code == 202 and response.json()["status"] == "queued"


def test_the_event_stream_follows_the_job_to_its_end(pipeline):
    pipeline.start_agent(backend={"step_latency_s": 0.1})
    with gateway(pipeline) as client:
        job_id = client.post("/v1/jobs", json=job(steps=6), headers=AUTH).json()["job_id"]
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=AUTH) as stream:
            events = [line.removeprefix("event: ") for line in stream.iter_lines() if line.startswith("event: ")]
    assert events[-1] == "succeeded" and "started" in events
    assert events.index("started") < len(events) - 1


def test_another_replica_and_a_restarted_one_know_the_job(pipeline):
    with gateway(pipeline) as first:
        job_id = first.post("/v1/jobs", json=job(), headers=AUTH).json()["job_id"]
        with gateway(pipeline) as second:  # no agent yet: only the gateway's own queued event exists
            assert second.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["status"] == "queued"
    pipeline.start_agent()
    with gateway(pipeline) as restarted:
        assert wait_status(restarted, job_id, {"succeeded"})["status"] == "succeeded"


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (job(width=65), ["width"]),
        (job(steps=0), ["steps"]),
        ({"prompt": "no model"}, ["model"]),
        (job(steps=999), ["steps"]),  # within the schema, over the deployment's limit
        (job(model="../../etc/passwd"), ["model"]),
    ],
)
def test_an_invalid_job_is_422_with_the_field_path_and_nothing_is_queued(pipeline, body, path):
    with gateway(pipeline) as client:
        response = client.post("/v1/jobs", json=body, headers=AUTH)
    assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"
    assert path in [error["loc"] for error in response.json()["errors"]]
    assert pipeline.read(pipeline.settings.topics.jobs, 1, timeout_s=1.0) == []


def test_a_body_over_the_limit_is_413_with_or_without_a_length(pipeline):
    big = json.dumps(job(prompt="x" * 70_000)).encode()
    with gateway(pipeline) as client:
        declared = client.post("/v1/jobs", content=big, headers={**AUTH, "Content-Type": "application/json"})
        streamed = client.post("/v1/jobs", content=iter([big[:40_000], big[40_000:]]),
                               headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
    assert declared.status_code == 413 and streamed.status_code == 413


def test_an_unknown_job_is_404(pipeline):
    with gateway(pipeline) as client:
        assert client.get("/v1/jobs/never-submitted", headers=AUTH).status_code == 404


def test_without_a_known_key_every_job_endpoint_is_401_but_health_is_open(pipeline):
    with gateway(pipeline) as client:
        assert client.post("/v1/jobs", json=job()).status_code == 401
        assert client.get("/v1/jobs/x", headers={"Authorization": "Bearer sdk_wrong"}).status_code == 401
        assert client.get("/v1/jobs/x", headers={"X-API-Key": KEY}).status_code == 404  # the other header works
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


def test_a_caller_over_its_rate_is_429_with_retry_after(pipeline):
    with gateway(pipeline) as client:
        codes = [client.get("/v1/jobs/x", headers={"X-API-Key": OTHER_KEY}) for _ in range(5)]
    limited = [response for response in codes if response.status_code == 429]
    assert limited and int(limited[0].headers["retry-after"]) >= 1
    assert [response.status_code for response in codes[:2]] == [404, 404]


def test_with_the_broker_away_a_submission_is_503_with_retry_after(pipeline):
    with gateway(pipeline, delivery_timeout_s=2.0) as client:
        # Point the app at a port where no broker listens: the status view is already caught up.
        dead = gateway_settings(pipeline, delivery_timeout_s=2.0)
        dead.kafka.bootstrap_servers = f"127.0.0.1:{free_loopback_port()}"
        from sdagent.gateway.queue import JobQueue

        queue = JobQueue(dead.kafka, dead.topics, "dead", delivery_timeout_s=2.0)
        client.app.state.parts.queue = queue
        client.app.state.parts.producer_ready = queue.broker_reachable
        response = client.post("/v1/jobs", json=job(), headers=AUTH)
        ready = client.get("/readyz")
        queue.close(1.0)
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert ready.status_code == 503


def test_the_served_openapi_document_is_the_one_in_docs(pipeline):
    from pathlib import Path

    with gateway(pipeline) as client:
        served = client.get("/openapi.json").json()
    kept = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json").read_text())
    assert served == kept, "docs/openapi.json is stale: python -m sdagent.gateway.openapi > docs/openapi.json"


def test_sdagent_gateway_serves_over_http(pipeline, tmp_path):
    config = json.loads(json.dumps(pipeline.config))
    port = free_loopback_port()
    config["gateway"] = {"api_keys": [{"name": "tests", "sha256": hash_key(KEY)}], "port": port}
    path = write_config(config, tmp_path / "sdagent.toml")
    pipeline.start_agent()
    process = subprocess.Popen([sys.executable, "-m", "sdagent", "gateway", "--config", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        answer = httpx.post(f"{base}/v1/jobs?wait=20", json=job(), headers=AUTH, timeout=30)
        assert answer.status_code == 200 and answer.json()["status"] == Status.SUCCEEDED.value
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0].decode()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught: systemd counts that as a clean stop.
    assert process.returncode in (0, -15), output
    assert "gateway.stopped" in output


def test_a_gateway_without_keys_refuses_to_start_naming_the_key(pipeline, tmp_path):
    config = json.loads(json.dumps(pipeline.config))
    path = write_config(config, tmp_path / "sdagent.toml")
    result = subprocess.run([sys.executable, "-m", "sdagent", "gateway", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 78 and "gateway.api_keys" in result.stderr
