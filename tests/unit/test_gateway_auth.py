"""API keys and per-key limits of the gateway, without a server: the Gatekeeper alone."""

from __future__ import annotations

import pytest

from sdagent.errors import ConfigError
from sdagent.gateway.auth import ANONYMOUS, Gatekeeper, NotAuthenticated, RateLimited, hash_key, new_key
from sdagent.gateway.config import ApiKey, GatewayConfig

KEY, DIGEST = new_key()


def _gatekeeper(**overrides) -> Gatekeeper:
    return Gatekeeper(GatewayConfig(api_keys=[ApiKey(name="app", sha256=DIGEST, rate_per_s=1)], **overrides))


def test_a_gateway_without_keys_or_explicit_anonymous_access_does_not_start():
    with pytest.raises(ConfigError) as raised:
        Gatekeeper(GatewayConfig())
    assert "gateway.api_keys" in str(raised.value)


def test_new_keys_are_distinct_and_config_holds_only_their_digest():
    key, digest = new_key()
    assert key.startswith("sdk_") and key != KEY
    assert digest == hash_key(key) and key not in digest and len(digest) == 64


def test_a_known_key_is_accepted_by_bearer_or_x_api_key():
    gatekeeper = _gatekeeper()
    assert gatekeeper.authenticate(f"Bearer {KEY}", None).name == "app"
    assert gatekeeper.authenticate(f"bearer {KEY}", None).name == "app"
    assert gatekeeper.authenticate(None, KEY).name == "app"


@pytest.mark.parametrize("authorization, api_key", [
    (None, None), ("Bearer sdk_unknown", None), (f"Basic {KEY}", None), ("Bearer ", None), (None, "sdk_unknown"),
])  # fmt: skip
def test_a_missing_or_unknown_key_is_not_authenticated(authorization, api_key):
    with pytest.raises(NotAuthenticated):
        _gatekeeper().authenticate(authorization, api_key)


def test_anonymous_calls_only_when_allowed_explicitly_and_a_wrong_key_still_fails():
    gatekeeper = _gatekeeper(allow_anonymous=True)
    assert gatekeeper.authenticate(None, None).name == ANONYMOUS
    with pytest.raises(NotAuthenticated):
        gatekeeper.authenticate("Bearer sdk_unknown", None)


def test_a_caller_over_its_rate_is_limited_with_a_retry_after_and_others_are_not():
    gatekeeper = _gatekeeper(allow_anonymous=True)
    app = gatekeeper.authenticate(None, KEY)
    gatekeeper.admit(app)
    with pytest.raises(RateLimited) as raised:
        gatekeeper.admit(app)
    assert raised.value.retry_after_s >= 1
    gatekeeper.admit(gatekeeper.authenticate(None, None))  # the anonymous caller has its own budget


def test_duplicate_key_names_are_a_config_error():
    with pytest.raises(ValueError, match="unique"):
        GatewayConfig(api_keys=[ApiKey(name="a", sha256=DIGEST), ApiKey(name="a", sha256=hash_key("x"))])


def test_a_burst_allows_more_at_once_while_the_window_keeps_the_average_rate():
    gatekeeper = Gatekeeper(GatewayConfig(api_keys=[ApiKey(name="bursty", sha256=DIGEST, rate_per_s=2, burst=6)]))
    caller = gatekeeper.authenticate(None, KEY)
    for _ in range(6):
        gatekeeper.admit(caller)
    with pytest.raises(RateLimited):
        gatekeeper.admit(caller)
    limit = caller.limit()
    assert (limit.amount, limit.get_expiry()) == (6, 3)  # 6 requests per 3 s: 2 a second on average
