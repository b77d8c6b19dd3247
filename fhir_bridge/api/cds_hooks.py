"""CDS Hooks 2.0 service (issue 8): ``GET /cds-services`` and ``POST /cds-services/<id>`` (``patient-view``).

When a clinician opens a chart, an EHR that supports CDS Hooks calls us; we answer with one card per
open alert of that patient (the rules' alerts, see :mod:`fhir_bridge.rules`), each with a SMART app
link to the dashboard (``type: smart``, url = our ``/launch``). Cards carry the alert's reason.

Authentication (CDS Hooks 2.0 "Trusting CDS Clients"): every hook call carries
``Authorization: Bearer <JWT>`` signed by the EHR's CDS client. We accept it only when

* the token is at most 8 KiB, its ``alg`` is RS384 or ES384, and it names a ``kid``;
* ``iss`` is the ``cds_client_iss`` registered for exactly one active tenant (the allow-list);
* the signature verifies with exactly one of that tenant's keys (by ``kid`` and the key type the
  ``alg`` needs): inline ``cds_client_jwks``, or fetched from its
  registered ``cds_client_jwks_url`` (through the same SSRF-guarded fetcher as vendor keys). A ``jku``
  header must equal that URL; any other ``jku`` is refused and never fetched;
* ``aud`` is this service's URL exactly; ``exp`` is present and at most 5 minutes ahead (+60 s
  leeway) and not past; ``iat`` is not in the future; ``jti`` was never seen for this issuer;
* ``fhirServer`` in the request, when present, is that tenant's FHIR base URL.

The discovery endpoint is public (the spec has it unauthenticated; it reveals nothing about patients).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from flask import Blueprint, Flask, Response, current_app, request
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry
from sqlalchemy import select

from auth.jwks_fetch import JwksFetcher, JwksFetchError
from fhir_bridge import services
from fhir_bridge.errors import BadRequest, Forbidden, Unauthorized
from fhir_bridge.storage.models import Alert, Tenant
from fhir_bridge.vendors import DbReplayStore

bp = Blueprint("cds_hooks", __name__)
SERVICE_ID = "fhir-bridge-alerts"
ALGS = ("RS384", "ES384")
MAX_TOKEN_BYTES = 8 * 1024
MAX_LIFETIME = 300
LEEWAY = 60
FETCHER_KEY = "fhir_bridge.cds_jwks"
_REGISTRY = JWSRegistry(algorithms=list(ALGS))
INDICATOR = {"urgent": "critical", "stat": "critical", "asap": "warning", "routine": "info"}


def discovery() -> dict[str, Any]:
    return {
        "services": [
            {
                "hook": "patient-view",
                "id": SERVICE_ID,
                "title": "fhir-bridge alerts",
                "description": (
                    "Open alerts from the patient's mental-health app data (safety item, severe score, "
                    "no response, disengagement, alliance drop), with a link to the fhir-bridge dashboard."
                ),
                "usageRequirements": "Register the EHR's CDS client iss and JWKS with hospital IT.",
            }
        ]
    }


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


@bp.get("/cds-services")
def services_list() -> Response:
    return _json(discovery())


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    parts = token.split(".")
    if len(parts) != 3:
        raise Unauthorized("The CDS Hooks bearer token is not a signed JWT.", code="invalid-token")
    try:
        header = json.loads(_b64(parts[0]))
        claims = json.loads(_b64(parts[1]))
    except (ValueError, UnicodeDecodeError):
        raise Unauthorized("The CDS Hooks bearer token is not a signed JWT.", code="invalid-token") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise Unauthorized("The CDS Hooks bearer token is not a signed JWT.", code="invalid-token")
    return header, claims


def _b64(part: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def authenticate(token: str, audience: str) -> Tenant:
    """The tenant whose CDS client signed ``token``; raises Unauthorized/Forbidden with the reason."""
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthorized("The CDS Hooks bearer token is too large.", code="invalid-token")
    header, claims = _unverified(token)
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in ALGS:
        raise Unauthorized("The CDS Hooks JWT must be signed with RS384 or ES384.", code="invalid-token")
    if not isinstance(kid, str) or not kid:
        raise Unauthorized("The CDS Hooks JWT header must name its key (kid).", code="invalid-token")
    if {"jwk", "x5c", "x5u", "crit"} & set(header):
        raise Unauthorized(
            "The CDS Hooks JWT header may not carry jwk, x5c, x5u or crit.", code="invalid-token"
        )
    iss = claims.get("iss")
    if not isinstance(iss, str) or not iss:
        raise Unauthorized("The CDS Hooks JWT has no iss.", code="invalid-token")
    svc = services.current()
    with svc.db.sessions() as session:
        tenants = session.scalars(
            select(Tenant).where(Tenant.cds_client_iss == iss, Tenant.status == "active")
        ).all()
        for tenant in tenants:
            session.expunge(tenant)
    if len(tenants) != 1:
        raise Unauthorized(
            "This CDS client (iss) is not registered with this service.", code="unknown-cds-client"
        )
    tenant = tenants[0]
    jku = header.get("jku")
    if jku is not None and jku != tenant.cds_client_jwks_url:
        raise Unauthorized(
            "The CDS Hooks JWT jku is not the JWKS URL registered for this client.", code="invalid-token"
        )
    keys = _keys(tenant, kid, "RSA" if alg == "RS384" else "EC")
    try:
        verified = jwt.decode(token, keys, algorithms=[alg], registry=_REGISTRY)
    except (JoseError, ValueError):
        raise Unauthorized("The CDS Hooks JWT signature does not verify.", code="invalid-token") from None
    _check_claims(dict(verified.claims), audience)
    expires = datetime.fromtimestamp(int(verified.claims["exp"]), UTC)
    if not DbReplayStore(svc.db).remember(f"cds:{iss}"[:128], str(verified.claims["jti"])[:255], expires):
        raise Unauthorized("This CDS Hooks JWT (jti) was already used.", code="invalid-token")
    return tenant


def _keys(tenant: Tenant, kid: str, kty: str) -> KeySet:
    data: Any = tenant.cds_client_jwks
    if data is None and tenant.cds_client_jwks_url:
        fetcher: JwksFetcher = current_app.extensions[FETCHER_KEY]
        try:
            data = fetcher.get(tenant.cds_client_jwks_url)
            if not any(isinstance(k, dict) and k.get("kid") == kid for k in data.get("keys", [])):
                data = fetcher.get(tenant.cds_client_jwks_url, force_refresh=True)
        except JwksFetchError:
            raise Unauthorized("The CDS client's keys could not be fetched.", code="invalid-token") from None
    if not isinstance(data, dict):
        raise Unauthorized("No keys are registered for this CDS client.", code="invalid-token")
    matching = [
        k for k in data.get("keys", []) if isinstance(k, dict) and k.get("kid") == kid and k.get("kty") == kty
    ]
    if len(matching) != 1:
        raise Unauthorized(
            "No single registered key matches the CDS Hooks JWT kid (and the key type its alg needs).",
            code="invalid-token",
        )
    try:
        return KeySet.import_key_set({"keys": matching})
    except (JoseError, ValueError, TypeError):
        raise Unauthorized("The registered key for this kid is not usable.", code="invalid-token") from None


def _check_claims(claims: dict[str, Any], audience: str) -> None:
    now = time.time()
    aud = claims.get("aud")
    if aud != audience and not (isinstance(aud, list) and audience in aud):
        raise Unauthorized(f"The CDS Hooks JWT aud must be {audience}.", code="invalid-token")
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise Unauthorized("The CDS Hooks JWT has no exp.", code="invalid-token")
    if exp < now - LEEWAY:
        raise Unauthorized("The CDS Hooks JWT has expired.", code="invalid-token")
    if exp > now + MAX_LIFETIME + LEEWAY:
        raise Unauthorized("The CDS Hooks JWT may live at most 5 minutes.", code="invalid-token")
    if isinstance(iat, int | float) and iat > now + LEEWAY:
        raise Unauthorized("The CDS Hooks JWT was issued in the future.", code="invalid-token")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise Unauthorized("The CDS Hooks JWT has no jti.", code="invalid-token")


def _same_base(a: str, b: str) -> bool:
    return a.rstrip("/").lower() == b.rstrip("/").lower()


def cards_for(tenant: Tenant, patient_id: str) -> list[dict[str, Any]]:
    svc = services.current()
    with svc.db.sessions() as session:
        alerts = session.scalars(
            select(Alert)
            .where(Alert.tenant_id == tenant.id, Alert.patient_id == patient_id, Alert.status == "open")
            .order_by(Alert.fired_at.desc())
        ).all()
    launch = svc.settings.url("/launch")
    cards: list[dict[str, Any]] = []
    for alert in alerts:
        summary = alert.reason if len(alert.reason) < 140 else alert.reason[:136] + "..."
        cards.append(
            {
                "uuid": str(alert.id),
                "summary": summary,
                "detail": alert.reason,
                "indicator": INDICATOR.get(alert.priority, "info"),
                "source": {
                    "label": "fhir-bridge",
                    "topic": {"code": alert.rule_id, "display": alert.rule_id},
                },
                "links": [{"label": "Open the fhir-bridge dashboard", "url": launch, "type": "smart"}],
            }
        )
    return cards


@bp.post("/cds-services/<service_id>")
def call(service_id: str) -> Response:
    if service_id != SERVICE_ID:
        from fhir_bridge.errors import NotFound

        raise NotFound(
            f"There is no CDS service {service_id!r}; see GET /cds-services.", code="no-such-service"
        )
    auth = request.headers.get("Authorization", "")
    if not auth.lower().startswith("bearer ") or not auth[7:].strip():
        raise Unauthorized(
            "CDS Hooks calls need Authorization: Bearer <JWT signed by the EHR's CDS client>.",
            code="missing-token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    tenant = authenticate(auth[7:].strip(), services.current().settings.url(f"/cds-services/{SERVICE_ID}"))
    if request.mimetype != "application/json":
        raise BadRequest("Send the hook request as application/json.", code="unsupported-media-type")
    try:
        body = orjson.loads(request.get_data(cache=False))
    except orjson.JSONDecodeError:
        raise BadRequest("The hook request is not valid JSON.", code="invalid-json") from None
    if not isinstance(body, dict):
        raise BadRequest("The hook request must be a JSON object.", code="invalid-json")
    if body.get("hook") != "patient-view":
        raise BadRequest("This service answers the patient-view hook only.", code="unsupported-hook")
    if not isinstance(body.get("hookInstance"), str):
        raise BadRequest("hookInstance is required.", code="invalid-field")
    context = body.get("context")
    patient_id = context.get("patientId") if isinstance(context, dict) else None
    if not isinstance(patient_id, str) or not patient_id or len(patient_id) > 64:
        raise BadRequest(
            "context.patientId is required (the patient whose chart was opened).", code="invalid-field"
        )
    server = body.get("fhirServer")
    if server is not None and (not isinstance(server, str) or not _same_base(server, tenant.fhir_base_url)):
        raise Forbidden(
            "fhirServer is not the FHIR server registered for this CDS client.", code="wrong-fhir-server"
        )
    return _json({"cards": cards_for(tenant, patient_id)})


def init_app(app: Flask) -> None:
    settings = services.from_app(app).settings
    app.extensions[FETCHER_KEY] = JwksFetcher(
        settings.jwks_fetch_allowed_hosts, allow_insecure_loopback=settings.allow_insecure_loopback
    )
    app.register_blueprint(bp)
