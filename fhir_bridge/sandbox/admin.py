"""The sandbox's admin API: register apps, create EHR launches, switch faults on and off (tests, demo).

Every call needs ``Authorization: Bearer <admin token>`` (the token is in ``<data>/admin_token``,
or given with ``--admin-token``), so nothing on the machine can reconfigure the EHR by accident.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, jsonify, request

from fhir_bridge.errors import BadRequest, NotFound, Unauthorized
from fhir_bridge.sandbox import clients, runtime, web
from fhir_bridge.sandbox.faults import DISCOVERY_FAULT, FAULTS, validate_discovery_fault, validate_faults
from fhir_bridge.sandbox.models import LaunchContext, SandboxClient, ServerFault
from fhir_bridge.sandbox.oauth import digest
from fhir_bridge.storage.models import utcnow

bp = Blueprint("sandbox_admin", __name__, url_prefix="/api/admin")


@bp.before_request
def _authenticate() -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    expected = runtime.current().admin_token
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthorized(
            "The sandbox admin API needs Authorization: Bearer <admin token> (see <data>/admin_token).",
            code="admin-token-required",
            headers={"WWW-Authenticate": 'Bearer realm="sandbox-admin"'},
        )


def _json() -> Any:
    data = request.get_json(silent=True)
    if data is None:
        raise BadRequest("Send a JSON body (Content-Type: application/json).", code="invalid-json")
    return data


def _client(session: Any, client_id: str) -> SandboxClient:
    row = session.get(SandboxClient, client_id)
    if row is None:
        raise NotFound(f"No app is registered as {client_id[:128]!r}.", code="unknown-client")
    assert isinstance(row, SandboxClient)
    return row


@bp.get("/clients")
def list_clients() -> Response:
    with runtime.current().db.read() as session:
        rows = session.query(SandboxClient).order_by(SandboxClient.client_id).all()
        return jsonify([clients.describe(r) for r in rows])


@bp.put("/clients/<client_id>")
def put_client(client_id: str) -> tuple[Response, int]:
    data = _json()
    with runtime.current().db.write() as session:
        existed = session.get(SandboxClient, client_id) is not None
        row = clients.register(session, client_id, data)
        body = clients.describe(row)
    return jsonify(body), 200 if existed else 201


@bp.get("/clients/<client_id>")
def get_client(client_id: str) -> Response:
    with runtime.current().db.read() as session:
        return jsonify(clients.describe(_client(session, client_id)))


@bp.delete("/clients/<client_id>")
def delete_client(client_id: str) -> tuple[str, int]:
    with runtime.current().db.write() as session:
        session.delete(_client(session, client_id))
    return "", 204


@bp.get("/faults")
def list_faults() -> Response:
    return jsonify({"client": FAULTS, "server": {"discovery": DISCOVERY_FAULT}})


@bp.put("/discovery/fault")
def put_discovery_fault() -> Response:
    """Make the discovery documents misbehave for everyone (they are fetched before any app is known)."""
    spec = validate_discovery_fault(_json())
    with runtime.current().db.write() as session:
        row = session.get(ServerFault, "discovery")
        if row is None:
            row = ServerFault(name="discovery", faults={})
            session.add(row)
        row.faults = {"discovery": spec}
    return jsonify(spec)


@bp.delete("/discovery/fault")
def clear_discovery_fault() -> tuple[str, int]:
    with runtime.current().db.write() as session:
        row = session.get(ServerFault, "discovery")
        if row is not None:
            session.delete(row)
    return "", 204


@bp.put("/clients/<client_id>/faults")
def put_faults(client_id: str) -> Response:
    faults = validate_faults(_json())
    with runtime.current().db.write() as session:
        row = _client(session, client_id)
        row.faults = faults
        return jsonify(row.faults)


@bp.delete("/clients/<client_id>/faults")
def clear_faults(client_id: str) -> tuple[str, int]:
    with runtime.current().db.write() as session:
        _client(session, client_id).faults = {}
    return "", 204


@bp.post("/launches")
def create_launch() -> tuple[Response, int]:
    """An EHR launch without the chart page: ``{"client_id", "patient", "encounter"?, "practitioner"?}``."""
    data = _json()
    if not isinstance(data, dict):
        raise BadRequest("Send a JSON object.", code="invalid-launch")
    sandbox = runtime.current()
    with sandbox.db.write() as session:
        client = _client(session, str(data.get("client_id", "")))
        launch = new_launch(
            session,
            client,
            patient_id=data.get("patient"),
            encounter_id=data.get("encounter"),
            practitioner_id=data.get("practitioner"),
        )
    return jsonify(launch), 201


def new_launch(
    session: Any,
    client: SandboxClient,
    *,
    patient_id: Any,
    encounter_id: Any = None,
    practitioner_id: Any = None,
) -> dict[str, Any]:
    """Create a launch context and say how the EHR opens the app with it."""
    sandbox = runtime.current()
    store = sandbox.store
    if not isinstance(patient_id, str) or not store.exists(session, "Patient", patient_id):
        raise BadRequest("patient must be the id of a Patient in the sandbox.", code="invalid-launch")
    if encounter_id is None:
        encounter_id = web.latest_encounter(session, patient_id)
    elif not isinstance(encounter_id, str) or not store.exists(session, "Encounter", encounter_id):
        raise BadRequest("encounter must be the id of an Encounter in the sandbox.", code="invalid-launch")
    if practitioner_id is None:
        people = web.practitioners(session, store)
        if not people:
            raise BadRequest("The sandbox has no Practitioner to launch as.", code="invalid-launch")
        practitioner_id = people[0].id
    elif not isinstance(practitioner_id, str) or not store.exists(session, "Practitioner", practitioner_id):
        raise BadRequest(
            "practitioner must be the id of a Practitioner in the sandbox.", code="invalid-launch"
        )
    token = secrets.token_urlsafe(32)
    expires = utcnow() + timedelta(seconds=sandbox.config.launch_lifetime)
    session.add(
        LaunchContext(
            token_hash=digest(token),
            client_id=client.client_id,
            patient_id=patient_id,
            encounter_id=encounter_id,
            practitioner_id=practitioner_id,
            expires_at=expires,
        )
    )
    iss = sandbox.config.fhir_base
    launch_url = None
    if client.launch_url:
        sep = "&" if "?" in client.launch_url else "?"
        launch_url = client.launch_url + sep + urlencode({"iss": iss, "launch": token})
    return {
        "launch": token,
        "iss": iss,
        "launch_url": launch_url,
        "patient": patient_id,
        "encounter": encounter_id,
        "practitioner": practitioner_id,
        "expires_at": expires.isoformat(),
    }
