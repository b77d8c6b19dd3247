"""FHIR push for vendors that already speak FHIR, the CapabilityStatement, and the Questionnaire catalogue."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from flask import Blueprint, Response, request

from fhir_bridge import fhir_push, services
from fhir_bridge.api.common import (
    current_principal,
    current_vendor,
    read_json,
    requires_scope,
    vendor_gate,
)
from fhir_bridge.api.records import mapper
from fhir_bridge.errors import FHIR_JSON
from fhir_bridge.push import Outcome, check_idempotency_key, submit

bp = Blueprint("fhir", __name__, url_prefix="/fhir")

MEDIA_TYPES = (FHIR_JSON, "application/json")


def _fhir(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = Response(
        body if isinstance(body, bytes) else orjson.dumps(body), status=status, mimetype=FHIR_JSON
    )
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _outcome_response(outcome: Outcome) -> Response:
    response = _fhir(outcome.body, outcome.status, outcome.headers)
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _location() -> str:
    return services.current().settings.url("/api/v1/records/{id}")


def _push_one(resource_type: str) -> Response:
    key = check_idempotency_key(request.headers.get("Idempotency-Key"))
    body = read_json(*MEDIA_TYPES)
    work = partial(
        fhir_push.single,
        vendor=current_vendor(),
        resource=body,
        expected_type=resource_type,
        scopes=current_principal().scopes,
        location=_location(),
    )
    return _outcome_response(
        submit(
            services.current().db,
            vendor=current_vendor(),
            kind="fhir",
            body=request.get_data(cache=True),
            idempotency_key=key,
            work=work,
            gate=vendor_gate(),
        )
    )


@bp.post("/Observation")
@requires_scope("system/Observation.c", in_transaction=True)
def create_observation() -> Response:
    return _push_one("Observation")


@bp.post("/QuestionnaireResponse")
@requires_scope("system/QuestionnaireResponse.c", in_transaction=True)
def create_questionnaire_response() -> Response:
    return _push_one("QuestionnaireResponse")


@bp.post("")
@requires_scope("system/Observation.c", "system/QuestionnaireResponse.c", in_transaction=True)
def batch_or_transaction() -> Response:
    key = check_idempotency_key(request.headers.get("Idempotency-Key"))
    body = read_json(*MEDIA_TYPES)
    settings = services.current().settings
    work = partial(
        fhir_push.bundle,
        vendor=current_vendor(),
        body=body,
        scopes=current_principal().scopes,
        max_entries=settings.max_batch_records,
        location=_location(),
    )
    return _outcome_response(
        submit(
            services.current().db,
            vendor=current_vendor(),
            kind="fhir",
            body=request.get_data(cache=True),
            idempotency_key=key,
            work=work,
            gate=vendor_gate(),
        )
    )


@bp.get("/metadata")
def metadata() -> Response:
    """What this endpoint accepts, exactly: creates of two types, batch/transaction, the catalogue."""
    settings = services.current().settings
    statement = capability_statement(settings.public_url)
    return _fhir(statement, headers={"Cache-Control": "public, max-age=3600"})


def capability_statement(public_url: str) -> dict[str, Any]:
    create_doc = (
        "Create only. The subject must be the vendor's app user (subject.identifier with system "
        f"{fhir_push.canonical()}/sid/app-user/<client_id>); it is resolved to the enrolled EHR patient. "
        "identifier[0] is the vendor's record id (re-sending it is a no-op). Queued for delivery to the EHR; "
        "status at the Location returned."
    )
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "publisher": "fhir-bridge",
        "kind": "instance",
        "software": {"name": "fhir-bridge", "version": _version()},
        "implementation": {"description": "fhir-bridge vendor push endpoint", "url": f"{public_url}/fhir"},
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON, "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": "App vendors push FHIR resources for their enrolled app users.",
                "security": {
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
                    "description": f"OAuth2 client credentials with private_key_jwt; see "
                    f"{public_url}/.well-known/smart-configuration",
                },
                "resource": [
                    {"type": "Observation", "interaction": [{"code": "create"}], "documentation": create_doc},
                    {
                        "type": "QuestionnaireResponse",
                        "interaction": [{"code": "create"}],
                        "documentation": create_doc,
                    },
                    {
                        "type": "Questionnaire",
                        "interaction": [{"code": "search-type"}],
                        "searchParam": [{"name": "url", "type": "uri"}],
                        "documentation": "The instruments whose answers the native API maps.",
                    },
                ],
                "interaction": [
                    {
                        "code": "batch",
                        "documentation": "Bundle.type=batch of POST entries; one response per entry.",
                    },
                    {
                        "code": "transaction",
                        "documentation": "Bundle.type=transaction of POST entries; all or none.",
                    },
                ],
            }
        ],
    }


def _version() -> str:
    try:
        return version("fhir-bridge")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+source"


@bp.get("/Questionnaire")
def questionnaires() -> Response:
    """The Questionnaires of the mapping catalogue, as a searchset Bundle (``?url=`` filters)."""
    wanted = request.args.get("url")
    items = [q for q in mapper().catalog.questionnaires() if wanted is None or q.get("url") == wanted]
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(items),
        "entry": [{"fullUrl": q.get("url"), "resource": q, "search": {"mode": "match"}} for q in items],
    }
    return _fhir(bundle)
