"""The sandbox's FHIR R4 REST endpoint (``/fhir``): what apps and the delivery worker talk to.

Every request except discovery and ``metadata`` needs a bearer token from the sandbox's
authorization server; its scopes and launch patient decide what the request may see and change
(the store enforces them). Errors are OperationOutcomes (``fhir_bridge.errors`` does that for
everything under ``/fhir``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from flask import Blueprint, Response, g, redirect, request
from werkzeug.wrappers import Response as WerkzeugResponse

from fhir_bridge.errors import BadRequest, BridgeError, NotFound, Unauthorized, UnsupportedMediaType
from fhir_bridge.sandbox import faults, runtime
from fhir_bridge.sandbox.models import SandboxClient, ServerFault
from fhir_bridge.sandbox.oauth import find_token
from fhir_bridge.sandbox.scopes import Grant
from fhir_bridge.sandbox.searchparams import PARAMS, reference_key
from fhir_bridge.sandbox.store import NotAcceptable, SearchQuery, WriteOutcome

bp = Blueprint("sandbox_fhir", __name__, url_prefix="/fhir")
log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
_PUBLIC_ENDPOINTS = {
    "sandbox_fhir.metadata",
    "sandbox_fhir.smart_configuration",
    "sandbox_fhir.openid_configuration",
}
_JSON_TYPES = {"application/fhir+json", "application/json"}


@dataclass(frozen=True)
class Caller:
    client_id: str
    grant: Grant
    patient: str | None
    faults: dict[str, Any]


def caller() -> Caller:
    value = g.get("fhir_caller")
    assert isinstance(value, Caller)
    return value


@bp.before_request
def _authenticate() -> Response | None:
    _negotiate()
    if request.endpoint in _PUBLIC_ENDPOINTS:
        return None
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.partition(" ")
    challenge = 'Bearer realm="sandbox-ehr"'
    if scheme.lower() != "bearer" or not raw.strip():
        raise Unauthorized(
            "This FHIR endpoint needs an access token (Authorization: Bearer ...) from the sandbox's "
            "authorization server.",
            code="missing-token",
            headers={"WWW-Authenticate": challenge},
        )
    sandbox = runtime.current()
    with sandbox.db.read() as session:
        token = find_token(session, raw.strip())
        client = session.get(SandboxClient, token.client_id) if token is not None else None
        if token is None or client is None:
            raise Unauthorized(
                "The access token is unknown, expired or revoked; get a new one.",
                code="invalid-token",
                headers={"WWW-Authenticate": challenge + ', error="invalid_token"'},
            )
        g.fhir_caller = Caller(
            client_id=token.client_id,
            grant=Grant(token.scope, patient=token.patient_id),
            patient=token.patient_id,
            faults=dict(client.faults or {}),
        )
    if "fhir_error" in g.fhir_caller.faults:
        return _injected_error(g.fhir_caller.client_id)
    return None


def _injected_error(client_id: str) -> Response | None:
    with runtime.current().db.write() as session:
        client = session.get(SandboxClient, client_id)
        spec = faults.take(client, "fhir_error") if client is not None else None
    if spec is None:
        return None
    headers = {"Retry-After": spec["retry_after"]} if spec.get("retry_after") else {}
    if spec.get("body") is not None:  # deliberately not FHIR: what a misconfigured proxy or login page sends
        response = Response(spec["body"], status=int(spec["status"]), headers=headers)
        response.headers["Content-Type"] = spec.get("content_type") or "text/html; charset=utf-8"
        return response
    raise BridgeError(
        f"Injected fault: this sandbox was told to answer HTTP {spec['status']} (fault fhir_error).",
        code="injected-fault",
        status=int(spec["status"]),
        headers=headers,
    )


def _negotiate() -> None:
    fmt = request.args.get("_format")
    if fmt is not None and "json" not in fmt:
        raise NotAcceptable("This server speaks FHIR JSON only (use _format=json).")
    accept = request.headers.get("Accept", "")
    if accept and "xml" in accept and not any(t in accept for t in ("json", "*/*")):
        raise NotAcceptable("This server speaks FHIR JSON only (Accept: application/fhir+json).")


def _body() -> Any:
    if request.mimetype not in _JSON_TYPES:
        raise UnsupportedMediaType(
            f"Send FHIR JSON (Content-Type: application/fhir+json), not {request.mimetype or 'nothing'}.",
            code="unsupported-media-type",
        )
    try:
        return orjson.loads(request.get_data())
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.", code="invalid-json") from None


def fhir_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    response = Response(data, status=status, mimetype=FHIR_JSON)
    response.headers["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _write_response(outcome: WriteOutcome) -> Response:
    base = runtime.current().config.fhir_base
    headers = {
        "Location": f"{base}/{outcome.location}",
        "ETag": outcome.etag,
        "Last-Modified": _http_date(outcome.last_modified),
    }
    prefer = request.headers.get("Prefer", "")
    if "return=minimal" in prefer:
        return fhir_response(b"", outcome.status, headers)
    if "return=OperationOutcome" in prefer:
        verb = "created" if outcome.created else "found or updated"
        message = f"{outcome.resource['resourceType']}/{outcome.resource['id']} {verb}"
        body = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational", "diagnostics": message}],
        }
        return fhir_response(body, outcome.status, headers)
    return fhir_response(outcome.resource, outcome.status, headers)


def _http_date(instant: str) -> str:
    moment = datetime.fromisoformat(instant.replace("Z", "+00:00")).astimezone(UTC)
    return moment.strftime("%a, %d %b %Y %H:%M:%S GMT")


# -- discovery -----------------------------------------------------------------------------------


@bp.get("/metadata")
def metadata() -> Response:
    return fhir_response(capability_statement())


@bp.get("/.well-known/smart-configuration")
def smart_configuration() -> WerkzeugResponse:
    return _discovery("smart-configuration", smart_config())


@bp.get("/.well-known/openid-configuration")
def openid_configuration() -> WerkzeugResponse:
    return _discovery("openid-configuration", openid_config())


def _discovery(document: str, body: dict[str, Any]) -> WerkzeugResponse:
    """A discovery document, bent by the server's discovery fault if one is set (checklist rows D1-D4)."""
    spec = _discovery_fault(document)
    status = 200
    if spec is not None:
        if spec.get("delay_seconds"):
            time.sleep(float(spec["delay_seconds"]))
        if spec.get("redirect"):
            return redirect(spec["redirect"], code=302)
        status = int(spec.get("status", 200))
        if spec.get("body") is not None:
            raw = Response(spec["body"], status=status)
            raw.headers["Content-Type"] = spec.get("content_type") or "application/json"
            return raw
        for name, value in (spec.get("overrides") or {}).items():
            if value is None:
                body.pop(name, None)
            else:
                body[name] = value
    response = Response(orjson.dumps(body), status=status, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store" if spec is not None else "public, max-age=300"
    return response


def _discovery_fault(document: str) -> dict[str, Any] | None:
    sandbox = runtime.current()
    with sandbox.db.read() as session:
        row = session.get(ServerFault, "discovery")
        spec = (row.faults or {}).get("discovery") if row is not None else None
    if not isinstance(spec, dict) or document not in spec.get("documents", ()):
        return None
    if "times" in spec:
        with sandbox.db.write() as session:
            row = session.get(ServerFault, "discovery")
            taken = faults.take(row, "discovery") if row is not None else None
        return taken if isinstance(taken, dict) else None
    return spec


def smart_config() -> dict[str, Any]:
    config = runtime.current().config
    return {
        "issuer": config.issuer,
        "jwks_uri": config.url("/.well-known/jwks.json"),
        "authorization_endpoint": config.url("/oauth/authorize"),
        "token_endpoint": config.url("/oauth/token"),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "scopes_supported": [
            "openid",
            "fhirUser",
            "launch",
            "launch/patient",
            "launch/encounter",
            "offline_access",
            "online_access",
            "patient/*.cruds",
            "user/*.cruds",
            "system/*.cruds",
            "patient/*.read",
            "patient/*.write",
            "user/*.read",
            "user/*.write",
            "system/*.read",
            "system/*.write",
        ],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": [
            "launch-ehr",
            "launch-standalone",
            "authorize-post",
            "client-public",
            "client-confidential-asymmetric",
            "context-ehr-patient",
            "context-ehr-encounter",
            "context-standalone-patient",
            "context-standalone-encounter",
            "context-banner",
            "permission-offline",
            "permission-online",
            "permission-patient",
            "permission-user",
            "permission-v1",
            "permission-v2",
            "sso-openid-connect",
        ],
    }


def openid_config() -> dict[str, Any]:
    config = runtime.current().config
    return {
        "issuer": config.issuer,
        "authorization_endpoint": config.url("/oauth/authorize"),
        "token_endpoint": config.url("/oauth/token"),
        "jwks_uri": config.url("/.well-known/jwks.json"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "fhirUser"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "at_hash", "fhirUser"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "code_challenge_methods_supported": ["S256"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
    }


def capability_statement() -> dict[str, Any]:
    config = runtime.current().config
    try:
        software_version = version("fhir-bridge")
    except PackageNotFoundError:  # running from a checkout that is not installed
        software_version = "0"
    resources = []
    for rtype, params in sorted(PARAMS.items()):
        resources.append(
            {
                "type": rtype,
                "interaction": [{"code": c} for c in ("read", "vread", "update", "create", "search-type")],
                "versioning": "versioned-update",
                "updateCreate": True,
                "conditionalCreate": True,
                "conditionalUpdate": True,
                "searchParam": [
                    {"name": "_id", "type": "token"},
                    {"name": "_lastUpdated", "type": "date"},
                    *({"name": p.name, "type": p.kind} for p in params),
                ],
            }
        )
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "publisher": "fhir-bridge",
        "kind": "instance",
        "software": {
            "name": "fhir-bridge sandbox EHR (development and demo only)",
            "version": software_version,
        },
        "implementation": {
            "description": "Sandbox EHR for development and demos. Synthetic data; not for clinical use.",
            "url": config.fhir_base,
        },
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "extension": [
                        {
                            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                            "extension": [
                                {"url": "authorize", "valueUri": config.url("/oauth/authorize")},
                                {"url": "token", "valueUri": config.url("/oauth/token")},
                            ],
                        }
                    ],
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ]
                        }
                    ],
                },
                "resource": resources,
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }
        ],
    }


# -- the REST interactions -----------------------------------------------------------------------


@bp.post("")
@bp.post("/")
def bundle() -> Response:
    data = _body()
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise BadRequest(
            "POST to the FHIR base takes a Bundle of type transaction or batch.", code="not-a-bundle"
        )
    kind = data.get("type")
    sandbox = runtime.current()
    access = caller().grant
    if kind == "transaction":
        with sandbox.db.write() as session:
            result = sandbox.store.transaction(session, data, access)
    elif kind == "batch":
        with sandbox.db.write() as session:
            result = sandbox.store.batch(session, data, access)
    else:
        raise BadRequest(
            f"Bundle.type must be transaction or batch, not {str(kind)[:30]!r}.",
            code="unsupported-bundle-type",
        )
    log.info("bundle processed", extra={"client": caller().client_id, "count": len(result.get("entry", []))})
    return fhir_response(result)


@bp.get("/<rtype>")
def search(rtype: str) -> Response:
    return _search(rtype, list(request.args.items(multi=True)))


@bp.post("/<rtype>/_search")
def search_post(rtype: str) -> Response:
    if request.mimetype != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("POST _search takes application/x-www-form-urlencoded parameters.")
    pairs = list(request.args.items(multi=True)) + list(request.form.items(multi=True))
    return _search(rtype, pairs)


def _search(rtype: str, pairs: list[tuple[str, str]]) -> Response:
    sandbox = runtime.current()
    who = caller()
    lenient = "handling=lenient" in request.headers.get("Prefer", "")
    query = sandbox.store.parse_search(rtype, pairs, lenient=lenient)
    with sandbox.db.read() as session:
        page = sandbox.store.search(session, query, who.grant)
        extra = []
        if who.faults.get("search_foreign_patient") and page.rows:
            foreign = sandbox.store.foreign_resource(session, query, _searched_patient(query, who))
            if foreign is not None:
                extra.append(foreign)
    next_url = who.faults.get("search_next_url")
    return fhir_response(sandbox.store.bundle_json(page, extra=extra, next_url=next_url))


def _searched_patient(query: SearchQuery, who: Caller) -> str | None:
    if who.patient:
        return who.patient
    for c in query.criteria:
        if c.name in ("patient", "subject", "_id") and c.values:
            _, ref_id, _ = reference_key(c.values[0], runtime.current().config.fhir_base)
            return ref_id or c.values[0]
    return None


@bp.post("/<rtype>")
def create(rtype: str) -> Response:
    sandbox = runtime.current()
    sandbox.store.check_type(rtype)
    data = _body()
    with sandbox.db.write() as session:
        outcome = sandbox.store.create(
            session,
            data,
            caller().grant,
            expected_type=rtype,
            if_none_exist=request.headers.get("If-None-Exist"),
        )
    return _write_response(outcome)


@bp.get("/<rtype>/<rid>")
def read(rtype: str, rid: str) -> Response:
    sandbox = runtime.current()
    with sandbox.db.read() as session:
        resource = sandbox.store.read(session, rtype, rid, caller().grant)
    meta = resource.get("meta", {})
    return fhir_response(
        resource,
        headers={"ETag": f'W/"{meta.get("versionId")}"', "Last-Modified": _http_date(meta["lastUpdated"])},
    )


@bp.get("/<rtype>/<rid>/_history/<vid>")
def vread(rtype: str, rid: str, vid: str) -> Response:
    """Only the current version is kept; older ones answer 404 with a message saying so."""
    sandbox = runtime.current()
    with sandbox.db.read() as session:
        resource = sandbox.store.read(session, rtype, rid, caller().grant)
    current = str(resource.get("meta", {}).get("versionId"))
    if vid != current:
        raise BridgeError(
            f"This sandbox keeps only the current version ({current}) of {rtype}/{rid}.",
            code="version-not-kept",
            status=404,
        )
    return fhir_response(resource, headers={"ETag": f'W/"{current}"'})


@bp.put("/<rtype>/<rid>")
def update(rtype: str, rid: str) -> Response:
    sandbox = runtime.current()
    sandbox.store.check_type(rtype)
    data = _body()
    with sandbox.db.write() as session:
        outcome = sandbox.store.update(
            session, rtype, rid, data, caller().grant, if_match=request.headers.get("If-Match")
        )
    return _write_response(outcome)


@bp.put("/<rtype>")
def conditional_update(rtype: str) -> Response:
    """``PUT Type?criteria``: update the one match, or create when there is none (412 for several)."""
    sandbox = runtime.current()
    sandbox.store.check_type(rtype)
    criteria = request.query_string.decode()
    if not criteria:
        raise BadRequest(
            f"PUT {rtype[:64]} needs search criteria (Type?identifier=system|value) or an id (Type/id).",
            code="invalid-condition",
        )
    data = _body()
    with sandbox.db.write() as session:
        rid = sandbox.store.conditional_update_id(session, rtype, criteria, path=None)
        if isinstance(data, dict):
            data = {**data, "id": rid}
        outcome = sandbox.store.update(session, rtype, rid, data, caller().grant)
    return _write_response(outcome)


@bp.route("/<path:rest>", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
def unsupported(rest: str) -> Response:
    """Anything else under /fhir: say what this server does instead of a generic 404."""
    if request.method in ("DELETE", "PATCH"):
        raise BridgeError(
            "This sandbox never deletes or patches resources; update them with PUT.",
            code="method-not-allowed",
            status=405,
            headers={"Allow": "GET, POST, PUT"},
        )
    raise NotFound(
        f"This sandbox FHIR endpoint does not support {request.method} {rest[:80]}. It supports read, "
        "vread of the current version, search, create, update and transaction/batch; see /fhir/metadata.",
        code="unsupported-interaction",
    )
