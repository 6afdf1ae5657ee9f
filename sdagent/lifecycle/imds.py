"""A small IMDSv2-only client for the EC2 instance metadata service.

botocore has a metadata fetcher, but it treats 404 as an error and hides the status code; the
notice watcher needs the status (404 means "no notice" on the spot path and "unknown" on the
lifecycle path), so the agent has its own client. It never falls back to IMDSv1.

The caller passes the endpoint in: :func:`endpoint_from_environment` turns the botocore
``AWS_EC2_METADATA_*`` variables into one, and only the command line calls it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx
import structlog

from sdagent.errors import ConfigError, SdagentError

log = structlog.get_logger(__name__)

DEFAULT_ENDPOINT = "http://169.254.169.254"
IPV6_ENDPOINT = "http://[fd00:ec2::254]"
DEFAULT_TIMEOUT_S = 2.0  # NTH uses 2 s too: IMDS is link-local, a slower answer is a failure

TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TOKEN_TTL_S = 21600  # IMDS accepts 1..21600 s
# A token is replaced this long before IMDS would expire it (at most half its TTL), so a request
# never goes out with a token that dies in flight; NTH refreshes 15 s early.
TOKEN_REFRESH_MARGIN_S = 60.0

IDENTITY_DOCUMENT_PATH = "/latest/dynamic/instance-identity/document"
INSTANCE_ID_PATH = "/latest/meta-data/instance-id"
INSTANCE_TYPE_PATH = "/latest/meta-data/instance-type"
REGION_PATH = "/latest/meta-data/placement/region"
AVAILABILITY_ZONE_PATH = "/latest/meta-data/placement/availability-zone"

_TRUE_WORDS = {"true", "1", "yes"}


# Proposed for sdagent/errors.py (they live here until that file takes them; import them from here).
class ImdsError(SdagentError):
    """Raised when the instance metadata service cannot give an answer the caller can use."""

    def __init__(self, message: str, *, path: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.status = status


class ImdsUnavailable(ImdsError):
    """Raised when IMDS times out, cannot be reached, throttles (429), fails (5xx), will not issue a
    token or refuses a fresh one (401 twice); transient: back off and ask again, never read it as an
    answer."""


def endpoint_from_environment(environ: Mapping[str, str]) -> str | None:
    """The IMDS endpoint named by botocore's variables in ``environ``; None when IMDS is disabled.

    ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` wins; otherwise ``AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE``
    picks the IPv4 or IPv6 address. ``AWS_EC2_METADATA_DISABLED=true`` means "do not watch IMDS".
    """
    if environ.get("AWS_EC2_METADATA_DISABLED", "").strip().lower() in _TRUE_WORDS:
        return None
    endpoint = environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "").strip()
    if endpoint:
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"not an http(s) URL: {endpoint!r}")
        return endpoint.rstrip("/")
    mode = environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "").strip().lower()
    if mode in ("", "ipv4"):
        return DEFAULT_ENDPOINT
    if mode == "ipv6":
        return IPV6_ENDPOINT
    raise ConfigError("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", f"must be IPv4 or IPv6, not {mode!r}")


@dataclass(frozen=True)
class ImdsResponse:
    """One IMDS answer: the HTTP status and the body as text."""

    status: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class _Token:
    value: str
    refresh_at: float  # on the client's clock


class ImdsClient:
    """GETs IMDS paths with an IMDSv2 session token, which it fetches, renews early and replaces on 401.

    ``transport`` is an httpx transport (``httpx.MockTransport`` in tests); ``clock`` is a
    monotonic clock in seconds that decides when the token is due for renewal. Thread-safe.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        token_ttl_s: int = MAX_TOKEN_TTL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= token_ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(f"token_ttl_s must be 1..{MAX_TOKEN_TTL_S}, not {token_ttl_s}")
        self.endpoint = endpoint.rstrip("/")
        self._token_ttl_s = token_ttl_s
        self._clock = clock
        self._token: _Token | None = None
        self._token_lock = threading.Lock()
        # trust_env=False: an HTTP(S)_PROXY meant for the internet must never see IMDS traffic, and
        # library modules do not read the environment.
        self._http = httpx.Client(base_url=self.endpoint, timeout=timeout_s, transport=transport, trust_env=False)

    def get(self, path: str) -> ImdsResponse:
        """GET ``path``; any status but 401, 429 and 5xx is returned for the caller to judge.

        Raises :class:`ImdsUnavailable` on timeouts, connection errors, 429, 5xx and a 401 that a
        fresh token does not cure.
        """
        token = self._current_token()
        response = self._send(path, token)
        if response.status == 401:
            # The token expired early or IMDS forgot it (e.g. after a restart of the service):
            # one fresh token, one more try.
            log.info("imds.token.rejected", path=path)
            self._discard_token(token)
            response = self._send(path, self._current_token())
        if response.status == 401 or response.status == 429 or response.status >= 500:
            raise ImdsUnavailable(f"IMDS answered {response.status} for {path}", path=path, status=response.status)
        return response

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ImdsClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- token -------------------------------------------------------------------------------

    def _current_token(self) -> str:
        with self._token_lock:
            if self._token is None or self._clock() >= self._token.refresh_at:
                self._token = self._fetch_token()
            return self._token.value

    def _discard_token(self, value: str) -> None:
        with self._token_lock:
            # Another thread may already have replaced the rejected token.
            if self._token is not None and self._token.value == value:
                self._token = None

    def _fetch_token(self) -> _Token:
        requested_at = self._clock()  # before the request: its latency comes out of the TTL
        try:
            response = self._http.put(TOKEN_PATH, headers={TOKEN_TTL_HEADER: str(self._token_ttl_s)})
        except httpx.RequestError as exc:
            # In a container the PUT's reply is dropped unless the instance's hop limit is 2: it times out.
            raise ImdsUnavailable(
                f"IMDS token request failed: {exc!r} (in a container, is the hop limit 2?)", path=TOKEN_PATH
            ) from exc
        if response.status_code != 200 or not response.text:
            status = response.status_code
            raise ImdsUnavailable(f"IMDS answered {status} to the token request", path=TOKEN_PATH, status=status)
        ttl = _granted_ttl(response, self._token_ttl_s)
        log.debug("imds.token.fetched", ttl_s=ttl)
        return _Token(response.text, requested_at + ttl - min(TOKEN_REFRESH_MARGIN_S, ttl / 2))

    # -- requests ----------------------------------------------------------------------------

    def _send(self, path: str, token: str) -> ImdsResponse:
        try:
            response = self._http.get(path, headers={TOKEN_HEADER: token})
        except httpx.RequestError as exc:
            raise ImdsUnavailable(f"IMDS request for {path} failed: {exc!r}", path=path) from exc
        return ImdsResponse(response.status_code, response.text)


def _granted_ttl(response: httpx.Response, requested: int) -> int:
    """The TTL IMDS says it granted (it echoes the header); the requested one if it doesn't say."""
    try:
        granted = int(response.headers.get(TOKEN_TTL_HEADER, ""))
    except ValueError:
        return requested
    return granted if 0 < granted <= requested else requested


@dataclass(frozen=True)
class InstanceIdentity:
    """Who this instance is. The Auto Scaling group name is not in IMDS: ask the Auto Scaling API."""

    instance_id: str
    instance_type: str
    region: str
    availability_zone: str | None = None


def instance_identity(client: ImdsClient) -> InstanceIdentity:
    """Read the identity document; fall back to the single meta-data paths if it is unusable.

    Raises :class:`ImdsUnavailable` on transient failures and :class:`ImdsError` when IMDS has no
    answer for a field.
    """
    document = _identity_document(client)
    if document is not None:
        return document
    zone = _optional_text(client, AVAILABILITY_ZONE_PATH)
    region = _optional_text(client, REGION_PATH) or (zone[:-1] if zone else None)
    if region is None:
        raise ImdsError("IMDS has neither placement/region nor placement/availability-zone", path=REGION_PATH)
    return InstanceIdentity(
        instance_id=_required_text(client, INSTANCE_ID_PATH),
        instance_type=_required_text(client, INSTANCE_TYPE_PATH),
        region=region,
        availability_zone=zone,
    )


def _identity_document(client: ImdsClient) -> InstanceIdentity | None:
    response = client.get(IDENTITY_DOCUMENT_PATH)
    if not response.ok:
        log.warning("imds.identity.document_missing", status=response.status)
        return None
    try:
        document = json.loads(response.text)
        return InstanceIdentity(
            instance_id=str(document["instanceId"]),
            instance_type=str(document["instanceType"]),
            region=str(document["region"]),
            availability_zone=document.get("availabilityZone"),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("imds.identity.document_malformed", error=repr(exc))
        return None


def _optional_text(client: ImdsClient, path: str) -> str | None:
    response = client.get(path)
    if response.status == 404:
        return None
    if not response.ok:
        raise ImdsError(f"IMDS answered {response.status} for {path}", path=path, status=response.status)
    return response.text.strip() or None


def _required_text(client: ImdsClient, path: str) -> str:
    text = _optional_text(client, path)
    if text is None:
        raise ImdsError(f"IMDS has no {path}", path=path, status=404)
    return text
