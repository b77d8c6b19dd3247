"""Prescribing the app from the dashboard: pairing code and QR code, claim, end; always audited."""

from __future__ import annotations

import base64
import re
from urllib.parse import unquote

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from fhir_bridge import enrollment, services
from fhir_bridge.storage.models import AuditEvent, Enrollment, VendorClient
from tests.support.fake_ehr import FakeEhr
from tests.support.http import json_of
from tests.unit.smart.conftest import PUBLIC, full_launch


def add_vendor(app: Flask, client_id: str = "acme-mood", name: str = "Acme Mood") -> None:
    with app.app_context(), services.current().db.transaction() as session:
        session.add(VendorClient(client_id=client_id, name=name, jwks={"keys": []}, scopes="enrollment"))


def csrf(browser: FlaskClient, launch_id: str) -> dict[str, str]:
    page = browser.get(f"/app/{launch_id}/", base_url=PUBLIC).get_data(as_text=True)
    match = re.search(r'"csrf": "([0-9a-f]+)"', page)
    assert match
    return {"X-CSRF-Token": match.group(1)}


def test_prescribe_shows_a_pairing_code_and_qr_and_follows_the_claim(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr
) -> None:
    add_vendor(smart)
    launch_id = full_launch(browser, ehr)
    api = f"/app/{launch_id}/api/enrollment"
    before = json_of(browser.get(api, base_url=PUBLIC))
    assert before == {"vendors": [{"id": "acme-mood", "name": "Acme Mood"}], "enrollments": []}

    assert browser.post(api, json={"vendor": "acme-mood"}, base_url=PUBLIC).status_code == 403  # CSRF
    created = browser.post(
        api, json={"vendor": "acme-mood"}, headers=csrf(browser, launch_id), base_url=PUBLIC
    )
    assert created.status_code == 201
    body = json_of(created)
    assert re.fullmatch(r"[A-Z2-9]{5}-[A-Z2-9]{5}", body["code"])
    assert body["qr"].startswith("data:image/svg+xml")
    svg = (
        unquote(body["qr"].split(",", 1)[1])
        if "base64" not in body["qr"]
        else base64.b64decode(body["qr"].split(",", 1)[1]).decode()
    )
    assert "<svg" in svg and "<script" not in svg
    assert [e["status"] for e in body["status"]["enrollments"]] == ["pending"]

    # The vendor's app claims the code (what the vendor API does).
    with smart.app_context():
        svc = services.current()
        with svc.db.transaction() as session:
            vendor = session.scalar(select(VendorClient).where(VendorClient.client_id == "acme-mood"))
            assert vendor is not None
            session.expunge(vendor)
        enrollment.claim(
            svc.db,
            secret=svc.secret_key,
            vendor=vendor,
            code=body["code"],
            app_user_id="user-42",
            max_attempts=10,
        )
    after = json_of(browser.get(api, base_url=PUBLIC))
    assert [e["status"] for e in after["enrollments"]] == ["active"]
    summary = json_of(browser.get(f"/app/{launch_id}/api/summary", base_url=PUBLIC))
    assert summary["enrollment"]["enrollments"][0]["status"] == "active"

    ended = browser.post(
        f"{api}/{body['id']}/end", json={}, headers=csrf(browser, launch_id), base_url=PUBLIC
    )
    assert ended.status_code == 200
    assert [e["status"] for e in json_of(ended)["enrollments"]] == ["ended"]
    with smart.app_context(), services.current().db.transaction() as session:
        actions = [
            (a.action, a.actor_id) for a in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
        ]
        row = session.scalar(select(Enrollment))
        assert row is not None and row.created_by == "Practitioner/dr1"
    assert ("smart.launch", "Practitioner/dr1") in actions
    assert ("enrollment.create", "Practitioner/dr1") in actions
    assert ("enrollment.end", "Practitioner/dr1") in actions


def test_enrollments_of_other_patients_cannot_be_seen_or_ended(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr
) -> None:
    add_vendor(smart)
    with smart.app_context():
        svc = services.current()
        other = enrollment.create(
            svc.db,
            secret=svc.secret_key,
            tenant_id="t1",
            patient_id="p2",
            vendor_client_id="acme-mood",
            created_by="someone",
            ttl_seconds=600,
        )
    launch_id = full_launch(browser, ehr)  # patient p1
    api = f"/app/{launch_id}/api/enrollment"
    assert json_of(browser.get(api, base_url=PUBLIC))["enrollments"] == []
    response = browser.post(
        f"{api}/{other.enrollment_id}/end", json={}, headers=csrf(browser, launch_id), base_url=PUBLIC
    )
    assert response.status_code == 404
    unknown = browser.post(api, json={"vendor": "nobody"}, headers=csrf(browser, launch_id), base_url=PUBLIC)
    assert unknown.status_code == 404
