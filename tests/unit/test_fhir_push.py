"""FHIR push: resources are never trusted as sent, errors name the element, Bundles keep their promises."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest
from flask import Flask
from sqlalchemy import select

from fhir_bridge import enrollment, services
from fhir_bridge.storage.models import OutboxItem
from tests.conftest import AppFactory
from tests.support.http import json_of
from tests.support.openapi import assert_matches_spec
from tests.support.vendor import Vendor, add_tenant, register
from tests.unit.test_push_payloads import stored

SYSTEM = "https://fhir-bridge.org/fhir/sid/app-user/acme-mood"
OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "client-chosen",
    "meta": {"security": [{"code": "R"}]},
    "text": {
        "status": "generated",
        "div": "<div xmlns='http://www.w3.org/1999/xhtml'><script>x</script></div>",
    },
    "identifier": [{"system": "https://acme.example/records", "value": "obs-1"}],
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "41950-7"}]},
    "subject": {"identifier": {"system": SYSTEM, "value": "user-1"}},
    "effectiveDateTime": "2026-11-20",
    "valueQuantity": {"value": 8042, "unit": "/d", "system": "http://unitsofmeasure.org", "code": "/d"},
}


@pytest.fixture
def app(make_app: AppFactory) -> Flask:
    app = make_app()
    add_tenant(services.from_app(app).db)
    return app


@pytest.fixture
def vendor(app: Flask) -> Vendor:
    vendor = register(app, "acme-mood")
    svc = services.from_app(app)
    created = enrollment.create(
        svc.db,
        secret=svc.secret_key,
        tenant_id="general",
        patient_id="pat-1",
        vendor_client_id="acme-mood",
        created_by="dr",
        ttl_seconds=600,
    )
    assert vendor.claim(created.code, "user-1").status_code == 201
    return vendor


def fhir_post(vendor: Vendor, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    return vendor.client.post(
        path,
        data=json.dumps(body),
        headers=vendor.headers(**{"Content-Type": "application/fhir+json", **(headers or {})}),
    )


def obs(**changes: Any) -> dict[str, Any]:
    resource = copy.deepcopy(OBSERVATION)
    for key, value in changes.items():
        if value is None:
            resource.pop(key, None)
        else:
            resource[key] = value
    return resource


def _refused(
    app: Flask, response: Any, status: int, code: str, expression: str, path: str = "/fhir/Observation"
) -> None:
    assert response.status_code == status, response.json
    assert response.mimetype == "application/fhir+json"
    issue = response.json["issue"][0]
    assert issue["details"]["coding"][0]["code"] == code, issue
    assert issue["expression"] == [expression], issue
    assert_matches_spec(response, "POST", path)
    assert stored(app)[1:] == (0, 0)


def test_observation_is_stamped_queued_and_deduplicated(app: Flask, vendor: Vendor) -> None:
    response = fhir_post(vendor, "/fhir/Observation", obs())
    assert response.status_code == 201, response.json
    assert_matches_spec(response, "POST", "/fhir/Observation")
    written = response.json
    assert "id" not in written and "meta" not in written and "text" not in written  # P9: stripped
    assert written["subject"] == {"reference": "Patient/pat-1"}  # P8: from the enrollment
    assert written["identifier"][0]["system"] == "https://fhir-bridge.org/fhir/sid/record-resource"
    assert written["device"]["reference"].startswith("urn:uuid:")
    status = vendor.get(response.headers["Location"].split("8080", 1)[1])
    assert status.json["status"] == "queued"
    with services.from_app(app).db.sessions() as session:
        (item,) = session.execute(select(OutboxItem).where(OutboxItem.record_id.is_not(None))).scalars().all()
        assert orjson.loads(item.body) == written
    again = fhir_post(
        vendor,
        "/fhir/Observation",
        obs(valueQuantity={"value": 1, "unit": "/d", "system": "http://unitsofmeasure.org", "code": "/d"}),
    )
    assert again.status_code == 200
    assert again.json["issue"][0]["code"] == "duplicate"
    assert again.headers["Location"] == response.headers["Location"]
    assert stored(app)[1:] == (1, 1)


def test_a_replay_with_the_same_idempotency_key_answers_with_the_first_responses_headers(
    app: Flask, vendor: Vendor
) -> None:
    headers = {"Idempotency-Key": "obs-k-1"}
    first = fhir_post(vendor, "/fhir/Observation", obs(), headers=headers)
    assert first.status_code == 201, first.json
    again = fhir_post(vendor, "/fhir/Observation", obs(), headers=headers)
    assert again.status_code == 201 and again.json == first.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["X-Submission-Id"] == first.headers["X-Submission-Id"]
    assert stored(app)[1:] == (1, 1)


@pytest.mark.parametrize(
    ("resource", "status", "code", "expression"),
    [
        (
            {"resourceType": "Patient", "name": [{"family": "X"}]},
            422,
            "resource-type-not-accepted",
            "Observation.resourceType",
        ),
        (obs(subject={"reference": "Patient/123"}), 422, "subject-not-allowed", "Observation.subject"),
        (
            obs(subject={"identifier": {"system": "https://other.example/users", "value": "user-1"}}),
            422,
            "subject-not-allowed",
            "Observation.subject",
        ),
        (
            obs(subject={"identifier": {"system": SYSTEM, "value": "someone-else"}}),
            422,
            "not-enrolled",
            "Observation.subject",
        ),
        (obs(contained=[{"resourceType": "Patient"}]), 422, "element-not-accepted", "Observation.contained"),
        (
            obs(modifierExtension=[{"url": "x", "valueBoolean": True}]),
            422,
            "element-not-accepted",
            "Observation.modifierExtension",
        ),
        (obs(identifier=None), 422, "identifier-required", "Observation.identifier"),
        (obs(effectiveDateTime="2999-01-01"), 422, "timestamp-in-future", "Observation.effectiveDateTime"),
        (obs(status="bogus"), 422, "invalid-resource", "Observation.status"),
        (obs(valueQuantity={"value": "lots"}), 422, "invalid-resource", "Observation.valueQuantity.value"),
    ],
    ids=[
        "patient",
        "literal-subject",
        "foreign-system",
        "not-enrolled",
        "contained",
        "modifier",
        "no-identifier",
        "future",
        "bad-status",
        "bad-quantity",
    ],
)
def test_p7_to_p10_refused_with_the_element_path(
    app: Flask, vendor: Vendor, resource: dict[str, Any], status: int, code: str, expression: str
) -> None:
    _refused(app, fhir_post(vendor, "/fhir/Observation", resource), status, code, expression)


def test_endpoint_type_must_match(app: Flask, vendor: Vendor) -> None:
    response = fhir_post(vendor, "/fhir/QuestionnaireResponse", obs())
    _refused(
        app, response, 400, "resource-type-mismatch", "QuestionnaireResponse", "/fhir/QuestionnaireResponse"
    )


def test_scope_is_per_resource_type(app: Flask, vendor: Vendor) -> None:
    narrow = vendor.token_request(scope="system/Observation.c").json["access_token"]
    qr = {"resourceType": "QuestionnaireResponse", "status": "completed"}
    response = vendor.client.post(
        "/fhir/QuestionnaireResponse",
        data=json.dumps(qr),
        headers={"Authorization": f"Bearer {narrow}", "Content-Type": "application/fhir+json"},
    )
    assert response.status_code == 403
    assert json_of(response)["resourceType"] == "OperationOutcome"


def _entry(resource: dict[str, Any], full_url: str | None = None, method: str = "POST") -> dict[str, Any]:
    entry: dict[str, Any] = {
        "resource": resource,
        "request": {"method": method, "url": resource["resourceType"]},
    }
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def test_batch_answers_each_entry(app: Flask, vendor: Vendor) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            _entry(obs()),
            _entry(obs(subject={"reference": "Patient/9"}, identifier=[{"value": "obs-2"}])),
            _entry(obs(identifier=[{"value": "obs-3"}]), method="DELETE"),
            _entry(obs()),
        ],
    }
    response = fhir_post(vendor, "/fhir", bundle)
    assert response.status_code == 200, response.json
    assert_matches_spec(response, "POST", "/fhir")
    statuses = [e["response"]["status"] for e in response.json["entry"]]
    assert statuses == ["201 Created", "422", "422", "200 OK"]
    assert response.json["entry"][1]["response"]["outcome"]["issue"][0]["expression"] == [
        "Bundle.entry[1].resource.subject"
    ]
    assert response.json["entry"][2]["response"]["outcome"]["issue"][0]["expression"] == [
        "Bundle.entry[2].request.method"
    ]
    assert stored(app)[1:] == (1, 1)


def test_transaction_is_all_or_nothing_and_keeps_references(app: Flask, vendor: Vendor) -> None:
    qr = {
        "resourceType": "QuestionnaireResponse",
        "identifier": {"system": "https://acme.example/qr", "value": "qr-1"},
        "status": "completed",
        "subject": {"identifier": {"system": SYSTEM, "value": "user-1"}},
        "authored": "2026-11-20T09:00:00Z",
        "item": [{"linkId": "mood", "answer": [{"valueInteger": 6}]}],
    }
    score = obs(
        identifier=[{"value": "score-1"}],
        derivedFrom=[{"reference": "urn:uuid:7f1c3f8e-1111-4c1b-9a55-000000000001"}],
    )
    bad = obs(identifier=[{"value": "bad"}], status="bogus")
    tx: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [_entry(qr, "urn:uuid:7f1c3f8e-1111-4c1b-9a55-000000000001"), _entry(score), _entry(bad)],
    }
    refused = fhir_post(vendor, "/fhir", tx)
    _refused(app, refused, 422, "invalid-resource", "Bundle.entry[2].resource.status", "/fhir")
    tx["entry"].pop()
    response = fhir_post(vendor, "/fhir", tx)
    assert response.status_code == 200, response.json
    assert [e["response"]["status"] for e in response.json["entry"]] == ["201 Created", "201 Created"]
    with services.from_app(app).db.sessions() as session:
        items = (
            session.execute(
                select(OutboxItem).where(OutboxItem.record_id.is_not(None)).order_by(OutboxItem.id)
            )
            .scalars()
            .all()
        )
    qr_item, obs_item = items
    assert qr_item.group_key == obs_item.group_key  # delivered in one request
    written_score = orjson.loads(obs_item.body)
    from mappings.identity import full_url

    assert written_score["derivedFrom"] == [
        {"reference": full_url(qr_item.ident_system, qr_item.ident_value)}
    ]


def test_capability_statement_says_exactly_what_is_accepted(client: Any) -> None:
    from mappings.fhir_models import validate_resource

    response = client.get("/fhir/metadata")
    assert response.status_code == 200
    assert_matches_spec(response, "GET", "/fhir/metadata")
    validate_resource(response.json)
    (rest,) = response.json["rest"]
    accepted = {r["type"]: [i["code"] for i in r["interaction"]] for r in rest["resource"]}
    assert accepted == {
        "Observation": ["create"],
        "QuestionnaireResponse": ["create"],
        "Questionnaire": ["search-type"],
    }
    assert [i["code"] for i in rest["interaction"]] == ["batch", "transaction"]


def test_questionnaire_catalogue_and_url_filter(client: Any) -> None:
    response = client.get("/fhir/Questionnaire")
    assert response.status_code == 200
    assert_matches_spec(response, "GET", "/fhir/Questionnaire")
    urls = [e["resource"]["url"] for e in response.json["entry"]]
    assert len(urls) >= 5 and response.json["total"] == len(urls)
    one = client.get("/fhir/Questionnaire", query_string={"url": urls[0]}).json
    assert [e["resource"]["url"] for e in one["entry"]] == [urls[0]]
    assert client.get("/fhir/Questionnaire", query_string={"url": "https://nope.example"}).json["total"] == 0
