"""CDS Hooks 2.0: discovery and patient-view answers validate against the spec's JSON shapes, a card per
open alert with a SMART link to our /launch, and the caller's JWT is checked (iss allow-list per tenant,
its keys, aud, exp, jti)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest
from flask import Flask
from flask.testing import FlaskClient
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from fhir_bridge import services
from fhir_bridge.storage.models import Alert, Tenant
from tests.support.http import json_of
from tests.support.vendor import public_jwks, vendor_key

EHR_ISS = "https://ehr.example.org/cds-client"
FHIR_BASE = "https://ehr.example.org/fhir"

# From CDS Hooks 2.0 (cds-hooks.hl7.org/2.0): Discovery, and the CDS Service response with Cards.
DISCOVERY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["services"],
    "properties": {
        "services": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["hook", "description", "id"],
                "properties": {
                    "hook": {"type": "string"},
                    "title": {"type": "string"},
                    "description": {"type": "string"},
                    "id": {"type": "string", "pattern": "^[A-Za-z0-9._~-]+$"},
                    "prefetch": {"type": "object", "additionalProperties": {"type": "string"}},
                    "usageRequirements": {"type": "string"},
                },
            },
        }
    },
}
CODING = {
    "type": "object",
    "required": ["code"],
    "properties": {"system": {"type": "string"}, "code": {"type": "string"}, "display": {"type": "string"}},
}
LINK = {
    "type": "object",
    "required": ["label", "url", "type"],
    "properties": {
        "label": {"type": "string"},
        "url": {"type": "string", "format": "uri"},
        "type": {"enum": ["absolute", "smart"]},
        "appContext": {"type": "string"},
    },
}
CARD = {
    "type": "object",
    "required": ["summary", "indicator", "source"],
    "properties": {
        "uuid": {"type": "string"},
        "summary": {"type": "string", "maxLength": 139},
        "detail": {"type": "string"},
        "indicator": {"enum": ["info", "warning", "critical"]},
        "source": {
            "type": "object",
            "required": ["label"],
            "properties": {
                "label": {"type": "string"},
                "url": {"type": "string"},
                "icon": {"type": "string"},
                "topic": CODING,
            },
        },
        "suggestions": {"type": "array"},
        "selectionBehavior": {"enum": ["at-most-one", "any"]},
        "overrideReasons": {"type": "array", "items": CODING},
        "links": {"type": "array", "items": LINK},
    },
}
RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["cards"],
    "properties": {"cards": {"type": "array", "items": CARD}, "systemActions": {"type": "array"}},
}


@pytest.fixture
def cds_app(make_app: Any) -> Flask:
    app: Flask = make_app(PUBLIC_URL="https://bridge.example.org")
    with app.app_context(), services.current().db.transaction() as session:
        session.add(
            Tenant(
                id="t1",
                name="Example EHR",
                fhir_base_url=FHIR_BASE,
                cds_client_iss=EHR_ISS,
                cds_client_jwks=public_jwks(vendor_key("ES384", "ehr")),
            )
        )
        session.flush()
        session.add_all(
            [
                Alert(tenant_id="t1", patient_id="p1", rule_id="safety-item9", priority="urgent",
                      reason="PHQ-9 item 9 scored 1 of 3 on 2026-12-06; PHQ-9 total 7. " * 3),
                Alert(tenant_id="t1", patient_id="p1", rule_id="no-response",
                      reason="PHQ-9 15 on 2026-11-02 is -6 % from baseline 16 (2026-09-07) after 8 weeks"),
                Alert(tenant_id="t1", patient_id="p1", rule_id="severe", status="acknowledged", reason="old"),
                Alert(tenant_id="t1", patient_id="p2", rule_id="severe", reason="someone else"),
            ]
        )  # fmt: skip
    return app


def forged(header: dict[str, Any]) -> str:
    """A token with a header we choose and a junk signature (alg confusion attempts)."""
    import base64
    import json

    def part(obj: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {"iss": EHR_ISS, "aud": "https://bridge.example.org/cds-services/fhir-bridge-alerts",
              "exp": now + 200, "jti": uuid.uuid4().hex}  # fmt: skip
    return f"{part(header)}.{part(claims)}.c2lnbmF0dXJl"


def token(
    key: RSAKey | ECKey, alg: str = "ES384", header: dict[str, Any] | None = None, **claims: Any
) -> str:
    now = int(time.time())
    body = {
        "iss": EHR_ISS,
        "sub": "ehr-client",
        "aud": "https://bridge.example.org/cds-services/fhir-bridge-alerts",
        "iat": now,
        "exp": now + 240,
        "jti": uuid.uuid4().hex,
    } | claims
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(
        {"alg": alg, "kid": key.kid, "typ": "JWT"} | (header or {}), body, key, algorithms=[alg]
    )


def hook(patient: str = "p1", **extra: Any) -> dict[str, Any]:
    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": FHIR_BASE,
        "context": {"userId": "Practitioner/dr1", "patientId": patient},
    } | extra


def call(client: FlaskClient, bearer: str | None, body: dict[str, Any]) -> Any:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return client.post("/cds-services/fhir-bridge-alerts", json=body, headers=headers)


def test_discovery_lists_the_patient_view_service(cds_app: Flask) -> None:
    response = cds_app.test_client().get("/cds-services")
    assert response.status_code == 200
    jsonschema.validate(response.json, DISCOVERY_SCHEMA)
    assert [(s["hook"], s["id"]) for s in json_of(response)["services"]] == [
        ("patient-view", "fhir-bridge-alerts")
    ]


def test_patient_view_returns_a_card_per_open_alert_with_a_smart_link(cds_app: Flask) -> None:
    response = call(cds_app.test_client(), token(vendor_key("ES384", "ehr")), hook())
    assert response.status_code == 200, response.json
    jsonschema.validate(response.json, RESPONSE_SCHEMA, format_checker=jsonschema.FormatChecker())
    cards = response.json["cards"]
    assert {(c["source"]["topic"]["code"], c["indicator"]) for c in cards} == {
        ("no-response", "info"),
        ("safety-item9", "critical"),
    }
    link = {
        "label": "Open the fhir-bridge dashboard",
        "url": "https://bridge.example.org/launch",
        "type": "smart",
    }
    assert all(c["links"] == [link] for c in cards)
    no_response = next(c for c in cards if c["source"]["topic"]["code"] == "no-response")
    assert no_response["summary"].startswith("PHQ-9 15 on 2026-11-02 is -6 % from baseline 16")
    # Another patient: only theirs; a patient with nothing open: no cards.
    other = call(cds_app.test_client(), token(vendor_key("ES384", "ehr")), hook("p2")).json["cards"]
    assert [c["source"]["topic"]["code"] for c in other] == ["severe"]
    assert call(cds_app.test_client(), token(vendor_key("ES384", "ehr")), hook("p3")).json == {"cards": []}


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: None, "missing-token"),
        (lambda: "not-a-jwt", "invalid-token"),
        (lambda: token(vendor_key("ES384", "stranger")), "invalid-token"),  # unregistered kid / wrong key
        (lambda: token(vendor_key("ES384", "ehr"), iss="https://evil.example"), "unknown-cds-client"),
        (lambda: token(vendor_key("ES384", "ehr"), aud="https://elsewhere.example/cds"), "invalid-token"),
        (lambda: token(vendor_key("ES384", "ehr"), exp=int(time.time()) - 600), "invalid-token"),
        (lambda: token(vendor_key("ES384", "ehr"), exp=int(time.time()) + 3600), "invalid-token"),
        (lambda: token(vendor_key("ES384", "ehr"), jti=None), "invalid-token"),
        (lambda: forged({"alg": "none", "kid": vendor_key("ES384", "ehr").kid}), "invalid-token"),
        (lambda: forged({"alg": "HS256", "kid": vendor_key("ES384", "ehr").kid}), "invalid-token"),
        (
            lambda: token(vendor_key("ES384", "ehr"), header={"jku": "https://evil.example/jwks"}),
            "invalid-token",
        ),
        (lambda: token(vendor_key("ES384", "ehr"), header={"jwk": {"kty": "EC"}}), "invalid-token"),
        (lambda: token(vendor_key("RS384", "ehr"), alg="RS384"), "invalid-token"),  # not a registered key
    ],
)
def test_a_caller_without_a_valid_jwt_from_a_registered_cds_client_is_refused(
    cds_app: Flask, make: Any, code: str
) -> None:
    response = call(cds_app.test_client(), make(), hook())
    assert response.status_code == 401 and response.json["error"] == code


def test_a_replayed_jwt_and_a_foreign_fhir_server_are_refused(cds_app: Flask) -> None:
    client = cds_app.test_client()
    once = token(vendor_key("ES384", "ehr"))
    assert call(client, once, hook()).status_code == 200
    assert call(client, once, hook()).status_code == 401
    wrong = call(client, token(vendor_key("ES384", "ehr")), hook(fhirServer="https://other.example/fhir"))
    assert wrong.status_code == 403 and wrong.json["error"] == "wrong-fhir-server"
    bad_hook = call(client, token(vendor_key("ES384", "ehr")), hook(hook="order-sign"))
    assert bad_hook.status_code == 400 and bad_hook.json["error"] == "unsupported-hook"
    assert client.post("/cds-services/nope", json=hook()).status_code == 404


def test_fired_at_order_is_newest_first(cds_app: Flask) -> None:
    with cds_app.app_context(), services.current().db.transaction() as session:
        session.add(
            Alert(
                tenant_id="t1",
                patient_id="p4",
                rule_id="severe",
                reason="b",
                fired_at=datetime(2026, 12, 2, tzinfo=UTC),
            )
        )
        session.add(Alert(tenant_id="t1", patient_id="p4", rule_id="no-response", reason="a",
                          fired_at=datetime(2026, 12, 1, tzinfo=UTC)))  # fmt: skip
    cards = call(cds_app.test_client(), token(vendor_key("ES384", "ehr")), hook("p4")).json["cards"]
    assert [c["summary"] for c in cards] == ["b", "a"]
