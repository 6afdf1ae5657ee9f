"""The ``[gateway]`` section: where it listens, who may call it, how long it keeps job status."""

from __future__ import annotations

import base64
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ApiKey(BaseModel):
    """One caller: a name for logs and limits, and the SHA-256 of its key (never the key)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    sha256: str = Field(..., pattern=SHA256_HEX.pattern)
    rate_per_s: int = Field(100, ge=1, le=100_000)  # requests a second, per key, per gateway
    # Requests allowed at once after a quiet spell; default rate_per_s (a one-second window).
    # Kept as a window of ceil(burst / rate_per_s) seconds holding that many seconds of rate.
    burst: int | None = Field(None, ge=1, le=1_000_000)


class WebhookConfig(BaseModel):
    """``[gateway.webhooks]``; see docs/webhooks.md."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    # Signing secrets, "whsec_" + base64 (set them through SDAGENT_GATEWAY__WEBHOOKS__SECRETS, not
    # the file). The first signs; all are listed in the signature header, so a rotation can run
    # with two for a while.
    secrets: list[str] = Field(default_factory=list)
    timeout_s: float = Field(10.0, gt=0, le=120)
    max_attempts: int = Field(5, ge=1, le=20)
    max_backoff_s: float = Field(10.0, gt=0, le=300)
    # Webhooks one gateway sends at once: a receiver that is slow or failing (and retried) holds
    # up only its own, not every webhook behind it.
    concurrency: int = Field(16, ge=1, le=256)
    allow_private_targets: bool = False  # tests and closed networks only
    # Where a new webhook group starts: "latest" sends the answers from now on; "earliest" also
    # those still on the results topic.
    start_from: Literal["latest", "earliest"] = "latest"

    @model_validator(mode="after")
    def _secret_when_enabled(self) -> WebhookConfig:
        if self.enabled and not self.secrets:
            raise ValueError("webhooks need at least one signing secret (secrets)")
        for secret in self.secrets:
            secret_bytes(secret)
        return self


def secret_bytes(secret: str) -> bytes:
    """The key of a ``whsec_<base64>`` webhook secret."""
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError as exc:
        raise ValueError("a webhook secret is 'whsec_' followed by base64") from exc


class GatewayConfig(BaseModel):
    """The HTTP gateway (``[gateway]``); see docs/gateway.md."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    api_keys: list[ApiKey] = Field(default_factory=list)
    # Off unless set: every /v1 endpoint needs a key. /healthz and /readyz never do.
    allow_anonymous: bool = False
    anonymous_rate_per_s: int = Field(100, ge=1, le=100_000)
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_wait_s: float = Field(60.0, ge=0, le=600)  # the cap of ?wait= and Prefer: wait=
    # Status is rebuilt from the results topic over this window at start; older jobs answer 404.
    status_window_s: float = Field(3600.0, gt=0)
    status_max_jobs: int = Field(200_000, ge=100)
    # How long a submission waits for the broker's acks=all before it answers 503.
    delivery_timeout_s: float = Field(10.0, gt=0, le=120)
    retry_after_s: int = Field(5, ge=1)
    # Slow or idle clients: a connection must send complete request headers this soon after it
    # opens (or after its last response), its body must arrive within body_timeout_s (else 408),
    # and an idle keep-alive connection is closed after keep_alive_timeout_s.
    headers_timeout_s: float = Field(10.0, gt=0, le=300)
    body_timeout_s: float = Field(30.0, gt=0, le=600)
    keep_alive_timeout_s: int = Field(5, ge=1, le=300)
    webhooks: WebhookConfig = Field(default_factory=WebhookConfig)

    @model_validator(mode="after")
    def _key_names_unique(self) -> GatewayConfig:
        names = [key.name for key in self.api_keys]
        if len(set(names)) != len(names):
            raise ValueError("api_keys names must be unique")
        return self
