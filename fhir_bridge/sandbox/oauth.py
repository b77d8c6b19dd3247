"""The sandbox's SMART authorization server, on Authlib's server side.

Where Authlib's defaults are looser than SMART App Launch 2.x, they are tightened here:

* PKCE is required and only ``S256`` is accepted (Authlib would default to ``plain``);
* ``state`` is required and echoed; ``redirect_uri`` must match a registered one exactly;
* ``aud`` must equal this server's FHIR base;
* codes live ``code_lifetime`` seconds and are single use; reusing one revokes what it issued;
* refresh tokens rotate on every use; reusing a rotated one revokes the whole grant;
* client assertions (``private_key_jwt``) are checked by SMART's rules, not Authlib's defaults:
  RS384 or ES384 only, ``exp`` at most five minutes ahead, ``jti`` never seen before,
  ``aud`` exactly the token URL, ``jku`` (if sent) equal to the registered JWKS URL, one key by ``kid``.

EHR launches are approved without a page (the launch token stands for the clinician's session in
the chart, as in a real EHR); standalone launches show a sign-in page with a patient picker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import (
    AccessDeniedError,
    ClientMixin,
    InvalidClientError,
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
)
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant, ClientCredentialsGrant, RefreshTokenGrant
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core import AuthorizationCodeMixin
from authlib.oidc.core.grants import OpenIDCode
from flask import Flask, g
from joserfc import jws, jwt
from joserfc.errors import JoseError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from fhir_bridge.sandbox import runtime
from fhir_bridge.sandbox.client_keys import ClientKeyError
from fhir_bridge.sandbox.models import (
    AccessToken,
    AuthorizationCode,
    LaunchContext,
    SandboxClient,
    SeenAssertion,
)
from fhir_bridge.sandbox.scopes import narrow, split
from fhir_bridge.storage.models import utcnow

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGS = ("RS384", "ES384")
MAX_ASSERTION_SECONDS = 300
LEEWAY_SECONDS = 60
MAX_ASSERTION_BYTES = 8192
USER_LEVELS = ("patient", "user")


def digest(value: str) -> str:
    """Codes and tokens are stored as SHA-256 hex digests, never in clear."""
    return hashlib.sha256(value.encode()).hexdigest()


def db() -> Session:
    session = g.get("sandbox_db")
    if not isinstance(session, Session):
        raise RuntimeError("no sandbox database session in this request")
    return session


@dataclass(frozen=True)
class EndUser:
    """Who approved, and the context the app gets: the practitioner, and the patient/encounter if any."""

    practitioner_id: str
    patient_id: str | None
    encounter_id: str | None
    need_patient_banner: bool


class Client(ClientMixin):  # type: ignore[misc]
    """An app registration as Authlib sees it."""

    def __init__(self, row: SandboxClient) -> None:
        self.row = row

    def get_client_id(self) -> str:
        return self.row.client_id

    def get_default_redirect_uri(self) -> None:
        return None  # SMART apps always send redirect_uri

    def get_allowed_scope(self, scope: str | None) -> str:
        return " ".join(narrow(split(scope), self.row.scopes, levels=USER_LEVELS))

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in (self.row.redirect_uris or [])

    def check_client_secret(self, client_secret: str) -> bool:
        return False  # no shared secrets: public apps or private_key_jwt

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == self.row.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        if grant_type == "client_credentials":
            return self.row.auth_method == "private_key_jwt"
        return grant_type in ("authorization_code", "refresh_token")


class Code(AuthorizationCodeMixin):  # type: ignore[misc]
    def __init__(self, row: AuthorizationCode) -> None:
        self.row = row
        self.code_challenge = row.code_challenge
        self.code_challenge_method = row.code_challenge_method

    def get_redirect_uri(self) -> str:
        return self.row.redirect_uri

    def get_scope(self) -> str:
        return self.row.scope

    def get_nonce(self) -> str | None:
        return self.row.nonce

    def get_auth_time(self) -> int:
        return int(self.row.created_at.timestamp())


class IssuedToken:
    """A stored token as Authlib's refresh grant sees it."""

    def __init__(self, row: AccessToken) -> None:
        self.row = row

    def check_client(self, client: Client) -> bool:
        return self.row.client_id == client.get_client_id()

    def get_scope(self) -> str:
        return self.row.scope


def _user_of(row: AuthorizationCode | AccessToken) -> EndUser:
    return EndUser(
        practitioner_id=row.practitioner_id or "",
        patient_id=row.patient_id,
        encounter_id=row.encounter_id,
        need_patient_banner=row.need_patient_banner,
    )


def revoke_grant(grant_id: str) -> None:
    now = utcnow()
    db().execute(
        update(AccessToken)
        .where(AccessToken.grant_id == grant_id, AccessToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )


# -- authorization request checks ----------------------------------------------------------------


class SmartAuthorizeChecks:
    """The SMART rules for an authorization request that Authlib does not know about."""

    def __call__(self, grant: Any) -> None:
        grant.register_hook("after_validate_authorization_request_payload", self.check)

    def check(self, grant: Any, redirect_uri: str) -> None:
        request = grant.request
        data = request.payload.data
        sandbox = runtime.current()
        if not request.payload.state:
            raise InvalidRequestError("state is required (an unguessable value the app checks on return)")
        if data.get("aud") != sandbox.config.fhir_base:
            raise InvalidRequestError(
                f"aud must be the FHIR base URL of this EHR: {sandbox.config.fhir_base}"
            )
        client: Client = request.client
        granted = narrow(split(request.payload.scope), client.row.scopes, levels=USER_LEVELS)
        if not granted:
            raise InvalidScopeError("none of the requested scopes is allowed for this app")
        launch = data.get("launch")
        if launch:
            if "launch" not in granted:
                raise InvalidScopeError("an EHR launch must request the launch scope")
            ctx = db().get(LaunchContext, digest(launch))
            if ctx is None or ctx.client_id != client.get_client_id() or ctx.expires_at <= utcnow():
                raise InvalidRequestError("launch is unknown, expired, or was issued for another app")
            request.user = EndUser(
                practitioner_id=ctx.practitioner_id,
                patient_id=ctx.patient_id,
                encounter_id=ctx.encounter_id,
                need_patient_banner=False,  # the EHR's own banner is on screen around the app
            )
        elif "launch" in granted:
            raise InvalidRequestError("the launch scope needs the launch parameter of an EHR launch")
        request.scope = " ".join(granted)


class RequireS256(CodeChallenge):  # type: ignore[misc]
    """PKCE always, S256 only (SMART App Launch 2.x; RFC 7636 would allow plain)."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]  # noqa: RUF012 (Authlib's attribute)

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge with code_challenge_method=S256")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256; plain is not accepted")
        super().validate_code_challenge(grant, redirect_uri)

    def validate_code_verifier(self, grant: Any, result: Any) -> None:
        if not grant.request.form.get("code_verifier"):
            raise InvalidRequestError("code_verifier is required (PKCE)")
        super().validate_code_verifier(grant, result)


# -- grants --------------------------------------------------------------------------------------


class SmartAuthorizationCodeGrant(AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["private_key_jwt", "none"]  # noqa: RUF012

    def save_authorization_code(self, code: str, request: Any) -> None:
        user: EndUser = request.user
        data = request.payload.data
        sandbox = runtime.current()
        db().add(
            AuthorizationCode(
                code_hash=digest(code),
                client_id=request.client.get_client_id(),
                redirect_uri=request.payload.redirect_uri,
                scope=request.scope,
                code_challenge=data["code_challenge"],
                code_challenge_method="S256",
                nonce=data.get("nonce"),
                practitioner_id=user.practitioner_id,
                patient_id=user.patient_id,
                encounter_id=user.encounter_id,
                need_patient_banner=user.need_patient_banner,
                expires_at=utcnow() + timedelta(seconds=sandbox.config.code_lifetime),
            )
        )

    def query_authorization_code(self, code: str, client: Client) -> Code | None:
        row = db().get(AuthorizationCode, digest(code))
        if row is None or row.client_id != client.get_client_id():
            return None
        if row.used_at is not None:
            revoke_grant(row.code_hash)
            raise InvalidGrantError(
                "authorization code was already used; tokens issued for it are now revoked"
            )
        if row.expires_at <= utcnow() or client.row.faults.get("code_expired"):
            raise InvalidGrantError("authorization code has expired; start the launch again")
        return Code(row)

    def delete_authorization_code(self, authorization_code: Code) -> None:
        authorization_code.row.used_at = utcnow()

    def authenticate_user(self, authorization_code: Code) -> EndUser:
        return _user_of(authorization_code.row)


class SmartRefreshTokenGrant(RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["private_key_jwt", "none"]  # noqa: RUF012
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotate on every use

    def authenticate_refresh_token(self, refresh_token: str) -> IssuedToken | None:
        row = db().scalar(select(AccessToken).where(AccessToken.refresh_hash == digest(refresh_token)))
        if row is None:
            return None
        if row.refresh_used_at is not None:
            revoke_grant(row.grant_id)
            raise InvalidGrantError("refresh token was already used; the whole grant is now revoked")
        if row.revoked_at is not None:
            raise InvalidGrantError("refresh token was revoked")
        if row.refresh_expires_at is None or row.refresh_expires_at <= utcnow():
            raise InvalidGrantError("refresh token has expired; launch the app again")
        return IssuedToken(row)

    def authenticate_user(self, refresh_token: IssuedToken) -> EndUser:
        return _user_of(refresh_token.row)

    def revoke_old_credential(self, refresh_token: IssuedToken) -> None:
        refresh_token.row.refresh_used_at = utcnow()


class BackendServicesGrant(ClientCredentialsGrant):  # type: ignore[misc]
    """SMART Backend Services: ``client_credentials`` with ``private_key_jwt``, ``system/`` scopes only."""

    TOKEN_ENDPOINT_AUTH_METHODS = ["private_key_jwt"]  # noqa: RUF012

    def validate_token_request(self) -> None:
        super().validate_token_request()
        requested = split(self.request.payload.scope)
        if not requested:
            raise InvalidRequestError("scope is required, e.g. system/Observation.rs")
        granted = narrow(requested, self.request.client.row.scopes, levels=("system",))
        if not granted:
            raise InvalidScopeError("none of the requested scopes is pre-authorized for this client")
        self.granted_scope = " ".join(granted)

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        token = self.generate_token(scope=self.granted_scope, include_refresh_token=False)
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER


# -- client authentication -----------------------------------------------------------------------


class SmartClientAssertion(JWTBearerClientAssertion):  # type: ignore[misc]
    """``private_key_jwt`` by SMART's rules (checklist 1.3 S3-S5 and 1.4), replacing Authlib's defaults."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self) -> None:
        super().__init__(validate_jti=True, leeway=LEEWAY_SECONDS)

    def get_audiences(self) -> list[str]:
        return [runtime.current().config.url("/oauth/token")]

    def __call__(self, query_client: Any, request: Any) -> Client | None:
        form = request.form
        assertion = form.get("client_assertion")
        if not assertion and form.get("client_assertion_type") is None:
            return None  # not this method; Authlib tries the next one
        if form.get("client_assertion_type") != ASSERTION_TYPE or not assertion:
            raise InvalidClientError(description=f"client_assertion_type must be {ASSERTION_TYPE}")
        if len(assertion) > MAX_ASSERTION_BYTES:
            raise InvalidClientError(description="client_assertion is too large")
        try:
            compact = jws.extract_compact(assertion.encode())
            header = compact.headers()
            claims = json.loads(compact.payload)
        except (JoseError, ValueError):
            raise InvalidClientError(description="client_assertion is not a signed JWT") from None
        if not isinstance(claims, dict):
            raise InvalidClientError(description="client_assertion payload is not a JSON object")
        alg = header.get("alg")
        if alg not in ASSERTION_ALGS:
            raise InvalidClientError(description="client_assertion must be signed with RS384 or ES384")
        for forbidden in ("crit", "jwk", "x5u", "x5c"):
            if forbidden in header:
                raise InvalidClientError(description=f"client_assertion header may not carry {forbidden}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidClientError(description="client_assertion header must name the key (kid)")
        sub, iss = claims.get("sub"), claims.get("iss")
        if not isinstance(sub, str) or sub != iss:
            raise InvalidClientError(description="client_assertion iss and sub must both be the client_id")
        if form.get("client_id") not in (None, sub):
            raise InvalidClientError(description="client_id does not match the client_assertion issuer")
        client: Client | None = query_client(sub)
        if client is None:
            raise InvalidClientError(description="the client does not exist on this server")
        if client.row.auth_method != "private_key_jwt":
            raise InvalidClientError(description="this client is registered as a public client")
        jku = header.get("jku")
        if jku is not None and jku != client.row.jwks_url:
            raise InvalidClientError(description="jku does not match the registered JWKS URL")
        try:
            key = runtime.current().client_keys.key_for(
                jwks=client.row.jwks, jwks_url=client.row.jwks_url, kid=kid, alg=alg
            )
        except ClientKeyError as exc:
            raise InvalidClientError(description=str(exc)) from None
        try:
            token = jwt.decode(assertion, key, algorithms=[alg])
        except JoseError:
            raise InvalidClientError(description="client_assertion signature does not verify") from None
        self._check_claims(token.claims, client)
        request.client = client
        return client

    def _check_claims(self, claims: dict[str, Any], client: Client) -> None:
        now = int(time.time())
        aud = claims.get("aud")
        expected = self.get_audiences()[0]
        if aud != expected and aud != [expected]:
            raise InvalidClientError(description=f"client_assertion aud must be the token URL {expected}")
        exp = claims.get("exp")
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise InvalidClientError(description="client_assertion exp is required (integer seconds)")
        if exp <= now - LEEWAY_SECONDS:
            raise InvalidClientError(description="client_assertion has expired")
        if exp > now + MAX_ASSERTION_SECONDS + LEEWAY_SECONDS:
            raise InvalidClientError(description="client_assertion exp may be at most 5 minutes ahead")
        for name in ("iat", "nbf"):
            value = claims.get(name)
            if value is not None and (not isinstance(value, int | float) or value > now + LEEWAY_SECONDS):
                raise InvalidClientError(description=f"client_assertion {name} is in the future")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 0 < len(jti) <= 255:
            raise InvalidClientError(description="client_assertion jti is required")
        if not self.validate_jti(claims, jti):
            raise InvalidClientError(description="client_assertion jti was already used (replay)")

    def validate_jti(self, claims: dict[str, Any], jti: str) -> bool:
        session = db()
        now = utcnow()
        client_id = str(claims["sub"])
        # Assertions past their expiry can never be replayed: forget them (the table stays small).
        session.execute(delete(SeenAssertion).where(SeenAssertion.expires_at <= now))
        seen = session.get(SeenAssertion, (client_id, jti))
        if seen is not None and seen.expires_at > now:
            return False
        expires = now + timedelta(seconds=int(claims["exp"]) - int(time.time()) + LEEWAY_SECONDS)
        if seen is None:
            session.add(SeenAssertion(client_id=client_id, jti=jti, expires_at=expires))
        else:
            seen.expires_at = expires
        session.flush()
        return True


# -- id_token ------------------------------------------------------------------------------------


class SmartOpenIDCode(OpenIDCode):  # type: ignore[misc]
    """id_token (RS256, OpenID Connect) with ``fhirUser`` naming the Practitioner who launched."""

    def __init__(self) -> None:
        super().__init__(require_nonce=False)

    def exists_nonce(self, nonce: str, request: Any) -> bool:
        found = db().scalar(
            select(AuthorizationCode.code_hash).where(
                AuthorizationCode.client_id == request.payload.client_id, AuthorizationCode.nonce == nonce
            )
        )
        return found is not None

    def resolve_client_private_key(self, client: Client) -> Any:
        return runtime.current().id_token_key

    def get_client_algorithm(self, client: Client) -> str:
        return "RS256"

    def get_encode_header(self, client: Client) -> dict[str, str]:
        return {"alg": "RS256", "typ": "JWT", "kid": str(runtime.current().id_token_key.kid)}

    def get_client_claims(self, client: Client) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": runtime.current().config.issuer,
            "aud": client.get_client_id(),
            "iat": now,
            "exp": now + runtime.current().config.access_token_lifetime,
        }

    def generate_user_info(self, user: EndUser, scope: str) -> dict[str, Any]:
        info: dict[str, Any] = {"sub": user.practitioner_id}
        if "fhirUser" in split(scope):
            info["fhirUser"] = f"{runtime.current().config.fhir_base}/Practitioner/{user.practitioner_id}"
        return info


# -- tokens --------------------------------------------------------------------------------------


def generate_token(
    grant_type: str,
    client: Client,
    user: EndUser | None = None,
    scope: str | None = None,
    expires_in: int | None = None,
    include_refresh_token: bool = True,
) -> dict[str, Any]:
    config = runtime.current().config
    lifetime = (
        config.backend_token_lifetime if grant_type == "client_credentials" else config.access_token_lifetime
    )
    token: dict[str, Any] = {
        "access_token": secrets.token_urlsafe(32),
        "token_type": "Bearer",
        "expires_in": expires_in or lifetime,
        "scope": scope or "",
    }
    wants_refresh = {"offline_access", "online_access"} & set(split(scope))
    if include_refresh_token and grant_type != "client_credentials" and wants_refresh:
        token["refresh_token"] = secrets.token_urlsafe(32)
    return token


def save_token(token: dict[str, Any], request: Any) -> None:
    """Store the token (hashed) with its context, and add the SMART launch context to the response."""
    config = runtime.current().config
    grant_type = request.payload.grant_type
    now = utcnow()
    context: AuthorizationCode | AccessToken | None = None
    if grant_type == "authorization_code":
        context = request.authorization_code.row
        grant_id = request.authorization_code.row.code_hash
    elif grant_type == "refresh_token":
        context = request.refresh_token.row
        grant_id = request.refresh_token.row.grant_id
    else:
        grant_id = uuid.uuid4().hex
    refresh = token.get("refresh_token")
    db().add(
        AccessToken(
            access_hash=digest(token["access_token"]),
            refresh_hash=digest(refresh) if refresh else None,
            grant_id=grant_id,
            grant_type=grant_type,
            client_id=request.client.get_client_id(),
            scope=token.get("scope", ""),
            practitioner_id=context.practitioner_id if context else None,
            patient_id=context.patient_id if context else None,
            encounter_id=context.encounter_id if context else None,
            need_patient_banner=context.need_patient_banner if context else False,
            issued_at=now,
            expires_at=now + timedelta(seconds=int(token["expires_in"])),
            refresh_expires_at=now + timedelta(seconds=config.refresh_token_lifetime) if refresh else None,
        )
    )
    log.info("token issued", extra={"client": request.client.get_client_id(), "grant_type": grant_type})
    if context is not None:
        if context.patient_id:
            token["patient"] = context.patient_id
        if context.encounter_id:
            token["encounter"] = context.encounter_id
        token["need_patient_banner"] = context.need_patient_banner


def find_token(session: Session, raw: str) -> AccessToken | None:
    """The live token a bearer value names (not expired, not revoked), else None."""
    row = session.scalar(select(AccessToken).where(AccessToken.access_hash == digest(raw)))
    if row is None or row.revoked_at is not None or row.expires_at <= utcnow():
        return None
    return row


def build_server(app: Flask) -> AuthorizationServer:
    server = AuthorizationServer()
    server.init_app(app, query_client=_query_client, save_token=save_token)
    server.register_token_generator("default", generate_token)
    server.register_client_auth_method("private_key_jwt", SmartClientAssertion())
    server.register_grant(
        SmartAuthorizationCodeGrant, [SmartAuthorizeChecks(), RequireS256(required=True), SmartOpenIDCode()]
    )
    server.register_grant(SmartRefreshTokenGrant)
    server.register_grant(BackendServicesGrant)
    return server


def _query_client(client_id: str) -> Client | None:
    if not isinstance(client_id, str) or len(client_id) > 128:
        return None
    row = db().get(SandboxClient, client_id)
    return Client(row) if row is not None else None


__all__ = [
    "AccessDeniedError",
    "Client",
    "EndUser",
    "build_server",
    "digest",
    "find_token",
    "revoke_grant",
]
