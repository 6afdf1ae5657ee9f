"""Schemathesis against docs/openapi.json: generated requests to a served gateway (uvicorn, real
broker) get only documented status codes, content types and bodies, and never a 5xx."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from sdagent.devstack.kafka import free_loopback_port
from sdagent.devstack.stack import settings_from
from sdagent.gateway.auth import hash_key
from sdagent.gateway.server import build_app

pytestmark = pytest.mark.integration

KEY = "sdk_schemathesis-key"
SCHEMA = schemathesis.openapi.from_path(Path(__file__).resolve().parents[2] / "docs" / "openapi.json")


@pytest.fixture
def served_gateway(pipeline):
    config = json.loads(json.dumps(pipeline.config))
    # Short waits: generated requests ask for any ?wait= the schema allows.
    config["gateway"] = {"api_keys": [{"name": "fuzz", "sha256": hash_key(KEY), "rate_per_s": 100_000}],
                         "max_wait_s": 0.2}  # fmt: skip
    port = free_loopback_port()
    server = uvicorn.Server(uvicorn.Config(build_app(settings_from(config)), host="127.0.0.1", port=port,
                                           log_config=None, access_log=False))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(10)


@SCHEMA.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_gateway_keeps_its_documented_contract(case, served_gateway):
    # A job valid by the schema may still be over this deployment's limits (or name a model outside
    # the model folder): 422 is the documented answer then, so acceptance of every valid body is
    # not expected.
    case.call_and_validate(base_url=served_gateway, headers={"Authorization": f"Bearer {KEY}"},
                           excluded_checks=[positive_data_acceptance])  # fmt: skip
