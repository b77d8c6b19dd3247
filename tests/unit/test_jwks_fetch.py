"""Vendor JWKS fetching: allow-listed, bounded, cached within limits, refreshed at most so often."""

from __future__ import annotations

from typing import TypedDict, Unpack

import pytest
import responses

from auth.jwks_fetch import JwksFetcher, JwksFetchError, check_jwks_url

URL = "https://keys.vendor.example/jwks.json"
JWKS = {"keys": [{"kty": "EC", "kid": "a", "crv": "P-384", "x": "x", "y": "y"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Limits(TypedDict, total=False):
    """The JwksFetcher limits a test sets."""

    max_ttl: float
    refresh_interval: float
    max_entries: int


def fetcher(clock: Clock, **limits: Unpack[Limits]) -> JwksFetcher:
    return JwksFetcher(
        ["keys.vendor.example"], resolver=lambda h, p: ["93.184.216.34"], clock=clock, **limits
    )


@responses.activate
def test_cache_honours_max_age_but_never_beyond_our_cap() -> None:
    clock = Clock()
    responses.get(URL, json=JWKS, headers={"Cache-Control": "max-age=31536000"})
    jwks = fetcher(clock, max_ttl=600)
    jwks.get(URL)
    clock.now += 599
    jwks.get(URL)
    assert len(responses.calls) == 1
    clock.now += 2
    jwks.get(URL)
    assert len(responses.calls) == 2


@responses.activate
def test_unknown_kid_refresh_is_rate_limited() -> None:
    clock = Clock()
    responses.get(URL, json=JWKS, headers={"Cache-Control": "max-age=3600"})
    jwks = fetcher(clock, refresh_interval=60)
    jwks.get(URL)
    for _ in range(10):
        jwks.get(URL, force_refresh=True)
    assert len(responses.calls) == 1
    clock.now += 61
    jwks.get(URL, force_refresh=True)
    assert len(responses.calls) == 2


@responses.activate
def test_cache_is_bounded() -> None:
    clock = Clock()
    for n in range(5):
        responses.get(f"https://keys.vendor.example/{n}.json", json=JWKS)
    jwks = fetcher(clock, max_entries=2)
    for n in range(5):
        jwks.get(f"https://keys.vendor.example/{n}.json")
    assert len(jwks._cache) == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"keys": []}', "at least one key"),
        ('{"keys": [{"kty": "oct", "kid": "a", "k": "c2VjcmV0"}]}', "RSA or EC"),
        ('{"keys": [{"kty": "EC", "crv": "P-384", "x": "x", "y": "y"}]}', "needs a kid"),
    ],
)
@responses.activate
def test_unusable_key_sets_fail_closed(body: str, message: str) -> None:
    responses.get(URL, body=body, content_type="application/json")
    with pytest.raises(JwksFetchError, match=message):
        fetcher(Clock()).get(URL)


@responses.activate
def test_errors_and_timeouts_fail_closed() -> None:
    import requests

    responses.get(URL, status=500)
    with pytest.raises(JwksFetchError, match="HTTP 500"):
        fetcher(Clock()).get(URL)
    responses.replace(responses.GET, URL, body=requests.Timeout())
    with pytest.raises(JwksFetchError, match="Timeout"):
        fetcher(Clock()).get(URL)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://keys.vendor.example@evil.example/jwks.json", "credentials"),
        ("https://evil.example/jwks.json", "not in JWKS_FETCH_ALLOWED_HOSTS"),
        ("http://keys.vendor.example/jwks.json", "https"),
        ("file:///etc/passwd", "absolute https"),
        ("http://127.0.0.1:9/jwks.json", "https"),
    ],
)
def test_urls_are_checked_before_any_request(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_jwks_url(url, ["keys.vendor.example", "127.0.0.1"])


def test_loopback_only_in_development_mode() -> None:
    assert check_jwks_url("http://127.0.0.1:9/j.json", ["127.0.0.1"], allow_insecure_loopback=True)
    jwks = JwksFetcher(["127.0.0.1"], allow_insecure_loopback=False, resolver=lambda h, p: ["127.0.0.1"])
    with pytest.raises(JwksFetchError):
        jwks.get("https://127.0.0.1/j.json")
