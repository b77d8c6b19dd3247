"""The vendor token endpoint and SMART discovery; the OAuth work itself is ``auth.vendor_tokens``."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from authlib.oauth2.rfc6749 import OAuth2Error
from flask import Blueprint, Flask, Response, current_app, jsonify, request

from auth.jwks_fetch import JwksFetcher
from auth.vendor_tokens import TokenIssuer, TokenVerifier, VendorAuthorizationServer, smart_configuration
from fhir_bridge import services
from fhir_bridge.api.common import VERIFIER_KEY
from fhir_bridge.errors import BridgeError, PayloadTooLarge, TooManyRequests
from fhir_bridge.vendors import DbClientStore, DbReplayStore

bp = Blueprint("oauth", __name__)
log = logging.getLogger(__name__)

SERVER_KEY = "fhir_bridge.vendor_auth_server"
LIMITER_KEY = "fhir_bridge.token_limiter"
TOKEN_PATH = "/oauth/token"  # noqa: S105 - a URL path
MAX_TOKEN_REQUEST_BYTES = 16 * 1024


class SlidingWindowLimiter:
    """At most ``limit`` events per ``window`` seconds per key, in this process (V20: token floods).

    Per process on purpose: it bounds how much signature work one process can be made to do; the
    real defence against a distributed flood belongs in front of the service (load balancer).
    """

    def __init__(self, limit: int, window: float, max_keys: int = 10_000) -> None:
        self.limit, self.window, self.max_keys = limit, window, max_keys
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, now: float | None = None) -> int:
        """Record an event; 0 if allowed, else the seconds until one would be."""
        now = time.monotonic() if now is None else now
        with self._lock:
            events = self._events.get(key)
            if events is None:
                if len(self._events) >= self.max_keys:
                    self._events.clear()
                events = self._events[key] = deque()
            while events and events[0] <= now - self.window:
                events.popleft()
            if len(events) >= self.limit:
                return max(1, int(events[0] + self.window - now) + 1)
            events.append(now)
            return 0


class OAuthError(BridgeError):
    """An RFC 6749 §5.2 error; ``errors.py`` renders it with ``error`` and ``error_description``."""


def init_app(app: Flask) -> None:
    svc = services.from_app(app)
    settings = svc.settings
    fetcher = JwksFetcher(
        settings.jwks_fetch_allowed_hosts, allow_insecure_loopback=settings.allow_insecure_loopback
    )
    issuer = TokenIssuer(
        keyring=svc.keyring, issuer=lambda: settings.public_url, lifetime=settings.vendor_token_lifetime
    )
    app.extensions[SERVER_KEY] = VendorAuthorizationServer(
        clients=lambda: DbClientStore(svc.db),
        replay_store=lambda: DbReplayStore(svc.db),
        token_url=lambda: settings.url(TOKEN_PATH),
        issuer=issuer,
        fetcher=fetcher,
    )
    app.extensions[VERIFIER_KEY] = TokenVerifier(keyring=svc.keyring, issuer=lambda: settings.public_url)
    app.extensions[LIMITER_KEY] = SlidingWindowLimiter(limit=120, window=60.0)
    app.register_blueprint(bp)


@bp.post(TOKEN_PATH)
def token() -> Response:
    """Client credentials with a private_key_jwt assertion -> a short-lived bearer token."""
    # Before the form is read (V13): a declared size is refused outright, a chunked body is cut off
    # by Werkzeug at the same limit.
    if request.content_length is not None and request.content_length > MAX_TOKEN_REQUEST_BYTES:
        raise PayloadTooLarge(f"A token request is at most {MAX_TOKEN_REQUEST_BYTES} bytes.")
    request.max_content_length = MAX_TOKEN_REQUEST_BYTES
    limiter = current_app.extensions[LIMITER_KEY]
    wait = limiter.hit(request.remote_addr or "-")
    if wait:
        raise TooManyRequests("Too many token requests; reuse tokens until they expire.", retry_after=wait)
    server: VendorAuthorizationServer = current_app.extensions[SERVER_KEY]
    response: Response = server.create_token_response()
    if response.status_code != 200:
        # Authlib rendered an RFC 6749 error; re-raise it through the one error handler.
        body = response.get_json(silent=True) or {}
        log.info(
            "token request refused",
            extra={"error_code": str(body.get("error", "")), "status": response.status_code},
        )
        headers = {k: v for k, v in response.headers.items() if k == "WWW-Authenticate"}
        raise OAuthError(
            str(body.get("error_description") or body.get("error") or "The token request was refused."),
            code=str(body.get("error", "invalid_request")),
            status=response.status_code,
            headers=headers,
        )
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


@bp.get("/.well-known/smart-configuration")
def smart_config() -> Response:
    settings = services.current().settings
    response = jsonify(
        smart_configuration(
            token_url=settings.url(TOKEN_PATH),
            jwks_url=settings.url("/.well-known/jwks.json"),
            issuer=settings.public_url,
        )
    )
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


__all__ = ["OAuth2Error", "SlidingWindowLimiter", "bp", "init_app"]
