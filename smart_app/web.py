"""What makes the SMART app safe to run inside an EHR's iframe: headers, the session cookie, CSRF.

Every response of the app carries a CSP with a per-request nonce (no inline handlers, nothing from
another origin), ``frame-ancestors`` limited to the launching tenant's EHR origins (``'none'`` until
a tenant is known), ``nosniff``, ``Referrer-Policy: no-referrer`` and ``Cache-Control: no-store``.

The browser holds one opaque, random session handle and nothing else. Framed by an EHR on another
site, a cookie only comes back if it is ``SameSite=None; Secure``, and browsers that block
third-party cookies keep it only if it is ``Partitioned`` (CHIPS), so over HTTPS the cookie is
``__Host-fhir-bridge; Path=/; Secure; HttpOnly; SameSite=None; Partitioned``. Plain-HTTP loopback
development (``ALLOW_INSECURE_LOOPBACK``) gets a ``SameSite=Lax`` cookie without ``Secure``: the
sandbox EHR and the bridge are then the same site (127.0.0.1), so the iframe still sends it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from flask import Flask, g, request
from werkzeug.wrappers import Response

from auth.smart_launch import is_loopback
from fhir_bridge.errors import Forbidden
from fhir_bridge.settings import Settings

SECURE_COOKIE = "__Host-fhir-bridge"
DEV_COOKIE = "fhir-bridge-dev"
SESSION_SECONDS = 12 * 3600
CSRF_HEADER = "X-CSRF-Token"


@dataclass(frozen=True)
class CookiePolicy:
    """How the session cookie is set on this deployment, decided once from the public URL."""

    name: str
    secure: bool
    usable: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> CookiePolicy:
        if urlsplit(settings.public_url).scheme == "https":
            return cls(SECURE_COOKIE, secure=True, usable=True)
        loopback_dev = settings.allow_insecure_loopback and is_loopback(settings.public_url)
        return cls(DEV_COOKIE, secure=False, usable=loopback_dev)


def nonce() -> str:
    value = g.get("csp_nonce")
    if value is None:
        value = g.csp_nonce = secrets.token_urlsafe(16)
    return str(value)


def allow_framing_by(origins: list[str]) -> None:
    """Let this response be framed by these EHR origins (the tenant's ``frame_ancestors``)."""
    g.frame_ancestors = [o for o in origins if _is_origin(o)]


def _is_origin(value: str) -> bool:
    parts = urlsplit(value)
    return (
        parts.scheme in {"https", "http"}
        and bool(parts.hostname)
        and parts.path in {"", "/"}
        and not parts.query
        and not parts.fragment
        and not any(c in value for c in " ;,'\"")
    )


def content_security_policy(frame_ancestors: list[str], script_nonce: str) -> str:
    ancestors = " ".join(o.rstrip("/") for o in frame_ancestors) if frame_ancestors else "'none'"
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src 'nonce-{script_nonce}' 'strict-dynamic'",
            f"style-src 'self' 'nonce-{script_nonce}'",
            "img-src 'self' data:",
            "font-src 'self'",
            "connect-src 'self'",
            "form-action 'self'",
            "base-uri 'none'",
            "object-src 'none'",
            f"frame-ancestors {ancestors}",
        ]
    )


def secure_headers(response: Response, *, https: bool) -> Response:
    response.headers["Content-Security-Policy"] = content_security_policy(
        list(g.get("frame_ancestors") or []), nonce()
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin-allow-popups"
    response.headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=(), payment=()"
    if https:
        response.headers["Strict-Transport-Security"] = "max-age=31536000"
    return response


# -- the browser session handle ---------------------------------------------------------------


def browser_handle(policy: CookiePolicy) -> str | None:
    value = request.cookies.get(policy.name)
    if value and 20 <= len(value) <= 100 and value.replace("-", "").replace("_", "").isalnum():
        return value
    return None


def handle_hash(handle: str) -> str:
    return hashlib.sha256(b"browser:" + handle.encode("ascii")).hexdigest()


def new_handle() -> str:
    return secrets.token_urlsafe(32)


def set_handle(response: Response, policy: CookiePolicy, handle: str) -> None:
    if policy.secure:
        response.set_cookie(
            policy.name,
            handle,
            max_age=SESSION_SECONDS,
            path="/",
            secure=True,
            httponly=True,
            samesite="None",
            partitioned=True,
        )
    else:
        response.set_cookie(
            policy.name, handle, max_age=SESSION_SECONDS, path="/", httponly=True, samesite="Lax"
        )


# -- CSRF -------------------------------------------------------------------------------------


def csrf_token(secret_key: str, launch_id: str) -> str:
    return hmac.new(secret_key.encode(), b"csrf:" + launch_id.encode(), hashlib.sha256).hexdigest()


def check_csrf(secret_key: str, launch_id: str, public_url: str) -> None:
    """POSTs must carry the page's CSRF token, and must not come from another origin (S4)."""
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent or not hmac.compare_digest(sent, csrf_token(secret_key, launch_id)):
        raise Forbidden(
            "This action was refused because it did not come from the dashboard page. Reload the page.",
            code="csrf-failed",
        )
    origin = request.headers.get("Origin")
    if origin is not None and origin != "null":
        ours = urlsplit(public_url)
        theirs = urlsplit(origin)
        if (theirs.scheme, theirs.netloc) != (ours.scheme, ours.netloc):
            raise Forbidden("This action was refused because it came from another site.", code="csrf-failed")


def init_app(app: Flask) -> None:
    # The error page template asks for csp_nonce() so its <style> is allowed by our CSP.
    app.jinja_env.globals["csp_nonce"] = nonce
