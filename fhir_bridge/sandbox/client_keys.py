"""Public keys of confidential apps, registered inline or fetched from their JWKS URL.

Key selection follows SMART's asymmetric client authentication rules: exactly one key whose
``kid`` matches the assertion's, whose ``kty`` fits the algorithm; none or several is a failure.
A JWKS URL is fetched with a timeout and a size cap, cached for at most five minutes (less if its
``Cache-Control`` says so), and re-fetched at most every ten seconds when an unknown ``kid`` shows
up, so a client rotating keys is picked up without letting anyone hammer its JWKS host through us.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

MAX_JWKS_BYTES = 64 * 1024
MAX_CACHE_SECONDS = 300
DEFAULT_CACHE_SECONDS = 60
MIN_REFETCH_SECONDS = 10
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k"})


class ClientKeyError(Exception):
    """No usable key: the message says why, for the token endpoint's ``error_description``."""


class UnknownKid(ClientKeyError):
    pass


def select_key(keys: Any, kid: str, alg: str) -> RSAKey | ECKey:
    if not isinstance(keys, list):
        raise ClientKeyError("the client's JWKS has no keys array")
    kty = "RSA" if alg.startswith("RS") else "EC"
    matches = [k for k in keys if isinstance(k, dict) and k.get("kid") == kid]
    if not matches:
        raise UnknownKid("no key in the client's JWKS has the assertion's kid")
    if len(matches) > 1:
        raise ClientKeyError("several keys in the client's JWKS share the assertion's kid")
    jwk = matches[0]
    if jwk.get("kty") != kty or (jwk.get("alg") not in (None, alg)):
        raise ClientKeyError(f"the key with this kid is not a {kty} key for {alg}")
    if _PRIVATE_MEMBERS & set(jwk):
        raise ClientKeyError("the client's JWKS publishes private key material")
    try:
        if kty == "RSA":
            return RSAKey.import_key(jwk)
        key = ECKey.import_key(jwk)
    except (JoseError, ValueError, TypeError):
        raise ClientKeyError("the key with this kid cannot be read") from None
    if key.curve_name != "P-384":
        raise ClientKeyError("ES384 needs a P-384 key")
    return key


class ClientKeyResolver:
    def __init__(self, *, timeout: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.clock = clock
        self._cache: dict[str, tuple[list[Any], float]] = {}
        self._fetched_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def key_for(
        self, *, jwks: dict[str, Any] | None, jwks_url: str | None, kid: str, alg: str
    ) -> RSAKey | ECKey:
        if jwks is not None:
            return select_key(jwks.get("keys"), kid, alg)
        if not jwks_url:
            raise ClientKeyError("the client has no JWKS or JWKS URL registered")
        try:
            return select_key(self._keys(jwks_url, refresh=False), kid, alg)
        except UnknownKid:
            # The client may have rotated: look again, but not more often than MIN_REFETCH_SECONDS.
            return select_key(self._keys(jwks_url, refresh=True), kid, alg)

    def _keys(self, url: str, *, refresh: bool) -> list[Any]:
        now = self.clock()
        with self._lock:
            cached = self._cache.get(url)
            fresh = cached is not None and now < cached[1]
            recently = now - self._fetched_at.get(url, float("-inf")) < MIN_REFETCH_SECONDS
            if cached is not None and ((fresh and not refresh) or recently):
                return cached[0]
            self._fetched_at[url] = now
        keys, max_age = self._fetch(url)
        with self._lock:
            self._cache[url] = (keys, now + max_age)
        return keys

    def _fetch(self, url: str) -> tuple[list[Any], float]:
        try:
            with requests.get(
                url,
                timeout=self.timeout,
                allow_redirects=False,
                stream=True,
                headers={"Accept": "application/json"},
            ) as response:
                if response.status_code != 200:
                    raise ClientKeyError(f"the client's JWKS URL answered HTTP {response.status_code}")
                body = response.raw.read(MAX_JWKS_BYTES + 1, decode_content=True)
                cache_control = response.headers.get("Cache-Control", "")
        except requests.RequestException:
            raise ClientKeyError("the client's JWKS URL could not be fetched") from None
        if len(body) > MAX_JWKS_BYTES:
            raise ClientKeyError(f"the client's JWKS is larger than {MAX_JWKS_BYTES} bytes")
        try:
            data = json.loads(body)
        except ValueError:
            raise ClientKeyError("the client's JWKS URL did not return JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ClientKeyError("the client's JWKS URL did not return a JWKS")
        return data["keys"], _max_age(cache_control)


def _max_age(cache_control: str) -> float:
    for part in cache_control.split(","):
        name, _, value = part.strip().partition("=")
        if name.lower() == "no-store" or name.lower() == "no-cache":
            return 0.0
        if name.lower() == "max-age" and value.strip().isdigit():
            return float(min(int(value), MAX_CACHE_SECONDS))
    return float(DEFAULT_CACHE_SECONDS)
