"""EHR launch, standalone launch and the OAuth callback: from ``/launch`` to a dashboard URL.

The order of checks is the point of this module. ``/launch`` matches ``iss`` against the registered
tenants before anything touches the network (checklist L1-L5); only then is discovery fetched, and
only from that tenant's own base. ``/callback/<tenant>`` consumes the pending flow exactly once,
checks it belongs to this browser and this tenant (C1-C5, C10) and only then sends the code, with
the PKCE verifier, to the token endpoint recorded in the flow. The browser ends up with a session
handle and a launch id; the tokens stay here, encrypted.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote

from flask import redirect, render_template, request
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response as BaseResponse

from auth import backend
from auth import smart_launch as sl
from fhir_bridge import audit, services
from fhir_bridge.errors import BridgeError, Forbidden
from fhir_bridge.storage.models import SmartFlow, SmartLaunch, Tenant, utcnow
from smart_app import web
from smart_app.state import state

log = logging.getLogger(__name__)

FLOW_SECONDS = 600
MAX_LAUNCH_PARAM = 2048
MAX_CODE = 2048
# Launch tokens and codes are opaque: base64(url), JWTs, UUIDs and similar. Nothing else is let through.
_OPAQUE = re.compile(r"[A-Za-z0-9._~+/=:-]+")


class LaunchRefused(BridgeError):
    status, code = 400, "launch-refused"


class EhrProblem(BridgeError):
    """The EHR answered in a way we cannot use: a gateway problem from the clinician's point of view."""

    status, code = 502, "ehr-problem"


# -- request parameters -----------------------------------------------------------------------


def single_param(name: str, *, required: bool = True, max_length: int = MAX_LAUNCH_PARAM) -> str | None:
    """One query parameter, present at most once, bounded, printable ASCII (L6-L8, C6)."""
    values = request.args.getlist(name)
    if len(values) > 1:
        raise LaunchRefused(
            f"The request names '{name}' more than once, so it is ambiguous.", code="ambiguous"
        )
    value = values[0] if values else None
    if value is None or value == "":
        if required:
            raise LaunchRefused(
                f"The request has no '{name}'. Start the app again from the EHR.", code=f"missing-{name}"
            )
        return None
    if len(value) > max_length or not _OPAQUE.fullmatch(value):
        raise LaunchRefused(f"The request's '{name}' is not acceptable.", code=f"invalid-{name}")
    return value


# -- tenants ----------------------------------------------------------------------------------


def tenant_for_issuer(session: Session, iss: str, *, allow_insecure_loopback: bool) -> Tenant | None:
    """The active tenant whose normalised FHIR base equals the normalised ``iss``, exactly (L3, L5)."""
    wanted = sl.normalize_base_url(iss, allow_insecure_loopback=allow_insecure_loopback)
    for tenant in session.scalars(select(Tenant).where(Tenant.status == "active")):
        try:
            base = sl.normalize_base_url(
                tenant.fhir_base_url, allow_insecure_loopback=allow_insecure_loopback
            )
        except sl.InvalidIssuer:
            continue
        if base == wanted:
            return tenant
    return None


def launchable(tenant: Tenant) -> bool:
    return tenant.status == "active" and bool(tenant.smart_client_id)


def redirect_uri(tenant: Tenant) -> str:
    # One redirect URI per tenant, so a code can only come back to the flow it belongs to (mix-up).
    return services.current().settings.url(f"/callback/{quote(tenant.id, safe='')}")


def pins(tenant: Tenant) -> sl.Pins:
    return sl.Pins(
        authorize_url=tenant.authorize_url or None,
        token_url=tenant.token_url or None,
        issuer=tenant.issuer or None,
        jwks_uri=tenant.jwks_uri or None,
    )


def configuration(tenant: Tenant) -> sl.SmartConfiguration:
    """Discovery for a registered tenant (cached), reconciled with its pins."""
    settings = services.current().settings
    base = sl.normalize_base_url(
        tenant.fhir_base_url, allow_insecure_loopback=settings.allow_insecure_loopback
    )
    st = state()
    document: dict[str, Any] | None
    try:
        document = st.discovery.get(
            base,
            lambda: sl.get_json(st.http, sl.discovery_url(base), timeout=settings.http_timeout_seconds),
        )
    except sl.DiscoveryError:
        if not (tenant.authorize_url and tenant.token_url):
            raise
        log.warning("discovery failed; using pinned endpoints", extra={"tenant": tenant.id})
        document = None
    config = sl.resolve_configuration(
        document, fhir_base=base, pins=pins(tenant), allow_insecure_loopback=settings.allow_insecure_loopback
    )
    if document is not None and not config.advertises_s256:
        # We send S256 anyway (D2); hospital IT should know their EHR does not say it supports it.
        log.warning("discovery does not list S256; sending it anyway", extra={"tenant": tenant.id})
    return config


# -- starting a launch ------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    location: str
    handle: str
    new_handle: bool


def start(tenant: Tenant, *, kind: str, launch: str | None) -> Started:
    """Create the pending flow and the authorize URL. A fresh state, verifier and nonce every time (L10)."""
    svc = services.current()
    settings = svc.settings
    if not launchable(tenant):
        raise LaunchRefused(
            "This EHR is registered, but not for the SMART app yet (no client id). Ask hospital IT to "
            "complete the registration (see /registration).",
            code="tenant-not-registered",
        )
    policy = state().cookies
    if not policy.usable:
        raise LaunchRefused(
            "This service must be reached over HTTPS for the SMART app to work (or, for local development "
            "only, on 127.0.0.1 with ALLOW_INSECURE_LOOPBACK on).",
            code="insecure-deployment",
        )
    try:
        config = configuration(tenant)
    except sl.LaunchError as exc:
        raise EhrProblem(
            exc.message + " Ask hospital IT to check the EHR registration.", code=exc.code
        ) from None

    base = sl.normalize_base_url(
        tenant.fhir_base_url, allow_insecure_loopback=settings.allow_insecure_loopback
    )
    scope = sl.launch_scopes(tenant.smart_scopes or "", syntax=tenant.scope_syntax or "v2", kind=kind)
    verifier, challenge = sl.pkce_pair()
    state_value = sl.new_state()
    nonce = secrets.token_urlsafe(24) if "openid" in scope.split() else None
    existing = web.browser_handle(policy)
    handle = existing or web.new_handle()
    now = utcnow()
    with svc.db.transaction() as session:
        session.execute(delete(SmartFlow).where(SmartFlow.expires_at < now))
        session.add(
            SmartFlow(
                state_hash=sl.digest(state_value),
                browser_hash=web.handle_hash(handle),
                tenant_id=tenant.id,
                kind=kind,
                launch_param=launch,
                redirect_uri=redirect_uri(tenant),
                authorize_url=config.authorization_endpoint,
                token_url=config.token_endpoint,
                issuer=config.issuer,
                jwks_uri=config.jwks_uri,
                scope=scope,
                verifier_enc=svc.cipher.encrypt(verifier.encode()),
                nonce=nonce,
                created_at=now,
                expires_at=now + timedelta(seconds=FLOW_SECONDS),
            )
        )
    location = sl.authorize_url(
        config,
        client_id=str(tenant.smart_client_id),
        redirect_uri=redirect_uri(tenant),
        scope=scope,
        state=state_value,
        aud=base,
        code_challenge=challenge,
        launch=launch,
        nonce=nonce,
    )
    log.info("smart launch started", extra={"tenant": tenant.id})
    return Started(location=location, handle=handle, new_handle=existing is None)


def redirect_to_ehr(started: Started) -> BaseResponse:
    response = redirect(started.location, code=302)
    if started.new_handle:
        web.set_handle(response, state().cookies, started.handle)
    return response


def ehr_launch() -> BaseResponse:
    """``GET /launch?iss=..&launch=..``: nothing leaves this process unless ``iss`` is a tenant (L1-L11)."""
    svc = services.current()
    iss = single_param("iss")
    launch = single_param("launch")
    assert iss is not None
    try:
        with svc.db.transaction() as session:
            tenant = tenant_for_issuer(
                session, iss, allow_insecure_loopback=svc.settings.allow_insecure_loopback
            )
    except sl.InvalidIssuer as exc:
        log.warning("launch refused: invalid iss", extra={"error_code": exc.code})
        message = exc.message + " The app can only be launched by a registered EHR."
        raise LaunchRefused(message, code=exc.code) from None
    if tenant is None:
        log.warning("launch refused: unknown iss", extra={"error_code": "unknown-iss"})
        raise LaunchRefused(
            "This EHR is not registered with fhir-bridge, so the app will not sign in to it. Hospital IT "
            "registers EHRs with `fhir-bridge ehr add`.",
            code="unknown-iss",
        )
    web.allow_framing_by(list(tenant.frame_ancestors or []))
    return redirect_to_ehr(start(tenant, kind="ehr", launch=launch))


def standalone_launch() -> BaseResponse | str:
    """``GET /launch/standalone[?tenant=..]``: pick an EHR from the server's list, never a typed URL (L12)."""
    svc = services.current()
    tenant_id = single_param("tenant", required=False, max_length=64)
    with svc.db.transaction() as session:
        tenants = [t for t in session.scalars(select(Tenant).order_by(Tenant.name)) if launchable(t)]
    if tenant_id is None:
        return render_template("smart/standalone.html", tenants=tenants)
    tenant = next((t for t in tenants if t.id == tenant_id), None)
    if tenant is None:
        raise LaunchRefused("There is no EHR with that name registered for the app.", code="unknown-tenant")
    return redirect_to_ehr(start(tenant, kind="standalone", launch=None))


# -- the callback -----------------------------------------------------------------------------

_OAUTH_ERRORS = {
    "access_denied": "Access was not granted: the sign-in was cancelled or declined in the EHR.",
    "invalid_scope": "The EHR refused the access this app asks for. Hospital IT should compare the "
    "scopes on /registration with the EHR's app registration.",
    "unauthorized_client": "The EHR does not allow this app to sign in this way. Hospital IT should "
    "check the app registration in the EHR.",
    "invalid_request": "The EHR refused the sign-in request as malformed. Hospital IT should check the "
    "app registration (redirect URL, client id).",
    "unsupported_response_type": "The EHR does not support this kind of sign-in.",
    "server_error": "The EHR had an internal error during sign-in. Try again in a moment.",
    "temporarily_unavailable": "The EHR's sign-in is temporarily unavailable. Try again in a moment.",
    "login_required": "You need to be signed in to the EHR first.",
    "consent_required": "The EHR needs your consent for this app first.",
    "interaction_required": "The EHR needs you to complete sign-in interactively.",
}

RELAUNCH = "Open the app again from the patient's chart in the EHR."


def _consume_flow(session: Session, state_value: str) -> SmartFlow | None:
    """Take the flow out of the table; only one caller can ever get it (C4)."""
    state_hash = sl.digest(state_value)
    flow = session.get(SmartFlow, state_hash, with_for_update=True)
    if flow is None:
        return None
    result = session.execute(delete(SmartFlow).where(SmartFlow.state_hash == state_hash))
    return flow if getattr(result, "rowcount", 1) == 1 else None


def callback(tenant_id: str) -> BaseResponse:
    svc = services.current()
    settings = svc.settings
    policy = state().cookies
    for name in ("state", "code", "error", "iss"):
        if len(request.args.getlist(name)) > 1:
            raise LaunchRefused(
                "The sign-in answer is ambiguous (a parameter appears twice).", code="ambiguous"
            )
    state_value = request.args.get("state", "")
    if not state_value or len(state_value) > 512:
        raise LaunchRefused("The sign-in answer has no valid state. " + RELAUNCH, code="missing-state")
    handle = web.browser_handle(policy)
    with svc.db.transaction() as session:
        flow = _consume_flow(session, state_value)
        tenant = session.get(Tenant, flow.tenant_id) if flow is not None else None
    if flow is None or tenant is None:
        log.warning("callback refused: unknown state", extra={"error_code": "unknown-state"})
        raise LaunchRefused("This sign-in is unknown or was already used. " + RELAUNCH, code="unknown-state")
    web.allow_framing_by(list(tenant.frame_ancestors or []))
    if handle is None or not secrets.compare_digest(web.handle_hash(handle), flow.browser_hash):
        log.warning("callback refused: state of another browser", extra={"tenant": tenant.id})
        raise Forbidden(
            "This sign-in was started in another browser session. " + RELAUNCH, code="state-mismatch"
        )
    if flow.expires_at < utcnow():
        raise LaunchRefused("This sign-in took too long and expired. " + RELAUNCH, code="state-expired")
    if flow.tenant_id != tenant_id:
        log.warning("callback refused: flow of another tenant", extra={"tenant": tenant.id})
        raise LaunchRefused(
            "This sign-in answer arrived at the wrong address. " + RELAUNCH, code="tenant-mismatch"
        )
    error = request.args.get("error")
    if error is not None:
        code = error if error in _OAUTH_ERRORS else "authorization-error"
        log.info("authorization refused by the EHR", extra={"tenant": tenant.id, "error_code": code})
        message = _OAUTH_ERRORS.get(code, "The EHR did not complete the sign-in.")
        raise LaunchRefused(f"{message} {RELAUNCH}", code=code)
    as_issuer = request.args.get("iss")
    if as_issuer is not None and flow.issuer is not None and as_issuer != flow.issuer:
        # RFC 9207: the authorization server says who it is; it must be the one we sent the user to (C9).
        raise LaunchRefused(
            "The sign-in answer came from an unexpected server. " + RELAUNCH, code="issuer-mismatch"
        )
    code_value = request.args.get("code", "")
    if not code_value or len(code_value) > MAX_CODE or not _OPAQUE.fullmatch(code_value):
        raise LaunchRefused(
            "The sign-in answer has no valid authorization code. " + RELAUNCH, code="missing-code"
        )

    launch = complete(tenant, flow, code_value)
    new = web.new_handle()
    with svc.db.transaction() as session:
        # A new handle after sign-in (S5); the browser's other launches move along with it.
        old_hash, new_hash = flow.browser_hash, web.handle_hash(new)
        session.execute(
            update(SmartLaunch).where(SmartLaunch.browser_hash == old_hash).values(browser_hash=new_hash)
        )
        session.execute(
            update(SmartFlow).where(SmartFlow.browser_hash == old_hash).values(browser_hash=new_hash)
        )
        launch.browser_hash = new_hash
        session.add(launch)
        audit.record(
            session,
            actor_type="user",
            actor_id=(launch.fhir_user or launch.user_key or "unknown")[:255],
            action="smart.launch",
            tenant_id=tenant.id,
            patient_id=launch.patient_id,
            target=f"launch/{launch.id[:8]}",
            detail={"kind": flow.kind},
        )
        # Ended sessions keep no tokens around longer than they must.
        session.execute(delete(SmartLaunch).where(SmartLaunch.expires_at < utcnow() - timedelta(days=1)))
    log.info("smart launch completed", extra={"tenant": tenant.id})
    # 303 to a URL without code or state (C11).
    response = redirect(settings.url(f"/app/{launch.id}/"), code=303)
    web.set_handle(response, policy, new)
    return response


def client_assertion(tenant: Tenant, token_url: str) -> str | None:
    if tenant.smart_client_auth != "private_key_jwt":
        return None
    # The same assertion as the backend-services writer: fresh jti, aud = this token URL, <= 5 min.
    return backend.client_assertion(
        services.current().keyring, client_id=str(tenant.smart_client_id), token_url=token_url
    )


def complete(tenant: Tenant, flow: SmartFlow, code: str) -> SmartLaunch:
    """Exchange the code, check what came back, and build the launch row (not yet stored)."""
    svc = services.current()
    settings = svc.settings
    st = state()
    verifier = svc.cipher.decrypt(flow.verifier_enc).decode()
    try:
        grant = sl.exchange_code(
            st.http,
            flow.token_url,
            code=code,
            redirect_uri=flow.redirect_uri,
            code_verifier=verifier,
            client_id=str(tenant.smart_client_id),
            client_assertion=client_assertion(tenant, flow.token_url),
            requested_scope=flow.scope,
            timeout=settings.http_timeout_seconds,
        )
    except sl.TokenError as exc:
        log.warning("token exchange failed", extra={"tenant": tenant.id, "error_code": exc.code})
        if exc.relaunch:
            raise LaunchRefused(exc.message + " " + RELAUNCH, code=exc.code) from None
        raise EhrProblem(
            exc.message + " Ask hospital IT to check the app registration.", code=exc.code
        ) from None
    if grant.patient is None:
        raise LaunchRefused(
            "The EHR did not say which patient this is. Open the app from a patient's chart.",
            code="no-patient-context",
        )
    base = sl.normalize_base_url(
        tenant.fhir_base_url, allow_insecure_loopback=settings.allow_insecure_loopback
    )
    user_key: str | None = None
    fhir_user: str | None = None
    if "openid" in flow.scope.split() and "openid" in grant.scope.split():
        if grant.id_token is None:
            raise EhrProblem("The EHR granted sign-in but sent no id_token.", code="no-id-token")
        try:
            identity = sl.validate_id_token(
                grant.id_token,
                expected_issuer=flow.issuer,
                client_id=str(tenant.smart_client_id),
                nonce=flow.nonce,
                fhir_base=base,
                load_jwks=lambda force: jwks_for(tenant, flow, force=force),
            )
        except sl.LaunchError as exc:
            log.warning("id_token refused", extra={"tenant": tenant.id, "error_code": exc.code})
            raise LaunchRefused(exc.message + " " + RELAUNCH, code=exc.code) from None
        user_key, fhir_user = identity.user_key, identity.fhir_user
    now = utcnow()
    return SmartLaunch(
        id=secrets.token_urlsafe(24),
        browser_hash=flow.browser_hash,
        tenant_id=tenant.id,
        patient_id=grant.patient,
        encounter_id=grant.encounter,
        user_key=user_key,
        fhir_user=fhir_user,
        scope=grant.scope,
        token_url=flow.token_url,
        access_token_enc=svc.cipher.encrypt(grant.access_token.encode()),
        refresh_token_enc=svc.cipher.encrypt(grant.refresh_token.encode()) if grant.refresh_token else None,
        access_expires_at=now + timedelta(seconds=grant.expires_in),
        need_patient_banner=grant.need_patient_banner,
        status="active",
        token_version=0,
        created_at=now,
        last_used_at=now,
        expires_at=now + timedelta(seconds=web.SESSION_SECONDS),
    )


def jwks_for(tenant: Tenant, flow: SmartFlow, *, force: bool) -> dict[str, Any]:
    """The EHR's id_token keys: from the pinned/discovered JWKS URL, or the issuer's OpenID configuration.

    Called only after the id_token's issuer matched the tenant's (I3). A forced reload (unknown
    ``kid``) happens at most once per tenant per five minutes (I7).
    """
    settings = services.current().settings
    st = state()
    url = flow.jwks_uri
    if url is None:
        assert flow.issuer is not None
        oidc = sl.get_json(
            st.http,
            flow.issuer.rstrip("/") + "/.well-known/openid-configuration",
            timeout=settings.http_timeout_seconds,
        )
        found = oidc.get("jwks_uri")
        if not isinstance(found, str):
            raise sl.IdTokenError("bad-jwks", "The EHR's OpenID configuration names no signing keys.")
        url = sl.check_endpoint_url(
            found, allow_insecure_loopback=settings.allow_insecure_loopback, what="JWKS URL"
        )
    return st.jwks.get(
        tenant.id,
        url,
        force=force,
        load=lambda: sl.get_json(st.http, url, timeout=settings.http_timeout_seconds),
    )


__all__ = ["callback", "ehr_launch", "standalone_launch", "tenant_for_issuer"]
