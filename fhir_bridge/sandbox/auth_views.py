"""The authorization server's HTTP surface: authorize (EHR and standalone), token, and the id_token JWKS.

Errors that cannot be sent back to the app (unknown client, unregistered redirect URI) are shown
as a page and never redirected, so the sandbox cannot be used as an open redirector. Everything
else goes back to the app's redirect URI with ``error`` and the app's ``state``.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import orjson
from authlib.common.urls import add_params_to_uri
from authlib.oauth2 import OAuth2Error
from flask import Blueprint, Response, g, jsonify, redirect, render_template, request
from joserfc.util import urlsafe_b64decode
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response as BaseResponse

from fhir_bridge.errors import BadRequest
from fhir_bridge.sandbox import faults, runtime, web
from fhir_bridge.sandbox.models import SandboxClient
from fhir_bridge.sandbox.oauth import Client, EndUser
from fhir_bridge.sandbox.scopes import parse_resource_scope, split

bp = Blueprint("sandbox_auth", __name__)
log = logging.getLogger(__name__)

# The authorization request parameters carried through the sign-in page.
_AUTHORIZE_PARAMS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "aud",
    "code_challenge",
    "code_challenge_method",
    "nonce",
    "launch",
)


def _server() -> Any:
    return runtime.current().oauth_server


def _refuse(server: Any, error: OAuth2Error) -> Response:
    """Back to the app with the error if its redirect URI is trusted; otherwise a page, never a redirect."""
    if error.redirect_uri:
        response: Response = server.handle_error_response(None, error)
        return response
    if error.error == "invalid_client":
        reason = "the app (client_id) is not registered with this EHR"
    elif "redirect" in str(error.description).lower():
        reason = "its redirect_uri is missing or is not exactly one registered for the app"
    else:
        reason = "it is not a valid authorization request (response_type=code, client_id, redirect_uri)"
    raise BadRequest(
        f"The app's authorization request was refused: {reason}. Nothing was sent back to the app, "
        "because its identity or return address could not be trusted.",
        code=str(error.error).replace("_", "-"),
    )


@bp.route("/oauth/authorize", methods=["GET", "POST"])
def authorize() -> BaseResponse:
    """EHR launch: approved at once. Standalone launch: the sign-in page with a patient picker."""
    sandbox = runtime.current()
    server = _server()
    with sandbox.db.write() as session:
        g.sandbox_db = session
        try:
            grant = server.get_consent_grant(end_user=None)
        except OAuth2Error as error:
            return _refuse(server, error)
        client: Client = grant.client
        injected = faults.take(client.row, "authorize_error")
        if injected is not None:
            params = [("error", injected["error"])]
            if injected.get("error_description"):
                params.append(("error_description", injected["error_description"]))
            params.append(("state", grant.request.payload.state))
            return redirect(add_params_to_uri(grant.redirect_uri, params), code=302)
        if isinstance(grant.request.user, EndUser):  # a valid EHR launch
            response: Response = server.create_authorization_response(
                grant_user=grant.request.user, grant=grant
            )
            log.info("EHR launch authorized", extra={"client": client.get_client_id()})
            return response
        return _sign_in_page(session, client, grant)


def _sign_in_page(session: Any, client: Client, grant: Any) -> Response:
    sandbox = runtime.current()
    scopes = split(grant.request.scope)
    needs_patient = "launch/patient" in scopes or any(
        (p := parse_resource_scope(s)) is not None and p.level == "patient" for s in scopes
    )
    params = {name: grant.request.payload.data.get(name) for name in _AUTHORIZE_PARAMS}
    html = render_template(
        "sandbox/authorize.html",
        client=client.row,
        scopes=scopes,
        params={k: v for k, v in params.items() if v},
        practitioners=web.practitioners(session, sandbox.store),
        patients=web.patients(session, sandbox.store) if needs_patient else [],
        needs_patient=needs_patient,
        csrf_token=web.csrf_token(),
    )
    response = Response(html, mimetype="text/html")
    # The decision form redirects to the app: allow that target for form-action (Chromium enforces it).
    redirect_origin = _origin(grant.redirect_uri)
    response.headers["Content-Security-Policy"] = web.csp(form_action=[redirect_origin])
    return response


@bp.post("/oauth/authorize/decision")
def decision() -> Response:
    web.check_csrf()
    sandbox = runtime.current()
    server = _server()
    with sandbox.db.write() as session:
        g.sandbox_db = session
        try:
            grant = server.get_consent_grant(end_user=None)
        except OAuth2Error as error:
            return _refuse(server, error)
        if request.form.get("decision") != "approve":
            response: Response = server.create_authorization_response(grant_user=None, grant=grant)
            return response
        user = _chosen_user(session, grant)
        response = server.create_authorization_response(grant_user=user, grant=grant)
        log.info("standalone launch authorized", extra={"client": grant.client.get_client_id()})
        return response


def _chosen_user(session: Any, grant: Any) -> EndUser:
    sandbox = runtime.current()
    practitioner = request.form.get("practitioner", "")
    if not sandbox.store.exists(session, "Practitioner", practitioner):
        raise BadRequest("Choose who is signing in (a practitioner of this sandbox).", code="no-practitioner")
    scopes = split(grant.request.scope)
    needs_patient = "launch/patient" in scopes or any(
        (p := parse_resource_scope(s)) is not None and p.level == "patient" for s in scopes
    )
    patient = request.form.get("patient") or None
    if needs_patient and (patient is None or not sandbox.store.exists(session, "Patient", patient)):
        raise BadRequest("Choose the patient this app may see.", code="no-patient")
    encounter = None
    if patient and "launch/encounter" in scopes:
        encounter = web.latest_encounter(session, patient)
    return EndUser(
        practitioner_id=practitioner,
        patient_id=patient if needs_patient else None,
        encounter_id=encounter,
        need_patient_banner=True,  # standalone: no EHR chrome around the app
    )


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@bp.post("/oauth/token")
def token() -> Response:
    sandbox = runtime.current()
    server = _server()
    with sandbox.db.write() as session:
        g.sandbox_db = session
        client = _claimed_client(session)
        if client is not None:
            injected = faults.take(client, "token_error")
            if injected is not None:
                body = {"error": injected["error"]}
                if injected.get("error_description"):
                    body["error_description"] = injected["error_description"]
                response = jsonify(body)
                response.status_code = int(injected.get("status", 400))
                response.headers["Cache-Control"] = "no-store"
                response.headers["Pragma"] = "no-cache"
                return response
        response = server.create_token_response()
        overrides = (client.faults or {}).get("token_response") if client is not None else None
        if overrides and response.status_code == 200:
            body = orjson.loads(response.get_data())
            for name, value in overrides.items():
                if value is None:
                    body.pop(name, None)
                else:
                    body[name] = value
            response.set_data(orjson.dumps(body))
        return response  # type: ignore[no-any-return]


def _claimed_client(session: Session) -> SandboxClient | None:
    """The client a token request claims to be (unverified: used only to pick injected faults)."""
    client_id = request.form.get("client_id")
    assertion = request.form.get("client_assertion")
    if not client_id and assertion and assertion.count(".") == 2:
        try:
            payload = orjson.loads(urlsafe_b64decode(assertion.split(".")[1].encode()))
            client_id = payload.get("sub") if isinstance(payload, dict) else None
        except (ValueError, orjson.JSONDecodeError):
            client_id = None
    if not isinstance(client_id, str) or len(client_id) > 128:
        return None
    return session.scalar(select(SandboxClient).where(SandboxClient.client_id == client_id))


@bp.get("/.well-known/jwks.json")
def jwks() -> Response:
    """The public key id_tokens are signed with (RS256)."""
    key = runtime.current().id_token_key
    data = key.as_dict(private=False) | {"kid": key.kid, "alg": "RS256", "use": "sig"}
    response = jsonify({"keys": [data]})
    response.headers["Cache-Control"] = "public, max-age=300"
    return response
