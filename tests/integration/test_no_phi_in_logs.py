"""No PHI in logs, on SQLite and PostgreSQL: a patient's name sent everywhere a vendor can put text never
reaches the service's log output, whether the record is accepted, rejected or refused outright."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from flask import Flask

from fhir_bridge import enrollment, services
from fhir_bridge.ops import logs
from tests.conftest import AppFactory
from tests.support.vendor import add_tenant, register

NAME = "Zebedee Quillfeather"


@pytest.fixture
def app(make_app: AppFactory, database_url: str) -> Iterator[Flask]:
    app = make_app(DATABASE_URL=database_url, LOG_LEVEL="DEBUG")
    add_tenant(services.from_app(app).db, "general")
    yield app
    services.from_app(app).db.dispose()


def test_a_recognisable_name_never_reaches_the_logs(app: Flask, capfd: pytest.CaptureFixture[str]) -> None:
    svc = services.from_app(app)
    vendor = register(app, "acme-mood")
    created = enrollment.create(
        svc.db,
        secret=svc.secret_key,
        tenant_id="general",
        patient_id="pat-1",
        vendor_client_id="acme-mood",
        created_by="Practitioner/1",
        ttl_seconds=600,
    )
    assert vendor.claim(created.code, "user-1").status_code == 201
    # The handler writes to the stderr of the moment it was made: make it now, under capfd.
    logs.configure_logging("DEBUG", "json")
    capfd.readouterr()  # only what follows counts

    records = [
        # Accepted, with the name in the vendor's own record id.
        {"record_id": NAME.replace(" ", "-") + "-r1", "app_user_id": "user-1", "measure": "steps-daily",
         "data": {"date": "2026-11-20", "steps": 4000}},
        # Rejected: an unknown field whose value is the name, and an out-of-range value.
        {"record_id": "r2", "app_user_id": "user-1", "measure": "steps-daily",
         "data": {"date": "2026-11-20", "steps": 4000, "patient_name": NAME}},
        {"record_id": "r3", "app_user_id": "user-1", "measure": "mood", "data": {"note": NAME}},
        # Not enrolled: the name as the app user id.
        {"record_id": "r4", "app_user_id": NAME, "measure": "steps-daily",
         "data": {"date": "2026-11-20", "steps": 1}},
    ]  # fmt: skip
    pushed = vendor.post("/api/v1/records?who=" + NAME.replace(" ", "%20"), json={"records": records},
                         headers={"Idempotency-Key": NAME.replace(" ", "-")})  # fmt: skip
    assert pushed.status_code == 200, pushed.json
    statuses = [r["status"] for r in pushed.json["results"]]
    assert statuses == ["accepted", "rejected", "rejected", "rejected"], pushed.json

    # FHIR push with the name in free text, and a refused resource type carrying it.
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": NAME},
        "subject": {"display": NAME},
        "note": [{"text": f"{NAME} felt low"}],
        "valueString": NAME,
    }
    vendor.post("/fhir/Observation", json=observation, headers={"Content-Type": "application/fhir+json"})
    vendor.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"text": NAME}]})
    # A bad pairing claim and a malformed body with the name in it.
    vendor.claim("WRONGCODE1", NAME)
    vendor.client.post("/api/v1/records", data=json.dumps({"records": NAME}), headers=vendor.headers(),
                       content_type="application/json")  # fmt: skip

    out, err = capfd.readouterr()
    logged = out + err
    assert logged, "expected log output (LOG_LEVEL=DEBUG)"
    for fragment in (NAME, "Zebedee", "Quillfeather"):
        assert fragment not in logged
