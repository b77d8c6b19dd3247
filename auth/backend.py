"""SMART Backend Services client: signed client assertions and a per-EHR access-token cache.

We write to an EHR as a confidential client with ``private_key_jwt``
(https://hl7.org/fhir/smart-app-launch/STU2.2/backend-services.html). The assertion rules are
stricter than Authlib's defaults (RS256, one-hour ``exp``, no ``kid``, a ``jti`` that sticks when
claims are passed), so assertions are built here directly with joserfc and every rule is pinned by
tests: RS384 or ES384 from our keyring's current key, ``kid`` and ``typ: JWT`` in the header,
``iss = sub = client_id``, ``aud`` = the exact token URL, ``exp`` about four minutes ahead (at most
five, leaving a minute for clock skew), and a fresh ``jti`` for every request, retries included.

One :class:`BackendTokenSource` per EHR registration caches the access token until shortly before it
expires and lets one thread at a time fetch a new one (the others wait and reuse it). Failures are
remembered briefly, so a misconfigured client does not hammer the EHR's token endpoint.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import orjson
import requests
from joserfc import jwt

from auth.http import parse_retry_after, read_capped
from auth.keys import KeyEntry, Keyring

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART: exp no more than five minutes after now. Four leaves a minute for our clock running ahead.
ASSERTION_LIFETIME = 240
# expires_in outside this range is clamped; missing or nonsense values get the default.
MIN_TOKEN_LIFETIME = 1
MAX_TOKEN_LIFETIME = 3600
DEFAULT_TOKEN_LIFETIME = 60
# Bodies of token and discovery responses are small; anything bigger is not what we asked for.
MAX_AUTH_RESPONSE_BYTES = 64 * 1024
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class TokenError(Exception):
    """No access token: the token endpoint refused, failed, or could not be reached.

    ``retryable`` says whether waiting may help (network, 5xx, 429) or a person must fix the
    registration (``invalid_client``, ``invalid_scope``). The message never contains a token or an
    assertion; it may contain the endpoint's ``error`` code and a shortened ``error_description``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        retryable: bool,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.retryable = retryable
        self.retry_after = retry_after


class UnsafeUrlError(ValueError):
    """A URL we would send credentials to is not HTTPS (or allowed loopback HTTP), or is malformed."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_secure_url(url: str, *, allow_insecure_loopback: bool = False, what: str = "URL") -> str:
    """Return ``url`` if tokens may be sent to it: https, or http on loopback when development allows it."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise UnsafeUrlError(f"{what} must be an absolute https URL, got {url!r}")
    if parts.username or parts.password:
        raise UnsafeUrlError(f"{what} must not carry credentials in the URL")
    if parts.fragment:
        raise UnsafeUrlError(f"{what} must not carry a #fragment")
    if parts.scheme == "http" and not (allow_insecure_loopback and is_loopback(parts.hostname)):
        hint = " (plain http is accepted only on loopback with ALLOW_INSECURE_LOOPBACK)"
        raise UnsafeUrlError(f"{what} must use https, got {url!r}{hint}")
    return url


def client_assertion(
    keyring: Keyring,
    *,
    client_id: str,
    token_url: str,
    now: float | None = None,
    lifetime: int = ASSERTION_LIFETIME,
) -> str:
    """A one-time ``private_key_jwt`` assertion for ``token_url``, signed with the current key."""
    return sign_assertion(
        keyring.signing_key(), client_id=client_id, token_url=token_url, now=now, lifetime=lifetime
    )


def sign_assertion(
    entry: KeyEntry,
    *,
    client_id: str,
    token_url: str,
    now: float | None = None,
    lifetime: int = ASSERTION_LIFETIME,
) -> str:
    """The assertion signed with ``entry`` (a rotation may change the current key between calls)."""
    if not 0 < lifetime <= 300:
        raise ValueError("SMART Backend Services assertions may live at most 300 seconds")
    issued = int(time.time() if now is None else now)
    header = {"alg": entry.alg, "kid": entry.kid, "typ": "JWT"}
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "iat": issued,
        "exp": issued + lifetime,
        "jti": secrets.token_urlsafe(32),
    }
    return jwt.encode(header, claims, entry.key, algorithms=[entry.alg])


def _clamp_lifetime(raw: Any) -> int:
    """``expires_in`` as the server said it, within [1 s, 1 h]; anything unusable means 60 s."""
    if isinstance(raw, bool):
        return DEFAULT_TOKEN_LIFETIME
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return DEFAULT_TOKEN_LIFETIME
    if value != value or value <= 0:  # NaN, zero, negative
        return DEFAULT_TOKEN_LIFETIME
    return int(min(max(value, MIN_TOKEN_LIFETIME), MAX_TOKEN_LIFETIME))


def _retry_after(response: requests.Response) -> float | None:
    seconds = parse_retry_after(response.headers.get("Retry-After"))
    return None if seconds is None else min(max(seconds, 1.0), 3600.0)


@dataclass(frozen=True)
class AccessToken:
    value: str
    expires_at: float
    refresh_at: float
    scope: str


class BackendTokenSource:
    """Access tokens for one backend-services registration at one EHR. Thread-safe, single-flight.

    ``token_url`` is either the pinned URL or a callable that finds it (discovery); it is resolved on
    each fetch so a fixed pin always wins and a discovery cache can expire.
    """

    def __init__(
        self,
        *,
        client_id: str,
        scopes: str,
        token_url: str | Callable[[], str],
        keyring: Keyring,
        session: requests.Session | None = None,
        timeout: float = 30.0,
        max_attempts: int = 3,
        failure_backoff: float = 30.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client_id = client_id
        self.scopes = scopes
        self._token_url = token_url
        self.keyring = keyring
        self.session = session or requests.Session()
        self.timeout = timeout
        self.max_attempts = max_attempts
        # How long a failure is answered from memory: a refusal (a person must fix the registration)
        # for ``failure_backoff``, an outage for a Retry-After or a couple of seconds; long enough
        # that many threads do not each repeat it, short enough not to delay recovery.
        self.failure_backoff = failure_backoff
        self.clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()
        self._current: AccessToken | None = None
        self._failure: tuple[float, TokenError] | None = None
        self.fetches = 0  # token requests that got an answer; for tests and metrics

    @property
    def token_url(self) -> str:
        return self._token_url() if callable(self._token_url) else self._token_url

    def token(self) -> str:
        """A valid access token: the cached one, or a new one fetched by exactly one thread."""
        current = self._current
        if current is not None and self.clock() < current.refresh_at:
            return current.value
        with self._lock:
            current = self._current
            now = self.clock()
            if current is not None and now < current.refresh_at:
                return current.value
            if self._failure is not None and now < self._failure[0]:
                raise self._failure[1]
            try:
                fresh = self._fetch()
            except TokenError as exc:
                if exc.retry_after is not None:
                    wait = exc.retry_after
                else:
                    wait = 1.0 if exc.retryable else self.failure_backoff
                self._failure = (self.clock() + wait, exc)
                raise
            self._failure = None
            self._current = fresh
            return fresh.value

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the EHR refused it); a no-op if another thread already replaced it."""
        with self._lock:
            if self._current is not None and secrets.compare_digest(self._current.value, token):
                self._current = None

    def _fetch(self) -> AccessToken:
        token_url = self.token_url
        last: TokenError | None = None
        for attempt in range(1, self.max_attempts + 1):
            if last is not None:
                # Full jitter, so a fleet of workers does not retry in step; a short Retry-After wins.
                pause = random.uniform(0, min(8.0, 0.5 * 2 ** (attempt - 1)))  # noqa: S311
                self.sleep(max(pause, last.retry_after or 0.0))
            try:
                return self._request(token_url)
            except TokenError as exc:
                if not exc.retryable:
                    raise
                last = exc
                if exc.retry_after is not None and exc.retry_after > 10:
                    break  # the server asked for a long pause: let the caller reschedule
        assert last is not None
        raise last

    def _request(self, token_url: str) -> AccessToken:
        # A new assertion (new jti) on every try, retries included: the server may have seen the last one.
        # The key is looked up each time too, so a rotation takes effect without a restart.
        signer = self.keyring.signing_key()
        form = {
            "grant_type": "client_credentials",
            "scope": self.scopes,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": sign_assertion(signer, client_id=self.client_id, token_url=token_url),
        }
        started = self.clock()
        try:
            response = self.session.post(
                token_url,
                data=form,
                headers={"Accept": "application/json"},
                timeout=self.timeout,
                allow_redirects=False,
                stream=True,
            )
        except requests.RequestException as exc:
            raise TokenError(
                f"token endpoint {token_url} unreachable ({type(exc).__name__})", retryable=True
            ) from None
        with response:
            try:
                body = read_capped(response, MAX_AUTH_RESPONSE_BYTES)
            except (ValueError, requests.RequestException) as exc:
                raise TokenError(
                    f"token endpoint {token_url}: unreadable response ({exc})",
                    status=response.status_code,
                    retryable=True,
                ) from None
        self.fetches += 1
        status = response.status_code
        try:
            data = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        if status != 200:
            error = data.get("error") if isinstance(data.get("error"), str) else None
            description = data.get("error_description")
            detail = f": {str(description)[:200]}" if isinstance(description, str) and description else ""
            retryable = status in RETRYABLE_STATUSES
            raise TokenError(
                f"token endpoint {token_url} answered {status} {error or ''}{detail}".replace("  ", " "),
                status=status,
                error=error,
                retryable=retryable,
                retry_after=_retry_after(response) if retryable else None,
            )
        access = data.get("access_token")
        token_type = data.get("token_type")
        if not isinstance(access, str) or not access:
            raise TokenError(
                f"token endpoint {token_url} sent no access_token", status=status, retryable=False
            )
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise TokenError(
                f"token endpoint {token_url} sent token_type {token_type!r}; only bearer is supported",
                status=status,
                retryable=False,
            )
        lifetime = _clamp_lifetime(data.get("expires_in"))
        # Renew a little early: a quarter of the lifetime, at most 30 s, so a request never starts
        # with a token about to lapse.
        margin = min(30.0, lifetime / 4)
        scope = data.get("scope") if isinstance(data.get("scope"), str) else self.scopes
        assert isinstance(scope, str)
        log.info("access token obtained", extra={"kid": signer.kid, "seconds": lifetime})
        return AccessToken(
            value=access, expires_at=started + lifetime, refresh_at=started + lifetime - margin, scope=scope
        )


class SmartConfigurationCache:
    """Token endpoints found through ``{fhir_base}/.well-known/smart-configuration``, cached per base.

    Only used when a tenant has no pinned token URL: a pin always wins. Redirects are not followed
    and the body is size-capped, because the base URL is the only thing we trust here.
    """

    def __init__(
        self,
        *,
        session: requests.Session | None = None,
        ttl: float = 3600.0,
        timeout: float = 10.0,
        allow_insecure_loopback: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.session = session or requests.Session()
        self.ttl = ttl
        self.timeout = timeout
        self.allow_insecure_loopback = allow_insecure_loopback
        self.clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, str]] = {}

    def token_endpoint(self, fhir_base: str) -> str:
        base = fhir_base.rstrip("/")
        now = self.clock()
        with self._lock:
            cached = self._cache.get(base)
            if cached is not None and now < cached[0]:
                return cached[1]
        url = self._discover(base)
        with self._lock:
            self._cache[base] = (self.clock() + self.ttl, url)
        return url

    def _discover(self, base: str) -> str:
        where = f"{base}/.well-known/smart-configuration"
        try:
            response = self.session.get(
                where,
                headers={"Accept": "application/json"},
                timeout=self.timeout,
                allow_redirects=False,
                stream=True,
            )
            with response:
                body = read_capped(response, MAX_AUTH_RESPONSE_BYTES)
        except (requests.RequestException, ValueError) as exc:
            raise TokenError(f"discovery at {where} failed ({type(exc).__name__})", retryable=True) from None
        if response.status_code != 200:
            retryable = response.status_code in RETRYABLE_STATUSES
            raise TokenError(
                f"discovery at {where} answered {response.status_code}",
                status=response.status_code,
                retryable=retryable,
                retry_after=_retry_after(response) if retryable else None,
            )
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise TokenError(f"discovery at {where} did not return JSON", retryable=False) from None
        endpoint = data.get("token_endpoint") if isinstance(data, dict) else None
        if not isinstance(endpoint, str) or not endpoint:
            raise TokenError(f"discovery at {where} names no token_endpoint", retryable=False)
        # Legacy servers give relative URLs; SMART says resolve them against the FHIR base.
        resolved = urljoin(base + "/", endpoint)
        try:
            return require_secure_url(
                resolved,
                allow_insecure_loopback=self.allow_insecure_loopback,
                what="discovered token_endpoint",
            )
        except UnsafeUrlError as exc:
            raise TokenError(str(exc), retryable=False) from None
