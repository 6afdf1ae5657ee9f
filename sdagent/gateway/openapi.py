"""Prints the gateway's OpenAPI document: ``python -m sdagent.gateway.openapi > docs/openapi.json``."""

from __future__ import annotations

import sys

from sdagent.gateway.app import create_app, dump_openapi


def openapi_document() -> str:
    """The document as the gateway serves it (it does not depend on the configuration)."""
    return dump_openapi(create_app())


if __name__ == "__main__":
    sys.stdout.write(openapi_document())
