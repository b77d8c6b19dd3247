"""The whole path: a vendor pushes through the API, the worker writes to the third-party FHIR server with
SMART Backend Services, the vendor reads back "delivered" with the EHR's ids, and the EHR holds exactly
what was accepted: the right codes, values, subject and identifier, and a Provenance naming the app."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest
from flask import Flask

from fhir_bridge import services
from fhir_bridge.delivery import Worker
from fhir_bridge.fhir_client import FhirClient
from mappings.identity import RECORD_IDENTIFIER_SYSTEM
from tests.conftest import AppFactory
from tests.integration.delivery.conftest import CLIENT_ID, drain
from tests.support.outbox_seed import add_tenant, in_ehr
from tests.support.sekmet import SekmetServer
from tests.support.vendor import enroll, register

pytestmark = [pytest.mark.ehr]
STEPS = "41950-7"

PHQ9 = {
    "authored": "2026-11-20T08:30:00Z",
    "answers": {
        "item1": 1, "item2": 2, "item3": "LA6571-9", "item4": 2, "item5": 0,
        "item6": 1, "item7": 3, "item8": 0, "item9": 0, "difficulty": "LA6573-5",
    },
}  # fmt: skip


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_pushed_records_are_in_the_ehr_once_and_the_vendor_sees_them_delivered(
    database: str,
    request: pytest.FixtureRequest,
    make_app: AppFactory,
    smart_ehr: SekmetServer,
    ehr_reader: FhirClient,
) -> None:
    overrides: dict[str, Any] = {"ALLOW_INSECURE_LOOPBACK": True}
    if database == "postgresql":
        overrides["DATABASE_URL"] = request.getfixturevalue("pg_server").create_database()
    app: Flask = make_app(**overrides)
    svc = services.from_app(app)
    tenant = f"ehr-{database}"
    quirks = {"no_conditional_create": ["QuestionnaireResponse"]}
    add_tenant(svc.db, tenant, smart_ehr.base_url, client_id=CLIENT_ID, quirks=quirks)
    patient = f"p{uuid.uuid4().hex[:12]}"
    vendor = register(app, f"acme-{database}")
    enroll(app, vendor, tenant, patient)

    records = [
        {"record_id": "phq-1", "app_user_id": "user-1", "measure": "phq9", "data": PHQ9},
        {"record_id": "steps-1", "app_user_id": "user-1", "measure": "steps-daily",
         "data": {"date": "2026-11-20", "steps": 8042}},
        {"record_id": "steps-2", "app_user_id": "user-1", "measure": "steps-daily",
         "data": {"date": "2026-11-21", "steps": 1234}},
    ]  # fmt: skip
    pushed = vendor.post("/api/v1/records", json={"records": records})
    assert pushed.status_code == 200, pushed.json
    assert [r["status"] for r in pushed.json["results"]] == ["accepted"] * 3
    ids = [r["id"] for r in pushed.json["results"]]
    assert vendor.get(f"/api/v1/records/{ids[0]}").json["status"] == "queued"

    worker = Worker(svc)
    drain(worker, tenant)
    again = vendor.post("/api/v1/records", json={"records": records})  # a vendor retrying: no-op
    assert [r["status"] for r in again.json["results"]] == ["duplicate"] * 3
    drain(worker, tenant)

    # The vendor's view: delivered, with where each resource lives in the EHR.
    statuses = [vendor.get(f"/api/v1/records/{record_id}").json for record_id in ids]
    assert [s["status"] for s in statuses] == ["delivered"] * 3
    located = {(r["resource_type"], r["ehr"]["id"]) for s in statuses for r in s["resources"]}
    assert len(located) == 5  # PHQ-9: QuestionnaireResponse, total score, item 9; two step counts

    # The EHR's view: each resource once, with codes, values and the patient as subject.
    held = in_ehr(ehr_reader, patient)
    assert len(held) == 5 and set(held.values()) == {1}
    observations = ehr_reader.search("Observation", [("subject", f"Patient/{patient}")]).resources
    by_code = Counter(o["code"]["coding"][0]["code"] for o in observations)
    assert by_code == {"44261-6": 1, "44260-8": 1, "41950-7": 2}
    total = next(o for o in observations if o["code"]["coding"][0]["code"] == "44261-6")
    assert total["valueQuantity"]["value"] == 12  # 1+2+3+2+0+1+3+0+0 (LA6571-9 scores 3)
    assert total["identifier"][0]["system"] == RECORD_IDENTIFIER_SYSTEM
    qr = ehr_reader.read_reference(total["derivedFrom"][0]["reference"])
    assert qr["subject"] == {"reference": f"Patient/{patient}"} and qr["status"] == "completed"
    steps = sorted(
        o["valueQuantity"]["value"] for o in observations if o["code"]["coding"][0]["code"] == "41950-7"
    )
    assert steps == [1234, 8042]
    for resource_type, ehr_id in located:
        provenances = ehr_reader.search("Provenance", [("target", f"{resource_type}/{ehr_id}")]).resources
        assert len(provenances) == 1
        device = ehr_reader.read_reference(provenances[0]["agent"][0]["who"]["reference"])
        assert device["deviceName"][0]["name"] == f"acme-{database} app"
    svc.db.dispose()
