"""SMART App Launch, client side, without a web framework: issuer checks, discovery, PKCE, tokens, id_token.

The Flask views in :mod:`smart_app` call these functions; everything here is plain Python so each
hostile case of the security checklist (L, C, D, I rows) can be tested without a browser. Rules
that the SMART App Launch 2.2 IG leaves open are decided here, once:

* an ``iss`` is compared with registered FHIR bases only after :func:`normalize_base_url`, by exact
  string equality, and no network request is ever made for one that does not match
  (HL7/smart-app-launch#230);
* discovery endpoints must agree with the tenant's pins, pins win, and relative endpoints are
  resolved against the FHIR base (conformance.html#using-well-known);
* PKCE S256 is always sent, whatever discovery advertises (client-js#174);
* token responses are typed strictly and clamped, and launch context ids must look like FHIR ids;
* an ``id_token``'s issuer is compared with the pinned issuer before any key is fetched.

Error messages never quote the input that caused them: they end up on a page inside the EHR.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import orjson
import requests
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

# -- errors -----------------------------------------------------------------------------------


class LaunchError(Exception):
    """A launch cannot go on. ``code`` is stable (tests and logs use it); ``message`` is for a person."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidIssuer(LaunchError):
    """The ``iss`` (or a configured URL) is not an acceptable FHIR base URL."""


class DiscoveryError(LaunchError):
    """The EHR's ``.well-known/smart-configuration`` is unusable or disagrees with the tenant's pins."""


class TokenError(LaunchError):
    """The token endpoint refused us or answered something we cannot trust.

    ``relaunch`` says whether starting the launch again from the EHR is the way out (an expired or
    reused code, a revoked refresh token), as opposed to a configuration problem for hospital IT.
    """

    def __init__(self, code: str, message: str, *, relaunch: bool = False) -> None:
        super().__init__(code, message)
        self.relaunch = relaunch


class IdTokenError(LaunchError):
    """The ``id_token`` does not prove who the clinician is."""


# -- URLs -------------------------------------------------------------------------------------

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_URL_LENGTH = 2048
_DEFAULT_PORTS = {"https": 443, "http": 80}
_CONTROL = re.compile(r"[\x00-\x20\x7f-\uffff\\]")


def normalize_base_url(raw: str, *, allow_insecure_loopback: bool = False) -> str:
    """The one canonical spelling of a FHIR base URL, or :class:`InvalidIssuer`.

    Scheme and host are lower-cased, a default port is dropped, one trailing slash is dropped. What
    cannot be spelled one way only is refused rather than guessed at: user info, query, fragment,
    percent-encoding, backslashes, whitespace or non-ASCII characters, empty or dot path segments.
    Only ``https`` is accepted, except plain ``http`` to a loopback host when the development
    exception is on. Two spellings of one tenant normalise to the same string; nothing normalises
    into a *different* tenant, because the result is compared by exact equality.
    """
    if not isinstance(raw, str) or not raw or len(raw) > MAX_URL_LENGTH:
        raise InvalidIssuer("invalid-iss", "The EHR sent an issuer (iss) that is missing or too long.")
    if _CONTROL.search(raw) or "%" in raw or "@" in raw:
        raise InvalidIssuer("invalid-iss", "The issuer (iss) contains characters a FHIR base URL may not.")
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise InvalidIssuer("invalid-iss", "The issuer (iss) is not a valid URL.") from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not host or parts.username is not None or parts.password is not None:
        raise InvalidIssuer("invalid-iss", "The issuer (iss) is not an absolute URL with a host name.")
    if parts.query or parts.fragment or raw.endswith(("?", "#")):
        raise InvalidIssuer("invalid-iss", "The issuer (iss) may not carry a query or fragment.")
    if scheme == "http":
        if not (allow_insecure_loopback and host in LOOPBACK_HOSTS):
            raise InvalidIssuer("insecure-iss", "The issuer (iss) must use https.")
    elif scheme != "https":
        raise InvalidIssuer("invalid-iss", "The issuer (iss) must be an https URL.")
    path = parts.path.rstrip("/")
    segments = path.split("/")[1:] if path else []
    if any(seg in {"", ".", ".."} for seg in segments):
        raise InvalidIssuer("invalid-iss", "The issuer (iss) has an empty or relative path segment.")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    return urlunsplit((scheme, netloc, path, "", ""))


def is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint_url(url: str, *, allow_insecure_loopback: bool, what: str) -> str:
    """An absolute https URL (or loopback http in development) for an OAuth endpoint, or an error."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH or _CONTROL.search(url):
        raise DiscoveryError("bad-endpoint", f"The EHR's {what} is not a usable URL.")
    parts = urlsplit(url)
    if parts.username is not None or parts.fragment or not parts.hostname:
        raise DiscoveryError("bad-endpoint", f"The EHR's {what} is not a usable URL.")
    if parts.scheme == "https":
        return url
    if parts.scheme == "http" and allow_insecure_loopback and is_loopback(url):
        return url
    raise DiscoveryError("insecure-endpoint", f"The EHR's {what} does not use https.")


# -- bounded HTTP -----------------------------------------------------------------------------

MAX_DISCOVERY_BYTES = 256 * 1024
MAX_TOKEN_RESPONSE_BYTES = 64 * 1024


def _read_bounded(response: requests.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(16384):
        size += len(chunk)
        if size > limit:
            response.close()
            raise DiscoveryError("response-too-large", "The EHR answered with more data than expected.")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise DiscoveryError("not-json", "The EHR answered with something that is not JSON.") from None
    if not isinstance(data, dict):
        raise DiscoveryError("not-json", "The EHR answered with JSON that is not an object.")
    return data


def get_json(
    http: requests.Session, url: str, *, timeout: float, max_bytes: int = MAX_DISCOVERY_BYTES
) -> dict[str, Any]:
    """GET a JSON object with a size cap and a time limit, following no redirect (D1)."""
    try:
        with http.get(
            url, headers={"Accept": "application/json"}, timeout=timeout, allow_redirects=False, stream=True
        ) as response:
            if response.status_code != 200:
                status = response.status_code
                message = f"The EHR answered HTTP {status} where JSON was expected."
                raise DiscoveryError("discovery-failed", message)
            body = _read_bounded(response, max_bytes)
    except requests.RequestException:
        raise DiscoveryError("ehr-unreachable", "The EHR could not be reached.") from None
    return _parse_json_object(body)


# -- discovery --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pins:
    """Endpoints hospital IT pinned for a tenant; ``None`` means "take it from discovery"."""

    authorize_url: str | None = None
    token_url: str | None = None
    issuer: str | None = None
    jwks_uri: str | None = None


@dataclass(frozen=True)
class SmartConfiguration:
    """The endpoints a launch uses, after pins and discovery were reconciled."""

    authorization_endpoint: str
    token_endpoint: str
    issuer: str | None = None
    jwks_uri: str | None = None
    code_challenge_methods: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    id_token_algs: tuple[str, ...] = ()

    @property
    def advertises_s256(self) -> bool:
        return "S256" in self.code_challenge_methods


def discovery_url(fhir_base: str) -> str:
    # Appended to the base even when the base has a path (conformance.html#using-well-known).
    return fhir_base.rstrip("/") + "/.well-known/smart-configuration"


def _same_url(a: str, b: str) -> bool:
    def canon(url: str) -> str:
        parts = urlsplit(url)
        netloc = (parts.hostname or "").lower()
        if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme.lower()):
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), parts.query, ""))

    return canon(a) == canon(b)


def _str_tuple(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(item for item in value if isinstance(item, str))


def resolve_configuration(
    document: Mapping[str, Any] | None, *, fhir_base: str, pins: Pins, allow_insecure_loopback: bool
) -> SmartConfiguration:
    """Reconcile discovery with pins: a pinned value wins, a different discovered value is refused (D3).

    ``document`` may be ``None`` when discovery failed; that is only acceptable if both OAuth
    endpoints are pinned.
    """
    doc = document or {}

    def pick(name: str, pinned: str | None, what: str, *, required: bool) -> str | None:
        found = doc.get(name)
        if found is not None and not isinstance(found, str):
            raise DiscoveryError("bad-discovery", f"The EHR's discovery document has an invalid {what}.")
        if found:
            found = urljoin(fhir_base.rstrip("/") + "/", found)  # relative -> against the base (D4)
            check_endpoint_url(found, allow_insecure_loopback=allow_insecure_loopback, what=what)
        if pinned:
            check_endpoint_url(pinned, allow_insecure_loopback=allow_insecure_loopback, what=what)
            if found and not _same_url(found, pinned):
                raise DiscoveryError(
                    "pin-mismatch",
                    f"The EHR's discovery document names a different {what} than the one registered "
                    "for this EHR. Hospital IT must confirm the change and update the registration.",
                )
            return pinned
        if required and not found:
            raise DiscoveryError("bad-discovery", f"The EHR's discovery document has no {what}.")
        return found or None

    authorize = pick("authorization_endpoint", pins.authorize_url, "authorization endpoint", required=True)
    token = pick("token_endpoint", pins.token_url, "token endpoint", required=True)
    issuer = pick("issuer", pins.issuer, "issuer", required=False)
    jwks = pick("jwks_uri", pins.jwks_uri, "JWKS URL", required=False)
    assert authorize is not None and token is not None
    return SmartConfiguration(
        authorization_endpoint=authorize,
        token_endpoint=token,
        issuer=issuer,
        jwks_uri=jwks,
        code_challenge_methods=_str_tuple(doc.get("code_challenge_methods_supported")),
        capabilities=_str_tuple(doc.get("capabilities")),
        id_token_algs=_str_tuple(doc.get("id_token_signing_alg_values_supported")),
    )


class DiscoveryCache:
    """Discovery documents per FHIR base, kept for ``ttl`` seconds; failures are not cached."""

    def __init__(self, ttl: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}

    def get(self, fhir_base: str, load: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        now = self._clock()
        with self._lock:
            hit = self._entries.get(fhir_base)
            if hit is not None and now - hit[0] < self.ttl:
                return hit[1]
        document = load()
        with self._lock:
            self._entries[fhir_base] = (now, document)
        return document

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# -- PKCE, state, authorize URL ---------------------------------------------------------------


def pkce_pair() -> tuple[str, str]:
    """A fresh (code_verifier, S256 code_challenge) pair (RFC 7636 §4.1-4.2)."""
    verifier = secrets.token_urlsafe(64)  # 86 characters, 512 bits
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_state() -> str:
    """A state value with 256 bits from the CSPRNG (the IG asks for at least 122)."""
    return secrets.token_urlsafe(32)


def digest(value: str) -> str:
    """SHA-256 hex of a secret value, which is what we store and look up instead of the value."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def authorize_url(
    config: SmartConfiguration,
    *,
    client_id: str,
    redirect_uri: str,
    scope: str,
    state: str,
    aud: str,
    code_challenge: str,
    launch: str | None = None,
    nonce: str | None = None,
) -> str:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
        "aud": aud,
        "code_challenge": code_challenge,
        "code_challenge_method": "S256",
    }
    if launch is not None:
        params["launch"] = launch
    if nonce is not None:
        params["nonce"] = nonce
    base = config.authorization_endpoint
    separator = "&" if urlsplit(base).query else "?"
    return base + separator + urlencode(params)


# -- scopes -----------------------------------------------------------------------------------

# What the dashboard reads, in v2 syntax; v1 is derived from it for tenants registered that way.
DEFAULT_RESOURCE_SCOPES = (
    "patient/Patient.rs",
    "patient/Observation.rs",
    "patient/Flag.rs",
    "patient/Task.rs",
)
_V2_SCOPE = re.compile(r"^(patient|user|system)/([A-Za-z]+|\*)\.(c?r?u?d?s?)(\?.*)?$")
_V1_SCOPE = re.compile(r"^(patient|user|system)/([A-Za-z]+|\*)\.(read|write|\*)$")


def to_v1(scope: str) -> str:
    """One v2 resource scope in v1 syntax (``.rs`` -> ``.read``); other scopes unchanged."""
    match = _V2_SCOPE.match(scope)
    if not match or match.group(4):
        return scope
    context, rtype, perms = match.group(1), match.group(2), match.group(3)
    reads, writes = set(perms) & set("rs"), set(perms) & set("cud")
    if reads and writes:
        return f"{context}/{rtype}.*"
    return f"{context}/{rtype}.{'write' if writes else 'read'}"


def launch_scopes(
    registered: str, *, syntax: str, kind: str, want_identity: bool = True, refresh: str = "online_access"
) -> str:
    """The scope string to ask for: the tenant's registered scopes (or ours by default) plus context.

    EHR launch asks for ``launch``; standalone asks for ``launch/patient`` (scopes-and-launch-context:
    standalone apps request context explicitly). ``online_access`` is EHR-launch only since 2.2, so a
    standalone launch asks for ``offline_access`` instead when a refresh scope is wanted.
    """
    requested = registered.split() if registered.strip() else list(DEFAULT_RESOURCE_SCOPES)
    resource = [s for s in requested if "/" in s and not s.startswith("launch")]
    others = [s for s in requested if s not in resource]
    if syntax == "v1":
        resource = [to_v1(s) for s in resource]
    context = ["launch"] if kind == "ehr" else ["launch/patient"]
    identity = ["openid", "fhirUser"] if want_identity else []
    refresh_scopes: list[str] = []
    if refresh:
        standalone_online = kind == "standalone" and refresh == "online_access"
        refresh_scopes = ["offline_access" if standalone_online else refresh]
    ordered: list[str] = []
    for scope in [*context, *identity, *resource, *refresh_scopes, *others]:
        if scope.startswith("launch") and scope not in context:
            continue  # the launch kind decides the context scope, not the registration
        if scope in {"online_access", "offline_access"} and refresh_scopes and scope not in refresh_scopes:
            continue
        if scope not in ordered:
            ordered.append(scope)
    return " ".join(ordered)


def can_read(granted: str, resource_type: str) -> bool:
    """Whether a granted scope string allows reading and searching ``resource_type`` (v1 or v2)."""
    for scope in granted.split():
        m2 = _V2_SCOPE.match(scope)
        if m2 and m2.group(1) in {"patient", "user"} and m2.group(2) in {resource_type, "*"}:
            if {"r", "s"} <= set(m2.group(3)):
                return True
            continue
        m1 = _V1_SCOPE.match(scope)
        if (
            m1
            and m1.group(1) in {"patient", "user"}
            and m1.group(2) in {resource_type, "*"}
            and m1.group(3) in {"read", "*"}
        ):
            return True
    return False


# -- token endpoint ---------------------------------------------------------------------------

FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
MIN_EXPIRES_IN = 30
MAX_EXPIRES_IN = 3600
DEFAULT_EXPIRES_IN = 300


@dataclass(frozen=True)
class TokenGrant:
    """What a token response grants, typed and checked. Repr hides the secrets."""

    access_token: str = field(repr=False)
    expires_in: int
    scope: str
    refresh_token: str | None = field(default=None, repr=False)
    id_token: str | None = field(default=None, repr=False)
    patient: str | None = None
    encounter: str | None = None
    need_patient_banner: bool = True
    intent: str | None = None


def clamp_expires_in(value: Any) -> int:
    """``expires_in`` as seconds in [30 s, 1 h]; missing or nonsense gets a short default (D7)."""
    if isinstance(value, bool):
        return DEFAULT_EXPIRES_IN
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value == value and abs(value) < 1e15:
        value = int(value)
    if not isinstance(value, int) or value <= 0:
        return DEFAULT_EXPIRES_IN
    return max(MIN_EXPIRES_IN, min(MAX_EXPIRES_IN, value))


def _context_id(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not FHIR_ID.match(value):
        raise TokenError("bad-context", f"The EHR sent a {what} context that is not a valid FHIR id.")
    return value


def parse_token_response(data: Mapping[str, Any], *, requested_scope: str) -> TokenGrant:
    """Check a successful token response (D5-D20). Extra members are ignored, never merged anywhere."""
    access = data.get("access_token")
    if not isinstance(access, str) or not access or len(access) > 16384:
        raise TokenError("no-access-token", "The EHR's token response has no access token.")
    token_type = data.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenError("bad-token-type", "The EHR issued a token type this app cannot use (not Bearer).")
    scope = data.get("scope")
    if scope is None:
        scope = requested_scope  # RFC 6749 §5.1: omitted means "as requested"
    if not isinstance(scope, str):
        raise TokenError("bad-scope", "The EHR's token response has an invalid scope.")
    refresh = data.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not refresh or len(refresh) > 16384):
        refresh = None
    id_token = data.get("id_token")
    if id_token is not None and not isinstance(id_token, str):
        raise TokenError("bad-id-token", "The EHR's token response has an invalid id_token.")
    banner = data.get("need_patient_banner")
    context = data.get("fhirContext")
    if context is not None:
        if not isinstance(context, list) or not all(isinstance(item, dict) for item in context):
            raise TokenError("bad-context", "The EHR sent a malformed fhirContext.")
        if any("role" in item and not item["role"] for item in context):
            raise TokenError("bad-context", "The EHR sent a fhirContext entry with an empty role.")
    intent = data.get("intent")
    return TokenGrant(
        access_token=access,
        expires_in=clamp_expires_in(data.get("expires_in")),
        scope=scope,
        refresh_token=refresh,
        id_token=id_token,
        patient=_context_id(data.get("patient"), "patient"),
        encounter=_context_id(data.get("encounter"), "encounter"),
        # Only a real JSON false hides the banner; "false" the string does not (D15).
        need_patient_banner=banner is not False,
        intent=intent if isinstance(intent, str) and len(intent) <= 100 else None,
    )


_OAUTH_MESSAGES = {
    "invalid_grant": "The EHR did not accept the authorization (it may have expired or been used already).",
    "invalid_client": "The EHR did not recognise this app's registration.",
    "unauthorized_client": "The EHR does not allow this app to sign in this way.",
    "invalid_scope": "The EHR refused the access this app asked for.",
    "invalid_request": "The EHR refused the token request as malformed.",
    "unsupported_grant_type": "The EHR does not support this kind of sign-in.",
}


def _token_request(
    http: requests.Session, token_url: str, form: dict[str, str], *, timeout: float, requested_scope: str
) -> TokenGrant:
    try:
        with http.post(
            token_url,
            data=form,
            headers={"Accept": "application/json"},
            timeout=timeout,
            allow_redirects=False,
            stream=True,
        ) as response:
            try:
                body = _read_bounded(response, MAX_TOKEN_RESPONSE_BYTES)
            except DiscoveryError:
                raise TokenError("token-too-large", "The EHR's token response is too large.") from None
            status = response.status_code
    except requests.RequestException:
        raise TokenError("ehr-unreachable", "The EHR's token endpoint could not be reached.") from None
    try:
        data = _parse_json_object(body)
    except DiscoveryError:
        message = f"The EHR's token endpoint answered HTTP {status} without JSON."
        raise TokenError("token-not-json", message) from None
    if status != 200:
        error = data.get("error")
        code = error if isinstance(error, str) and error in _OAUTH_MESSAGES else "token-refused"
        raise TokenError(
            code,
            _OAUTH_MESSAGES.get(code, f"The EHR's token endpoint refused the request (HTTP {status})."),
            relaunch=code == "invalid_grant",
        )
    return parse_token_response(data, requested_scope=requested_scope)


def exchange_code(
    http: requests.Session,
    token_url: str,
    *,
    code: str,
    redirect_uri: str,
    code_verifier: str,
    client_id: str,
    client_assertion: str | None,
    requested_scope: str,
    timeout: float,
) -> TokenGrant:
    """Authorization code -> tokens. A confidential client authenticates and omits ``client_id`` (A26)."""
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": code_verifier,
    }
    form.update(_client_auth(client_id, client_assertion))
    return _token_request(http, token_url, form, timeout=timeout, requested_scope=requested_scope)


def refresh_tokens(
    http: requests.Session,
    token_url: str,
    *,
    refresh_token: str,
    client_id: str,
    client_assertion: str | None,
    granted_scope: str,
    timeout: float,
) -> TokenGrant:
    """Refresh -> new tokens. Callers hold a lock: a rotated refresh token must never be sent twice."""
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    form.update(_client_auth(client_id, client_assertion))
    return _token_request(http, token_url, form, timeout=timeout, requested_scope=granted_scope)


def _client_auth(client_id: str, client_assertion: str | None) -> dict[str, str]:
    if client_assertion is None:
        return {"client_id": client_id}
    return {
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": client_assertion,
    }


# -- id_token ---------------------------------------------------------------------------------

ID_TOKEN_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384")
FHIR_USER_TYPES = frozenset({"Practitioner", "PractitionerRole", "Patient", "RelatedPerson", "Person"})
MAX_ID_TOKEN_BYTES = 16 * 1024
LEEWAY_SECONDS = 60
_WRONG_ISSUER = "The EHR's id_token comes from an issuer this EHR is not registered with."


@dataclass(frozen=True)
class Identity:
    """Who launched: a key unique across tenants (issuer + sub) and the FHIR resource they are."""

    user_key: str
    sub: str
    fhir_user: str | None


def _b64json(segment: str) -> dict[str, Any]:
    try:
        data = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise IdTokenError("bad-id-token", "The EHR's id_token is malformed.") from None
    if not isinstance(data, dict):
        raise IdTokenError("bad-id-token", "The EHR's id_token is malformed.")
    return data


def relative_fhir_user(value: Any, *, fhir_base: str) -> str:
    """``fhirUser`` as ``Type/id`` if it is a user resource on this tenant's FHIR server (I8, I9)."""
    if not isinstance(value, str) or len(value) > 512:
        raise IdTokenError("bad-fhir-user", "The EHR's id_token names the user in an invalid way.")
    relative = value
    if "://" in value:
        prefix = fhir_base.rstrip("/") + "/"
        if not value.startswith(prefix):
            raise IdTokenError("foreign-fhir-user", "The EHR's id_token names a user on another server.")
        relative = value[len(prefix) :]
    parts = relative.split("/")
    if len(parts) != 2 or parts[0] not in FHIR_USER_TYPES or not FHIR_ID.match(parts[1]):
        raise IdTokenError("bad-fhir-user", "The EHR's id_token names a user that is not a person resource.")
    return relative


def validate_id_token(
    id_token: str,
    *,
    expected_issuer: str | None,
    client_id: str,
    nonce: str | None,
    fhir_base: str,
    load_jwks: Callable[[bool], Mapping[str, Any]],
    allowed_algs: tuple[str, ...] = ID_TOKEN_ALGS,
    now: float | None = None,
) -> Identity:
    """Validate per OIDC Core §3.1.3.7 with the SMART additions (I1-I10).

    ``load_jwks(force)`` returns the issuer's JWKS; it is called only after the token's ``iss`` matched
    ``expected_issuer``, and at most once more with ``force=True`` when the ``kid`` is unknown (I7).
    """
    if not expected_issuer:
        raise IdTokenError(
            "no-issuer", "This EHR's OpenID issuer is unknown, so the clinician's identity cannot be checked."
        )
    if len(id_token) > MAX_ID_TOKEN_BYTES or id_token.count(".") != 2:
        raise IdTokenError("bad-id-token", "The EHR's id_token is malformed.")
    header_b64, payload_b64, _sig = id_token.split(".")
    header = _b64json(header_b64)
    unverified = _b64json(payload_b64)
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in allowed_algs:
        raise IdTokenError("bad-alg", "The EHR's id_token is not signed with an accepted algorithm.")
    if "crit" in header or "jku" in header or "jwk" in header or "x5u" in header:
        raise IdTokenError("bad-header", "The EHR's id_token header names keys or extensions not accepted.")
    if unverified.get("iss") != expected_issuer:
        raise IdTokenError("wrong-issuer", _WRONG_ISSUER)
    kid = header.get("kid")

    def key_set(force: bool) -> KeySet | None:
        jwks = load_jwks(force)
        keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
        if not isinstance(keys, list):
            raise IdTokenError("bad-jwks", "The EHR's signing keys could not be read.")
        usable = [k for k in keys if isinstance(k, dict) and k.get("kty") in {"RSA", "EC"} and "d" not in k]
        if kid is not None:
            usable = [k for k in usable if k.get("kid") == kid]
        if len(usable) != 1 and not (kid is None and usable):
            return None
        try:
            return KeySet.import_key_set({"keys": usable})
        except (JoseError, ValueError, TypeError):
            raise IdTokenError("bad-jwks", "The EHR's signing keys could not be read.") from None

    keys = key_set(False) or key_set(True)
    if keys is None:
        raise IdTokenError("unknown-key", "The EHR's id_token is signed with a key it does not publish.")
    try:
        token = jwt.decode(id_token, keys, algorithms=[alg])
    except (JoseError, ValueError, TypeError):
        raise IdTokenError("bad-signature", "The EHR's id_token signature does not verify.") from None
    claims = token.claims
    now = time.time() if now is None else now
    if claims.get("iss") != expected_issuer:
        raise IdTokenError("wrong-issuer", _WRONG_ISSUER)
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if client_id not in audiences:
        raise IdTokenError("wrong-audience", "The EHR's id_token was not issued to this app.")
    if len(audiences) > 1 and claims.get("azp") != client_id:
        raise IdTokenError("wrong-audience", "The EHR's id_token names several audiences but no azp.")
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int | float) or isinstance(exp, bool) or exp < now - LEEWAY_SECONDS:
        raise IdTokenError("expired", "The EHR's id_token has expired.")
    if iat is not None and (not isinstance(iat, int | float) or iat > now + LEEWAY_SECONDS):
        raise IdTokenError("bad-iat", "The EHR's id_token was issued in the future.")
    if nonce is not None and not (
        isinstance(claims.get("nonce"), str) and secrets.compare_digest(claims["nonce"], nonce)
    ):
        raise IdTokenError("bad-nonce", "The EHR's id_token does not belong to this sign-in.")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 255:
        raise IdTokenError("no-subject", "The EHR's id_token does not name the user.")
    fhir_user = claims.get("fhirUser")
    return Identity(
        user_key=f"{expected_issuer}|{sub}",
        sub=sub,
        fhir_user=relative_fhir_user(fhir_user, fhir_base=fhir_base) if fhir_user is not None else None,
    )


__all__ = [
    "DEFAULT_RESOURCE_SCOPES",
    "DiscoveryCache",
    "DiscoveryError",
    "IdTokenError",
    "Identity",
    "InvalidIssuer",
    "LaunchError",
    "Pins",
    "SmartConfiguration",
    "TokenError",
    "TokenGrant",
    "authorize_url",
    "can_read",
    "check_endpoint_url",
    "clamp_expires_in",
    "digest",
    "discovery_url",
    "exchange_code",
    "get_json",
    "launch_scopes",
    "new_state",
    "normalize_base_url",
    "parse_token_response",
    "pkce_pair",
    "refresh_tokens",
    "relative_fhir_user",
    "resolve_configuration",
    "validate_id_token",
]
