"""The IMDSv2 client: token lifecycle, status handling, the endpoint helper and instance identity."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from sdagent.devstack.fake_imds import FakeImds, Reply
from sdagent.errors import ConfigError
from sdagent.lifecycle.imds import (
    DEFAULT_ENDPOINT,
    IPV6_ENDPOINT,
    TOKEN_HEADER,
    TOKEN_PATH,
    TOKEN_TTL_HEADER,
    ImdsClient,
    ImdsError,
    ImdsUnavailable,
    InstanceIdentity,
    endpoint_from_environment,
    instance_identity,
)

SPOT = "/latest/meta-data/spot/instance-action"


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ScriptedTransport(httpx.MockTransport):
    """Answers token PUTs with numbered tokens and GETs from a script; records every request."""

    def __init__(self, *gets: int | tuple[int, str], granted_ttl: str | None = None) -> None:
        super().__init__(self._handle)
        self._gets = list(gets)
        self._granted_ttl = granted_ttl
        self.requests: list[httpx.Request] = []
        self.tokens_issued = 0

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "PUT":
            self.tokens_issued += 1
            ttl = self._granted_ttl or request.headers[TOKEN_TTL_HEADER]
            return httpx.Response(200, text=f"token-{self.tokens_issued}", headers={TOKEN_TTL_HEADER: ttl})
        answer = self._gets.pop(0) if self._gets else 200
        status, text = answer if isinstance(answer, tuple) else (answer, "body")
        return httpx.Response(status, text=text)

    def get_tokens(self) -> list[str | None]:
        return [r.headers.get(TOKEN_HEADER) for r in self.requests if r.method == "GET"]


def client_with(transport: httpx.BaseTransport, clock=None, **kwargs) -> ImdsClient:
    return ImdsClient("http://imds.test", transport=transport, clock=clock or FakeMonotonic(), **kwargs)


@pytest.fixture
def fake() -> Iterator[FakeImds]:
    with FakeImds() as server:
        yield server


# -- token lifecycle ------------------------------------------------------------------------


def test_token_is_fetched_once_with_the_ttl_and_sent_on_every_get():
    transport = ScriptedTransport()
    client = client_with(transport, token_ttl_s=300)
    client.get(SPOT)
    client.get(SPOT)
    put = transport.requests[0]
    assert (put.method, put.url.path, put.headers[TOKEN_TTL_HEADER]) == ("PUT", TOKEN_PATH, "300")
    assert transport.tokens_issued == 1
    assert transport.get_tokens() == ["token-1", "token-1"]


def test_token_is_renewed_before_its_ttl_ends():
    clock = FakeMonotonic()
    transport = ScriptedTransport()
    client = client_with(transport, clock, token_ttl_s=21600)
    client.get(SPOT)
    clock.advance(21600 - 61)  # still more than the refresh margin left
    client.get(SPOT)
    clock.advance(2)  # now within the margin, but not yet expired
    client.get(SPOT)
    assert transport.get_tokens() == ["token-1", "token-1", "token-2"]


def test_short_ttl_is_renewed_at_half_its_life():
    clock = FakeMonotonic()
    transport = ScriptedTransport()
    client = client_with(transport, clock, token_ttl_s=10)
    client.get(SPOT)
    clock.advance(4.9)
    client.get(SPOT)
    clock.advance(0.2)
    client.get(SPOT)
    assert transport.get_tokens() == ["token-1", "token-1", "token-2"]


def test_a_shorter_ttl_granted_by_imds_is_honoured():
    clock = FakeMonotonic()
    transport = ScriptedTransport(granted_ttl="120")
    client = client_with(transport, clock, token_ttl_s=21600)
    client.get(SPOT)
    clock.advance(61)  # past 120 - 60 s
    client.get(SPOT)
    assert transport.tokens_issued == 2


def test_401_refreshes_the_token_and_retries_once():
    transport = ScriptedTransport(401, (200, "ok"))
    response = client_with(transport).get(SPOT)
    assert (response.status, response.text) == (200, "ok")
    assert transport.get_tokens() == ["token-1", "token-2"]


def test_401_after_a_fresh_token_is_unavailable_not_an_answer():
    transport = ScriptedTransport(401, 401, 200)
    with pytest.raises(ImdsUnavailable) as caught:
        client_with(transport).get(SPOT)
    assert caught.value.status == 401
    assert len(transport.get_tokens()) == 2  # retried once, not more


@pytest.mark.parametrize("status", [429, 500, 503])
def test_throttling_and_server_errors_raise_unavailable(status):
    with pytest.raises(ImdsUnavailable) as caught:
        client_with(ScriptedTransport(status)).get(SPOT)
    assert (caught.value.status, caught.value.path) == (status, SPOT)


@pytest.mark.parametrize("status", [200, 404, 403])
def test_other_statuses_are_returned_for_the_caller_to_judge(status):
    response = client_with(ScriptedTransport((status, "text"))).get(SPOT)
    assert (response.status, response.text, response.ok) == (status, "text", status == 200)


def test_token_request_failure_raises_unavailable(fake):
    fake.script(TOKEN_PATH, Reply(503))
    with ImdsClient(fake.endpoint) as client, pytest.raises(ImdsUnavailable) as caught:
        client.get(SPOT)
    assert (caught.value.path, caught.value.status) == (TOKEN_PATH, 503)


def test_timeout_raises_unavailable(fake):
    fake.set(SPOT, "{}", delay_s=0.5)
    with ImdsClient(fake.endpoint, timeout_s=0.1) as client, pytest.raises(ImdsUnavailable) as caught:
        client.get(SPOT)
    assert caught.value.status is None


def test_connection_refused_raises_unavailable():
    from sdagent.devstack.kafka import free_loopback_port

    with ImdsClient(f"http://127.0.0.1:{free_loopback_port()}") as client, pytest.raises(ImdsUnavailable):
        client.get(SPOT)


def test_client_recovers_when_imds_forgets_its_tokens(fake):
    fake.set(SPOT, "{}")
    with ImdsClient(fake.endpoint) as client:
        assert client.get(SPOT).status == 200
        fake.invalidate_tokens()
        assert client.get(SPOT).status == 200
    assert fake.count(TOKEN_PATH, "PUT") == 2


def test_token_expiry_on_the_server_is_avoided_by_renewing_early():
    clock = FakeMonotonic()  # one clock for both sides
    with FakeImds(clock=clock) as fake, ImdsClient(fake.endpoint, token_ttl_s=100, clock=clock) as client:
        fake.set(SPOT, "{}")
        client.get(SPOT)
        clock.advance(60)  # past the renewal point (50 s), before expiry (100 s)
        client.get(SPOT)
        clock.advance(101)  # the second token has expired on the server too
        client.get(SPOT)
        # No GET was ever refused: one token per GET, no retries.
        assert fake.count(TOKEN_PATH, "PUT") == 3
        assert fake.count(SPOT) == 3


def test_get_without_a_token_is_refused_by_the_fake(fake):
    fake.set(SPOT, "{}")
    assert httpx.get(fake.endpoint + SPOT, trust_env=False).status_code == 401


def test_proxy_variables_are_ignored(fake, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    fake.set(SPOT, "{}")
    with ImdsClient(fake.endpoint) as client:
        assert client.get(SPOT).status == 200


def test_token_ttl_outside_imds_limits_is_rejected():
    with pytest.raises(ValueError):
        ImdsClient(token_ttl_s=0)
    with pytest.raises(ValueError):
        ImdsClient(token_ttl_s=21601)


# -- endpoint override ----------------------------------------------------------------------


def test_endpoint_defaults_to_the_link_local_address():
    assert endpoint_from_environment({}) == DEFAULT_ENDPOINT


def test_endpoint_override_wins_and_loses_its_trailing_slash():
    environ = {
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:1338/",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6",
    }
    assert endpoint_from_environment(environ) == "http://127.0.0.1:1338"


def test_endpoint_mode_ipv6_picks_the_ipv6_address():
    assert endpoint_from_environment({"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6"}) == IPV6_ENDPOINT


def test_imds_disabled_gives_no_endpoint():
    assert endpoint_from_environment({"AWS_EC2_METADATA_DISABLED": "true"}) is None


@pytest.mark.parametrize(
    ("key", "value"),
    [("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv5"), ("AWS_EC2_METADATA_SERVICE_ENDPOINT", "169.254.169.254")],
)
def test_bad_endpoint_settings_name_the_variable(key, value):
    with pytest.raises(ConfigError) as caught:
        endpoint_from_environment({key: value})
    assert caught.value.key == key


# -- instance identity ----------------------------------------------------------------------


def test_identity_comes_from_the_identity_document(fake):
    fake.identity("i-0abc", "g5.xlarge", "eu-west-1", "eu-west-1b")
    with ImdsClient(fake.endpoint) as client:
        assert instance_identity(client) == InstanceIdentity("i-0abc", "g5.xlarge", "eu-west-1", "eu-west-1b")
    assert fake.count("/latest/meta-data/instance-id") == 0


def test_identity_falls_back_to_meta_data_paths_when_the_document_is_malformed(fake):
    fake.identity("i-0abc", "g5.xlarge", "eu-west-1", "eu-west-1b")
    fake.set("/latest/dynamic/instance-identity/document", "{not json")
    fake.remove("/latest/meta-data/placement/region")  # older instances: region from the zone
    with ImdsClient(fake.endpoint) as client:
        assert instance_identity(client) == InstanceIdentity("i-0abc", "g5.xlarge", "eu-west-1", "eu-west-1b")


def test_identity_without_an_instance_id_is_an_error(fake):
    fake.set("/latest/meta-data/placement/region", "us-east-1")
    with ImdsClient(fake.endpoint) as client, pytest.raises(ImdsError) as caught:
        instance_identity(client)
    assert not isinstance(caught.value, ImdsUnavailable)
    assert caught.value.path == "/latest/meta-data/instance-id"
