"""Tells an S3 failure worth repeating (throttling, 5xx, network) from one that is final (4xx)."""

from __future__ import annotations

from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

# Error codes S3 answers to a request worth repeating later; any 5xx and 429 count too.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
        "TooManyRequestsException",
    }
)


def is_transient(exc: Exception) -> bool:
    """True for throttling, 5xx, 429 and connection failures; False for 4xx and the rest."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in _TRANSIENT_CODES or status >= 500 or status == 429
    return isinstance(exc, (BotoConnectionError, HTTPClientError))


def error_code(exc: Exception) -> str:
    """S3's error code (``NoSuchKey``...), or the exception's class name."""
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code", "") or type(exc).__name__
    return type(exc).__name__
