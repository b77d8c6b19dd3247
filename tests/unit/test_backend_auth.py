"""SMART Backend Services client: what every assertion says, and how access tokens are fetched and kept.

The token endpoint is faked at the transport (``responses``); assertions are decoded with our public
JWKS exactly as an EHR would verify them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import requests
import responses
import time_machine
from joserfc import jwt
from joserfc.jwk import KeySet

from auth.backend import (
    ASSERTION_TYPE,
    BackendTokenSource,
    SmartConfigurationCache,
    TokenError,
    UnsafeUrlError,
    client_assertion,
    require_secure_url,
)
from auth.keys import Keyring

TOKEN_URL = "https://ehr.example/oauth2/token"
BASE = "https://ehr.example/fhir/r4"


@pytest.fixture
def keyring(keys_dir: Path) -> Keyring:
    return Keyring(keys_dir)


def decode(assertion: str, keyring: Keyring) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify like an EHR: our published JWKS, only RS384/ES384 accepted."""
    token = jwt.decode(
        assertion, KeySet.import_key_set({"keys": keyring.jwks()["keys"]}), algorithms=["RS384", "ES384"]
    )
    return dict(token.header), dict(token.claims)


def form_of(call: Any) -> dict[str, list[str]]:
    return parse_qs(call.request.body)


def token_response(**extra: Any) -> dict[str, Any]:
    return {"access_token": "at-1", "token_type": "Bearer", "expires_in": 300, "scope": "system/*.c", **extra}


def source(keyring: Keyring, **kwargs: Any) -> BackendTokenSource:
    kwargs.setdefault("sleep", lambda _s: None)
    return BackendTokenSource(
        client_id="bridge-1", scopes="system/Observation.c", token_url=TOKEN_URL, keyring=keyring, **kwargs
    )


def test_a_thousand_assertions_follow_smart_and_never_repeat_a_jti(keyring: Keyring) -> None:
    signing = keyring.signing_key()
    seen: set[str] = set()
    for _ in range(1000):
        now = time.time()
        header, claims = decode(client_assertion(keyring, client_id="bridge-1", token_url=TOKEN_URL), keyring)
        assert header == {"alg": "RS384", "typ": "JWT", "kid": signing.kid}
        assert claims["iss"] == claims["sub"] == "bridge-1"
        assert claims["aud"] == TOKEN_URL
        assert isinstance(claims["exp"], int)
        assert claims["exp"] - now <= 300, "SMART: exp at most five minutes ahead"
        assert claims["exp"] - claims["iat"] == 240, "a minute of margin for our clock running fast"
        assert claims["jti"] not in seen
        assert len(claims["jti"]) >= 32
        seen.add(claims["jti"])
    assert len(seen) == 1000


def test_es384_keys_sign_es384_assertions(tmp_path: Path) -> None:
    keyring = Keyring(tmp_path / "ec", alg="ES384")
    keyring.ensure()
    header, claims = decode(client_assertion(keyring, client_id="c", token_url=TOKEN_URL), keyring)
    assert header["alg"] == "ES384" and header["kid"] == keyring.signing_key().kid
    assert claims["aud"] == TOKEN_URL


def test_a_lifetime_over_five_minutes_is_refused(keyring: Keyring) -> None:
    with pytest.raises(ValueError, match="300"):
        client_assertion(keyring, client_id="c", token_url=TOKEN_URL, lifetime=301)


@responses.activate
def test_token_request_is_a_smart_client_credentials_form(keyring: Keyring) -> None:
    responses.post(TOKEN_URL, json=token_response())
    assert source(keyring).token() == "at-1"
    form = form_of(responses.calls[0])
    assert form["grant_type"] == ["client_credentials"]
    assert form["scope"] == ["system/Observation.c"]
    assert form["client_assertion_type"] == [ASSERTION_TYPE]
    _, claims = decode(form["client_assertion"][0], keyring)
    assert claims["aud"] == TOKEN_URL and claims["iss"] == "bridge-1"


@responses.activate
def test_every_retry_carries_a_new_assertion(keyring: Keyring) -> None:
    responses.post(TOKEN_URL, body=requests.ConnectionError("refused"))
    responses.post(TOKEN_URL, status=503)
    responses.post(TOKEN_URL, json=token_response())
    assert source(keyring).token() == "at-1"
    jtis = [decode(form_of(c)["client_assertion"][0], keyring)[1]["jti"] for c in responses.calls[1:]]
    assert len(responses.calls) == 3
    assert len(set(jtis)) == len(jtis) == 2


@responses.activate
def test_token_is_reused_until_shortly_before_it_expires(keyring: Keyring) -> None:
    responses.post(TOKEN_URL, json=token_response(access_token="first", expires_in=300))
    responses.post(TOKEN_URL, json=token_response(access_token="second", expires_in=300))
    with time_machine.travel(time.time() + 86400, tick=False) as clock:
        tokens = source(keyring)
        assert tokens.token() == "first"
        clock.shift(269)
        assert tokens.token() == "first"
        assert len(responses.calls) == 1
        clock.shift(2)  # 271 s: within 30 s of expiry
        assert tokens.token() == "second"
        assert len(responses.calls) == 2


@pytest.mark.parametrize(
    ("expires_in", "renews_after"),
    [
        (None, 45),  # missing: assume 60 s
        (0, 45),
        (-1, 45),
        ("abc", 45),
        (True, 45),
        ("3600", 3570),  # a number in a string is still the server's word
        (1e12, 3570),  # absurd: at most an hour
        (8, 6),  # short lifetimes are believed: renewed a quarter early
    ],
)
@responses.activate
def test_odd_expires_in_is_clamped(keyring: Keyring, expires_in: Any, renews_after: float) -> None:
    body = token_response()
    if expires_in is None:
        del body["expires_in"]
    else:
        body["expires_in"] = expires_in
    responses.post(TOKEN_URL, json=body)
    with time_machine.travel(time.time() + 86400, tick=False) as clock:
        tokens = source(keyring)
        tokens.token()
        clock.shift(renews_after - 0.5)
        tokens.token()
        assert len(responses.calls) == 1
        clock.shift(1)
        tokens.token()
        assert len(responses.calls) == 2


@responses.activate
def test_twenty_threads_at_expiry_make_one_token_request(keyring: Keyring) -> None:
    def slow(_request: Any) -> tuple[int, dict[str, str], str]:
        time.sleep(0.2)
        body = '{"access_token":"t","token_type":"bearer","expires_in":300}'
        return 200, {"Content-Type": "application/json"}, body

    responses.add_callback(responses.POST, TOKEN_URL, callback=slow)
    tokens = source(keyring)
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(tokens.token())) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == ["t"] * 20
    assert len(responses.calls) == 1


@responses.activate
def test_invalid_client_is_not_retried_in_a_hot_loop(keyring: Keyring) -> None:
    responses.post(
        TOKEN_URL, status=401, json={"error": "invalid_client", "error_description": "unknown kid"}
    )
    tokens = source(keyring, failure_backoff=60)
    with pytest.raises(TokenError) as first:
        tokens.token()
    assert first.value.retryable is False
    assert first.value.error == "invalid_client"
    assert "unknown kid" in str(first.value)
    for _ in range(50):
        with pytest.raises(TokenError):
            tokens.token()
    assert len(responses.calls) == 1, "failures are remembered, not repeated per request"


@responses.activate
def test_token_endpoint_never_sees_a_token_in_error_messages(keyring: Keyring) -> None:
    responses.post(TOKEN_URL, json={"access_token": "secret-token", "token_type": "mac", "expires_in": 60})
    with pytest.raises(TokenError) as caught:
        source(keyring).token()
    assert "mac" in str(caught.value)
    assert "secret-token" not in str(caught.value)


@responses.activate
def test_invalidate_drops_only_the_refused_token(keyring: Keyring) -> None:
    responses.post(TOKEN_URL, json=token_response(access_token="old"))
    responses.post(TOKEN_URL, json=token_response(access_token="new"))
    tokens = source(keyring)
    assert tokens.token() == "old"
    tokens.invalidate("old")
    assert tokens.token() == "new"
    tokens.invalidate("old")  # a slow thread reporting the old token must not drop the new one
    assert tokens.token() == "new"
    assert len(responses.calls) == 2


@responses.activate
def test_tenants_never_receive_each_others_assertions(keyring: Keyring) -> None:
    other = "https://other-ehr.example/token"
    responses.post(TOKEN_URL, json=token_response())
    responses.post(other, json=token_response())
    source(keyring).token()
    BackendTokenSource(client_id="b", scopes="s", token_url=other, keyring=keyring).token()
    audiences = {
        call.request.url: decode(form_of(call)["client_assertion"][0], keyring)[1]["aud"]
        for call in responses.calls
    }
    assert audiences == {TOKEN_URL: TOKEN_URL, other: other}


# -- discovery --------------------------------------------------------------------------------


@responses.activate
def test_discovery_finds_the_token_endpoint_once_and_resolves_relative_urls() -> None:
    responses.get(f"{BASE}/.well-known/smart-configuration", json={"token_endpoint": "../oauth2/token"})
    cache = SmartConfigurationCache()
    assert cache.token_endpoint(BASE) == "https://ehr.example/fhir/oauth2/token"
    assert cache.token_endpoint(BASE + "/") == "https://ehr.example/fhir/oauth2/token"
    assert len(responses.calls) == 1


@responses.activate
def test_a_pinned_token_url_wins_over_discovery(keyring: Keyring) -> None:
    responses.post(TOKEN_URL, json=token_response())
    cache = SmartConfigurationCache()
    pinned = source(keyring)  # token_url given: discovery is never consulted
    assert pinned.token() == "at-1"
    assert [c.request.url for c in responses.calls] == [TOKEN_URL]
    assert cache.ttl > 0


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ({"status": 302, "headers": {"Location": "https://evil.example/conf"}}, "302"),
        ({"json": {"token_endpoint": "http://ehr.example/token"}}, "https"),
        ({"json": {"authorization_endpoint": "https://ehr.example/a"}}, "token_endpoint"),
        ({"body": "<html>login</html>"}, "JSON"),
        ({"body": "x" * 70_000}, "failed"),
    ],
)
@responses.activate
def test_discovery_fails_closed(answer: dict[str, Any], problem: str) -> None:
    responses.get(f"{BASE}/.well-known/smart-configuration", **answer)
    with pytest.raises(TokenError, match=problem):
        SmartConfigurationCache().token_endpoint(BASE)
    assert all("evil" not in str(c.request.url) for c in responses.calls)


@pytest.mark.parametrize(
    ("url", "loopback", "ok"),
    [
        ("https://ehr.example/fhir", False, True),
        ("http://ehr.example/fhir", False, False),
        ("http://ehr.example/fhir", True, False),
        ("http://127.0.0.1:8080/fhir", False, False),
        ("http://127.0.0.1:8080/fhir", True, True),
        ("http://localhost:8080/fhir", True, True),
        ("https://user:pw@ehr.example/fhir", False, False),
        ("ftp://ehr.example/fhir", False, False),
        ("/fhir", False, False),
    ],
)
def test_tokens_go_only_to_https_or_allowed_loopback(url: str, loopback: bool, ok: bool) -> None:
    if ok:
        assert require_secure_url(url, allow_insecure_loopback=loopback) == url
    else:
        with pytest.raises(UnsafeUrlError):
            require_secure_url(url, allow_insecure_loopback=loopback)
