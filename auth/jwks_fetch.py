"""Fetching a vendor's JWKS from its registered URL: allow-listed hosts only, bounded in time, size and cache.

A JWKS URL is attacker-influenced input (whoever registers it, or whoever controls DNS for it), so
the fetch is the classic SSRF surface (security checklist V17, V18). The rules here, all enforced
before or during the request, never after:

* the host must be on ``JWKS_FETCH_ALLOWED_HOSTS`` and the scheme ``https`` (plain ``http`` only on
  loopback, only when development mode allows it);
* every address the host resolves to must be public (no 10.x, 127.x, 169.254.169.254, ...), unless
  it is an allowed loopback host in development mode;
* redirects are never followed; the response must be JSON, at most ``max_bytes`` long, read with a
  connect and read timeout;
* results are cached for the server's ``max-age`` but never longer than ``max_ttl`` seconds, in a
  cache of bounded size; an unknown ``kid`` may force one refresh per URL per ``refresh_interval``.

Failures raise :class:`JwksFetchError` (fail closed): a vendor whose keys cannot be fetched cannot
authenticate.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

Resolver = Callable[[str, int], Sequence[str]]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class JwksFetchError(Exception):
    """The JWKS could not be fetched or is not a usable key set. The message names the reason."""


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (what the connection could end up using)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def check_jwks_url(url: str, allowed_hosts: Sequence[str], *, allow_insecure_loopback: bool = False) -> str:
    """Validate a JWKS URL before it is stored or fetched; returns it unchanged or raises ``ValueError``."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in {"https", "http"} or not host:
        raise ValueError("a JWKS URL must be an absolute https:// URL")
    if parts.username or parts.password:
        raise ValueError("a JWKS URL may not carry credentials")
    if parts.fragment:
        raise ValueError("a JWKS URL may not carry a fragment")
    loopback = host in LOOPBACK_HOSTS
    if parts.scheme == "http" and not (loopback and allow_insecure_loopback):
        raise ValueError("a JWKS URL must use https (plain http only for loopback in development mode)")
    if host not in {h.lower() for h in allowed_hosts}:
        raise ValueError(
            f"host {host!r} is not in JWKS_FETCH_ALLOWED_HOSTS; add it there to allow fetching keys from it"
        )
    return url


def _address_allowed(address: str, *, loopback_ok: bool) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.is_loopback:
        return loopback_ok
    return ip.is_global and not ip.is_multicast


_MAX_AGE = re.compile(r"max-age\s*=\s*(\d+)", re.IGNORECASE)


@dataclass
class _Cached:
    jwks: dict[str, Any]
    expires: float
    fetched: float


class JwksFetcher:
    """Fetches and caches vendor key sets. Thread-safe; one instance per process."""

    def __init__(
        self,
        allowed_hosts: Sequence[str],
        *,
        allow_insecure_loopback: bool = False,
        timeout: float = 5.0,
        max_bytes: int = 64 * 1024,
        max_ttl: float = 3600.0,
        default_ttl: float = 300.0,
        refresh_interval: float = 60.0,
        max_entries: int = 256,
        resolver: Resolver = system_resolver,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allowed_hosts = tuple(h.lower() for h in allowed_hosts)
        self.allow_insecure_loopback = allow_insecure_loopback
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_ttl = max_ttl
        self.default_ttl = default_ttl
        self.refresh_interval = refresh_interval
        self.max_entries = max_entries
        self.resolver = resolver
        self.session = session or requests.Session()
        self.clock = clock
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, url: str, *, force_refresh: bool = False) -> dict[str, Any]:
        """The key set at ``url``: from the cache while fresh, else fetched.

        ``force_refresh`` (an assertion named a ``kid`` we do not have) refetches at most once per
        ``refresh_interval`` per URL, so a stream of bogus ``kid``s cannot turn us into a traffic pump.
        """
        now = self.clock()
        with self._lock:
            cached = self._cache.get(url)
            if cached is not None:
                fresh = now < cached.expires
                may_refresh = now - cached.fetched >= self.refresh_interval
                if fresh and not (force_refresh and may_refresh):
                    self._cache.move_to_end(url)
                    return cached.jwks
        jwks, ttl = self._fetch(url)
        with self._lock:
            self._cache[url] = _Cached(jwks=jwks, expires=now + ttl, fetched=now)
            self._cache.move_to_end(url)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return jwks

    def _fetch(self, url: str) -> tuple[dict[str, Any], float]:
        try:
            check_jwks_url(url, self.allowed_hosts, allow_insecure_loopback=self.allow_insecure_loopback)
        except ValueError as exc:
            raise JwksFetchError(str(exc)) from None
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        loopback_ok = self.allow_insecure_loopback and host in LOOPBACK_HOSTS
        try:
            addresses = self.resolver(host, parts.port or (443 if parts.scheme == "https" else 80))
        except OSError:
            raise JwksFetchError(f"the JWKS host {host!r} does not resolve") from None
        if not addresses or not all(_address_allowed(a, loopback_ok=loopback_ok) for a in addresses):
            raise JwksFetchError(f"the JWKS host {host!r} resolves to a private or reserved address")
        try:
            response = self.session.get(
                url,
                timeout=(self.timeout, self.timeout),
                allow_redirects=False,
                stream=True,
                headers={"Accept": "application/json, application/jwk-set+json"},
            )
        except requests.RequestException as exc:
            raise JwksFetchError(f"fetching the JWKS failed ({type(exc).__name__})") from None
        with response:
            if 300 <= response.status_code < 400:
                raise JwksFetchError("the JWKS URL redirects; register the final URL instead")
            if response.status_code != 200:
                raise JwksFetchError(f"the JWKS URL answered HTTP {response.status_code}")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.max_bytes:
                raise JwksFetchError(f"the JWKS is larger than {self.max_bytes} bytes")
            body = bytearray()
            deadline = time.monotonic() + self.timeout
            try:
                for chunk in response.iter_content(8192):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise JwksFetchError(f"the JWKS is larger than {self.max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise JwksFetchError("the JWKS took too long to download")
            except requests.RequestException as exc:
                raise JwksFetchError(f"reading the JWKS failed ({type(exc).__name__})") from None
            ttl = self._ttl(response.headers.get("Cache-Control", ""))
        try:
            data = json.loads(bytes(body))
        except ValueError:
            raise JwksFetchError("the JWKS is not valid JSON") from None
        return validate_jwks(data), ttl

    def _ttl(self, cache_control: str) -> float:
        if "no-store" in cache_control.lower() or "no-cache" in cache_control.lower():
            return 0.0
        match = _MAX_AGE.search(cache_control)
        ttl = float(match.group(1)) if match else self.default_ttl
        return min(ttl, self.max_ttl)


def validate_jwks(data: Any) -> dict[str, Any]:
    """A JWKS we can use: ``{"keys": [...]}`` of public RSA/EC keys, each with a unique ``kid``.

    Raises :class:`JwksFetchError` naming the problem. Private members are refused outright: a
    vendor that sends us its private key has leaked it and must make a new one.
    """
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise JwksFetchError('a JWKS must be a JSON object {"keys": [...]} with at least one key')
    seen: set[tuple[str, str]] = set()
    for index, key in enumerate(data["keys"]):
        if not isinstance(key, dict):
            raise JwksFetchError(f"keys[{index}] is not a JSON object")
        kty, kid = key.get("kty"), key.get("kid")
        if kty not in {"RSA", "EC"}:
            raise JwksFetchError(f"keys[{index}]: kty must be RSA or EC (SMART: RS384 or ES384)")
        if not isinstance(kid, str) or not kid:
            raise JwksFetchError(f"keys[{index}]: every key needs a kid")
        if any(member in key for member in ("d", "p", "q", "dp", "dq", "qi", "k")):
            raise JwksFetchError(
                f"keys[{index}] ({kid}) contains private key material; send public keys only"
            )
        if (kid, kty) in seen:
            raise JwksFetchError(f"keys[{index}]: kid {kid!r} is used by more than one {kty} key")
        seen.add((kid, kty))
    return data
