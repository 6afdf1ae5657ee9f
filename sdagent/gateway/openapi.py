"""Prints the gateway's OpenAPI document: ``python -m sdagent.gateway.openapi > docs/openapi.json``."""

from __future__ import annotations

import sys

from sdagent.gateway.app import GatewayParts, create_app, dump_openapi
from sdagent.gateway.auth import Gatekeeper
from sdagent.gateway.config import GatewayConfig
from sdagent.jobs import Limits


def openapi_document() -> str:
    """The document as the gateway serves it (it does not depend on the configuration)."""
    config = GatewayConfig(allow_anonymous=True)
    return dump_openapi(create_app(GatewayParts(config, Limits(), None, None, Gatekeeper(config))))


if __name__ == "__main__":
    sys.stdout.write(openapi_document())
