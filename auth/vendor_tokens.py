"""Vendor authentication: our OAuth2 token endpoint (client credentials + private_key_jwt) and its tokens.

Vendors authenticate to us the way SMART Backend Services clients authenticate to an EHR
(hl7.org/fhir/smart-app-launch/client-confidential-asymmetric.html), so the server-side rules of
that profile bind us. Authlib provides the OAuth2 machinery (grant dispatch, client authentication
registry, RFC 6749 error responses); its JWT client-assertion defaults are *not* SMART-conformant
(security checklist 1.4: RS384/ES384 refused, 1-hour ``exp`` accepted, ``jku`` ignored), so
:class:`SmartClientAssertion` replaces the verification step entirely:

* size limits before any parsing or crypto;
* ``alg`` must be RS384 or ES384 and the signature is checked with exactly those algorithms;
* no ``crit``, no embedded ``jwk``/``x5c``/``x5u``; a ``jku`` must equal the registered JWKS URL,
  and is never fetched otherwise;
* exactly one registered key matches ``kid`` and the key type the ``alg`` needs;
* ``iss`` = ``sub`` = the client id (= the ``client_id`` form field when sent); ``aud`` is exactly
  our token URL; ``exp`` is present and at most 300 s (+ leeway) ahead; ``jti`` never seen before
  for that issuer (the store is an interface the caller implements).

Access tokens are JWTs signed with our keyring (RFC 9068 ``at+jwt``): short-lived, no refresh
token, ``scope`` = what was granted. The resource server verifies them with :class:`TokenVerifier`;
whether the vendor is still enabled is the caller's check, on every request.

This module imports no ``fhir_bridge``: it talks to storage through :class:`ClientStore` and
:class:`ReplayStore`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import InvalidClientError, InvalidRequestError, InvalidScopeError
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey
from joserfc.jws import JWSRegistry

from auth.jwks_fetch import JwksFetcher, JwksFetchError
from auth.keys import Keyring

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
AUTH_METHOD = "private_key_jwt"
ASSERTION_ALGS = ("RS384", "ES384")
MAX_ASSERTION_LIFETIME = 300
LEEWAY = 60
MAX_ASSERTION_BYTES = 8 * 1024
ACCESS_TOKEN_TYP = "at+jwt"  # noqa: S105 - a JOSE media type, not a secret

# Scopes a vendor can be granted. FHIR-push scopes use SMART v2 syntax; the native API has its own.
SCOPES: Mapping[str, str] = {
    "enrollments": "Claim pairing codes and read or end the vendor's own enrollments.",
    "records.write": "Push native records (POST /api/v1/records).",
    "records.read": "Read the delivery status of the vendor's own submissions and records.",
    "relationship.read": (
        "Read the care team's goals, tasks and messages for the vendor's enrolled app users."
    ),
    "messages.write": "Post an enrolled app user's message to their care team (POST /api/v1/messages).",
    "tasks.write": "Mark an enrolled app user's task done (POST /api/v1/tasks/{id}/complete).",
    "system/Observation.c": "Push FHIR Observations (POST /fhir/Observation, Bundles).",
    "system/QuestionnaireResponse.c": (
        "Push FHIR QuestionnaireResponses (POST /fhir/QuestionnaireResponse, Bundles)."
    ),
}
DEFAULT_SCOPES = tuple(SCOPES)


def parse_scopes(text: str | Iterable[str]) -> tuple[str, ...]:
    """Split and validate a scope list; unknown scopes raise ``ValueError`` naming them."""
    items = text.split() if isinstance(text, str) else [s.strip() for s in text]
    items = [s for s in items if s]
    unknown = [s for s in items if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class RegisteredClient:
    """What the token endpoint needs to know about a vendor (implements Authlib's ClientMixin)."""

    client_id: str
    jwks: Mapping[str, Any] | None
    jwks_url: str | None
    scopes: tuple[str, ...]
    active: bool = True

    def get_client_id(self) -> str:
        return self.client_id

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == AUTH_METHOD and endpoint == "token"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"

    def get_allowed_scope(self, scope: str) -> str:
        return " ".join(s for s in scope.split() if s in self.scopes)


class ClientStore(Protocol):
    def find(self, client_id: str) -> RegisteredClient | None: ...


class ReplayStore(Protocol):
    def remember(self, issuer: str, jti: str, expires_at: datetime) -> bool:
        """Record (issuer, jti) until ``expires_at``; False when it was already there (a replay)."""
        ...


def _kty_for(alg: str) -> str:
    return "RSA" if alg.startswith("RS") else "EC"


class SmartClientAssertion(JWTBearerClientAssertion):  # type: ignore[misc]
    """``private_key_jwt`` verification to SMART Backend Services rules (see the module docstring)."""

    CLIENT_AUTH_METHOD = AUTH_METHOD

    def __init__(
        self,
        *,
        token_url: Callable[[], str],
        replay_store: Callable[[], ReplayStore],
        fetcher: JwksFetcher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(validate_jti=True, leeway=LEEWAY)
        self._token_url = token_url
        self._replay_store = replay_store
        self.fetcher = fetcher
        self.clock = clock
        self.registry = JWSRegistry(algorithms=list(ASSERTION_ALGS))

    def get_audiences(self) -> list[str]:
        return [self._token_url()]

    def __call__(self, query_client: Callable[[str], RegisteredClient | None], request: Any) -> Any:
        form = request.form
        assertion_type = form.get("client_assertion_type")
        assertion = form.get("client_assertion")
        if assertion_type is None and assertion is None:
            return None  # not this method: Authlib answers invalid_client
        if assertion_type != ASSERTION_TYPE:
            raise InvalidRequestError(f"client_assertion_type must be {ASSERTION_TYPE}")
        if not assertion:
            raise InvalidRequestError("client_assertion is missing")
        if len(assertion) > MAX_ASSERTION_BYTES:
            raise InvalidClientError(description=f"The client assertion exceeds {MAX_ASSERTION_BYTES} bytes.")
        header, claims = self._unverified(assertion)
        client_id = claims.get("iss")
        if not isinstance(client_id, str) or not client_id:
            raise InvalidClientError(description="The assertion has no 'iss' (the client id).")
        if claims.get("sub") != client_id:
            raise InvalidClientError(
                description="The assertion's 'iss' and 'sub' must both be the client id."
            )
        form_client_id = form.get("client_id")
        if form_client_id is not None and form_client_id != client_id:
            raise InvalidClientError(
                description="The client_id parameter does not match the assertion's 'iss'."
            )
        client = query_client(client_id)
        if client is None or not client.active:
            raise InvalidClientError(description="Unknown or disabled client.")
        key = self._select_key(client, header)
        try:
            token = jwt.decode(assertion, key, algorithms=[header["alg"]], registry=self.registry)
        except JoseError:
            raise InvalidClientError(description="The assertion's signature does not verify.") from None
        self._check_claims(token.claims)
        request.client = client
        return client

    def _unverified(self, assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Header and claims before verification, used only to pick the client and the key."""
        try:
            obj = jws.extract_compact(assertion.encode("ascii"), registry=self.registry)
            claims = json.loads(obj.payload)
        except (JoseError, UnicodeEncodeError, ValueError):
            raise InvalidClientError(
                description="The client assertion is not a well-formed signed JWT."
            ) from None
        header = obj.headers()
        if not isinstance(claims, dict):
            raise InvalidClientError(description="The assertion's payload is not a JSON object.")
        if "crit" in header:
            raise InvalidClientError(description="Assertions with a 'crit' header are not accepted.")
        for member in ("jwk", "x5c", "x5u"):
            if member in header:
                raise InvalidClientError(
                    description=f"The '{member}' header is not accepted; keys come from the registration."
                )
        alg = header.get("alg")
        if alg not in ASSERTION_ALGS:
            raise InvalidClientError(
                description=f"The assertion must be signed with {' or '.join(ASSERTION_ALGS)}."
            )
        if not isinstance(header.get("kid"), str) or not header["kid"]:
            raise InvalidClientError(description="The assertion header must name its key ('kid').")
        return header, claims

    def _select_key(self, client: RegisteredClient, header: Mapping[str, Any]) -> RSAKey | ECKey:
        jku = header.get("jku")
        if jku is not None and (client.jwks_url is None or jku != client.jwks_url):
            # Never fetched: an attacker-chosen jku would otherwise pick the verification key.
            raise InvalidClientError(description="The 'jku' header does not match the registered JWKS URL.")
        kid, kty = header["kid"], _kty_for(header["alg"])
        candidates = self._matching(self._client_jwks(client, refresh=False), kid, kty)
        if not candidates and client.jwks_url:
            candidates = self._matching(self._client_jwks(client, refresh=True), kid, kty)
        if len(candidates) != 1:
            reason = "no registered key" if not candidates else "more than one registered key"
            raise InvalidClientError(description=f"{reason} matches kid {kid!r} and key type {kty}.")
        data = candidates[0]
        try:
            key = KeySet.import_key_set({"keys": [data]}).keys[0]
        except (JoseError, ValueError, TypeError, KeyError):
            raise InvalidClientError(description=f"The registered key {kid!r} cannot be used.") from None
        if not isinstance(key, RSAKey | ECKey):  # pragma: no cover - kty filtered above
            raise InvalidClientError(description="Unsupported key type.")
        if isinstance(key, ECKey) and data.get("crv") != "P-384":
            raise InvalidClientError(description="ES384 needs a P-384 key.")
        return key

    @staticmethod
    def _matching(jwks: Mapping[str, Any], kid: str, kty: str) -> list[dict[str, Any]]:
        keys = jwks.get("keys", [])
        return [k for k in keys if isinstance(k, dict) and k.get("kid") == kid and k.get("kty") == kty]

    def _client_jwks(self, client: RegisteredClient, *, refresh: bool) -> Mapping[str, Any]:
        if client.jwks is not None:
            return client.jwks
        if not client.jwks_url:
            raise InvalidClientError(description="The client has no registered keys.")
        try:
            return self.fetcher.get(client.jwks_url, force_refresh=refresh)
        except JwksFetchError as exc:
            log.warning("vendor JWKS fetch failed", extra={"vendor": client.client_id})
            raise InvalidClientError(description=f"The client's JWKS could not be used: {exc}") from None

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        now = self.clock()
        exp = claims.get("exp")
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise InvalidClientError(description="The assertion needs an integer 'exp'.")
        if exp <= now - LEEWAY:
            raise InvalidClientError(description="The assertion has expired.")
        if exp - now > MAX_ASSERTION_LIFETIME + LEEWAY:
            raise InvalidClientError(description="The assertion's 'exp' is more than 5 minutes ahead.")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is not None and (not isinstance(value, int | float) or value > now + LEEWAY):
                raise InvalidClientError(description=f"The assertion's '{name}' is in the future.")
        aud = claims.get("aud")
        audience = self.get_audiences()[0]
        if isinstance(aud, list) and len(aud) == 1:
            aud = aud[0]
        if aud != audience:
            raise InvalidClientError(description=f"The assertion's 'aud' must be exactly {audience}.")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 0 < len(jti) <= 255:
            raise InvalidClientError(description="The assertion needs a 'jti' of 1 to 255 characters.")
        expires_at = datetime.fromtimestamp(exp + LEEWAY, UTC)
        if not self._replay_store().remember(str(claims["iss"]), jti, expires_at):
            raise InvalidClientError(description="This assertion's 'jti' was used before.")


class _ClientCredentials(ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = [AUTH_METHOD]  # noqa: RUF012 - Authlib's class attribute
    granted = ""

    def validate_requested_scope(self) -> None:
        requested = self.request.payload.scope
        allowed = self.client.scopes
        if not requested:
            self.granted = " ".join(allowed)
        else:
            # Down-scope to what the vendor was registered for; nothing left is an error.
            self.granted = " ".join(s for s in dict.fromkeys(requested.split()) if s in allowed)
        if not self.granted:
            raise InvalidScopeError(
                description="None of the requested scopes is granted to this client. "
                f"Allowed: {' '.join(allowed)}"
            )

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        token = self.generate_token(scope=self.granted, include_refresh_token=False)
        self.save_token(token)
        return (
            200,
            token,
            [("Content-Type", "application/json"), ("Cache-Control", "no-store"), ("Pragma", "no-cache")],
        )


@dataclass
class TokenIssuer:
    """Mints access tokens: RFC 9068 JWTs signed with the current key of our keyring."""

    keyring: Keyring
    issuer: Callable[[], str]
    lifetime: int
    clock: Callable[[], float] = time.time

    def __call__(
        self,
        grant_type: str,
        client: RegisteredClient,
        user: Any = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = False,
    ) -> dict[str, Any]:
        exact = self.clock()
        # Look the key up at the exact time: a key activated a fraction of a second ago must count.
        entry = self.keyring.signing_key(datetime.fromtimestamp(exact, UTC))
        now = int(exact)
        claims = {
            "iss": self.issuer(),
            "aud": self.issuer(),
            "sub": client.client_id,
            "client_id": client.client_id,
            "scope": scope or "",
            "iat": now,
            "exp": now + self.lifetime,
            "jti": uuid.uuid4().hex,
        }
        header = {"alg": entry.alg, "kid": entry.kid, "typ": ACCESS_TOKEN_TYP}
        token = jwt.encode(header, claims, entry.key, algorithms=[entry.alg])
        return {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            "scope": scope or "",
        }


class VendorAuthorizationServer(AuthorizationServer):  # type: ignore[misc]
    """The token endpoint: client credentials only, authenticated only by :class:`SmartClientAssertion`."""

    def __init__(
        self,
        *,
        clients: Callable[[], ClientStore],
        replay_store: Callable[[], ReplayStore],
        token_url: Callable[[], str],
        issuer: TokenIssuer,
        fetcher: JwksFetcher,
    ) -> None:
        super().__init__()
        self._clients = clients
        self.register_token_generator("default", issuer)
        self.register_client_auth_method(
            AUTH_METHOD, SmartClientAssertion(token_url=token_url, replay_store=replay_store, fetcher=fetcher)
        )
        self.register_grant(_ClientCredentials)

    def query_client(self, client_id: str) -> RegisteredClient | None:
        return self._clients().find(client_id)

    def save_token(self, token: dict[str, Any], request: Any) -> None:
        """Nothing to store: tokens are self-contained and checked against the vendor's status on use."""


class InvalidToken(Exception):
    """The bearer token is missing, malformed, forged or expired. The message says which (no token text)."""


@dataclass(frozen=True)
class VendorPrincipal:
    client_id: str
    scopes: frozenset[str]
    token_id: str
    expires_at: datetime = field(compare=False)


@dataclass
class TokenVerifier:
    """Checks an access token we issued: signature by a published key of ours, ``typ``, issuer, expiry."""

    keyring: Keyring
    issuer: Callable[[], str]
    clock: Callable[[], float] = time.time
    max_bytes: int = 8 * 1024
    registry: JWSRegistry = field(default_factory=lambda: JWSRegistry(algorithms=list(ASSERTION_ALGS)))

    # Tokens whose signature and claims already verified: token -> (principal, kid, exp).
    _verified: dict[str, tuple[VendorPrincipal, str, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    cache_size: int = 4096

    def verify(self, token: str) -> VendorPrincipal:
        """The principal behind ``token``; ``InvalidToken`` saying why not.

        A token that verified once is remembered until it expires: a vendor sends the same token on
        every request for minutes, and the signature check and claim parsing were a tenth of a
        single-record push. What can change meanwhile is still checked every time: the expiry
        against the clock, and that the key it was signed with is still in the keyring and
        published (a removed or retired key refuses its tokens at once). The claims and the signature
        cannot change: the cache key is the whole token text. Vendor status is the caller's check.
        """
        cached = self._verified.get(token)
        if cached is not None:
            principal, kid, exp = cached
            now = self.clock()
            entry = self.keyring.find(kid)
            if entry is not None and exp > now and entry.is_published(datetime.fromtimestamp(now, UTC)):
                return principal
            self._verified.pop(token, None)
        principal, kid, exp = self._verify(token)
        if len(self._verified) >= self.cache_size:
            self._verified.clear()  # crude but bounded; tokens are re-verified on their next use
        self._verified[token] = (principal, kid, exp)
        return principal

    def _verify(self, token: str) -> tuple[VendorPrincipal, str, int]:
        if not token or len(token) > self.max_bytes:
            raise InvalidToken("the access token is empty or too long")
        try:
            obj = jws.extract_compact(token.encode("ascii"), registry=self.registry)
        except (JoseError, UnicodeEncodeError, ValueError):
            raise InvalidToken("the access token is not a token this service issued") from None
        header = obj.headers()
        entry = self.keyring.find(str(header.get("kid", "")))
        now = self.clock()
        if (
            entry is None
            or header.get("typ") != ACCESS_TOKEN_TYP
            or header.get("alg") != entry.alg
            or "crit" in header
            or not entry.is_published(datetime.fromtimestamp(now, UTC))
        ):
            raise InvalidToken("the access token is not a token this service issued")
        try:
            claims = jwt.decode(token, entry.key, algorithms=[entry.alg], registry=self.registry).claims
        except JoseError:
            raise InvalidToken("the access token is not a token this service issued") from None
        exp = claims.get("exp")
        if not isinstance(exp, int) or exp <= now:
            raise InvalidToken("the access token has expired; request a new one at the token endpoint")
        if claims.get("iss") != self.issuer() or claims.get("aud") != self.issuer():
            raise InvalidToken("the access token was issued for another service")
        client_id, scope = claims.get("client_id"), claims.get("scope", "")
        if not isinstance(client_id, str) or not isinstance(scope, str):
            raise InvalidToken("the access token is not a token this service issued")
        principal = VendorPrincipal(
            client_id=client_id,
            scopes=frozenset(scope.split()),
            token_id=str(claims.get("jti", "")),
            expires_at=datetime.fromtimestamp(exp, UTC),
        )
        return principal, entry.kid, exp


def smart_configuration(*, token_url: str, jwks_url: str, issuer: str) -> dict[str, Any]:
    """What vendors discover at ``/.well-known/smart-configuration`` (SMART 2.2, absolute URLs)."""
    return {
        "issuer": issuer,
        "jwks_uri": jwks_url,
        "token_endpoint": token_url,
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": [AUTH_METHOD],
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "scopes_supported": list(SCOPES),
        "capabilities": ["client-confidential-asymmetric", "permission-v2"],
    }
