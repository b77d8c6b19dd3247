"""Rules end to end: each story's history is pushed through the real vendor API, the worker runs the
schedule rules and delivers to the third-party FHIR server; exactly the expected alerts fire, once each,
and are in the EHR as Flag/Task; replaying the pushes fires nothing new; acknowledging in the dashboard
(HTTP, a seeded launch) sets the Flag inactive and the Task completed in the EHR and audits who."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from fhir_bridge import scheduler, services
from fhir_bridge.delivery import Worker
from fhir_bridge.fhir_client import FhirClient
from fhir_bridge.rules import engine
from fhir_bridge.sandbox import synthetic
from fhir_bridge.storage.models import Alert, AuditEvent, Measurement, OutboxItem
from smart_app import web
from tests.conftest import AppFactory
from tests.integration.delivery.conftest import CLIENT_ID, drain
from tests.support.outbox_seed import add_tenant
from tests.support.sekmet import SekmetServer
from tests.support.smart_seed import seed_launch
from tests.support.vendor import Vendor, enroll, register

pytestmark = [pytest.mark.ehr]


def _push(vendor: Vendor, records: list[dict[str, Any]], *, chunk: int) -> list[str]:
    statuses: list[str] = []
    for start in range(0, len(records), chunk):
        response = vendor.post("/api/v1/records", json={"records": records[start : start + chunk]})
        assert response.status_code == 200, response.json
        statuses += [r["status"] for r in response.json["results"]]
    return statuses


def _ehr(reader: FhirClient, resource_type: str, patient: str) -> list[dict[str, Any]]:
    found = reader.search(resource_type, [("identifier", f"{engine.ALERT_SYSTEM}|"), ("_count", "100")])
    everything = found.resources or reader.search(resource_type, [("_count", "1000")]).resources
    return [
        r
        for r in everything
        if ((r.get("subject") or r.get("for") or {}).get("reference")) == f"Patient/{patient}"
        and any(i.get("system") == engine.ALERT_SYSTEM for i in r.get("identifier") or [])
    ]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_stories_fire_exactly_their_alerts_once_into_the_ehr_and_acknowledging_closes_them(
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
    tenant = f"rules-{database}"
    # sekmet refuses conditional create for these types (docs/ehr-vendors.md): they go by PUT.
    quirks = {"no_conditional_create": ["QuestionnaireResponse", "Goal"]}
    add_tenant(svc.db, tenant, smart_ehr.base_url, client_id=CLIENT_ID, quirks=quirks)
    vendor = register(app, f"mindful-{database}")
    expected = {story.key: story.expected_alerts for story in synthetic.stories()}
    run = uuid.uuid4().hex[:8]
    end = datetime.now(UTC)
    patients = {key: f"p-{key}-{run}" for key in expected}
    stories = {key: synthetic.generate(key, app_user_id=f"u-{key}-{run}", end=end) for key in expected}
    for key in expected:
        enroll(app, vendor, tenant, patients[key], f"u-{key}-{run}")
        # Different batch sizes: the firings must not depend on how the history arrives.
        statuses = _push(vendor, stories[key], chunk=40 if key in ("safety", "silent") else 500)
        assert set(statuses) == {"accepted"}

    worker = Worker(svc)
    assert scheduler.scheduled_rules(svc) == {"count": 1}  # the silent story: disengagement
    assert scheduler.scheduled_rules(svc) == {}  # not due again yet
    drain(worker, tenant)
    with svc.db.transaction() as session:
        dead = session.scalars(
            select(OutboxItem.resource_type).where(
                OutboxItem.tenant_id == tenant, OutboxItem.status == "dead"
            )
        ).all()
    assert dead == [], "every story resource reaches the EHR"

    with svc.db.transaction() as session:
        alerts = session.scalars(select(Alert).where(Alert.tenant_id == tenant)).all()
        ledger = session.scalar(
            select(func.count()).select_from(Measurement).where(Measurement.tenant_id == tenant)
        )
        queued = session.scalar(
            select(func.count()).select_from(OutboxItem).where(OutboxItem.tenant_id == tenant)
        )
    by_patient = {key: sorted(a.rule_id for a in alerts if a.patient_id == patients[key]) for key in expected}
    assert by_patient == {key: sorted(rules) for key, rules in expected.items()}
    no_response = next(a for a in alerts if a.rule_id == "no-response")
    assert re.fullmatch(
        r"PHQ-9 \d+ on \d{4}-\d\d-\d\d, after \d+ weeks: [-+]?\d+ % since baseline \d+ \(\d{4}-\d\d-\d\d\); "
        r"a response is a fall of 50 % or more\.",
        no_response.reason,
    ), no_response.reason
    assert ledger and ledger >= sum(len(s) for s in stories.values())

    # In the EHR: a Flag (safety) and a Task per alert, once each, urgent for safety.
    for key, rules in expected.items():
        tasks = _ehr(ehr_reader, "Task", patients[key])
        flags = _ehr(ehr_reader, "Flag", patients[key])
        assert len(tasks) == len(rules), key
        assert len(flags) == (1 if key == "safety" else 0), key
    safety_task = _ehr(ehr_reader, "Task", patients["safety"])[0]
    assert safety_task["priority"] == "urgent" and safety_task["status"] == "requested"
    safety_flag = _ehr(ehr_reader, "Flag", patients["safety"])[0]
    categories = {c["coding"][0]["code"] for c in safety_flag["category"]}
    assert categories == {"safety", "behavioral"} and safety_flag["status"] == "active"
    assert (
        _ehr(ehr_reader, "Task", patients["non-responder"])[0]["code"]["text"] == "Schedule follow-up visit"
    )
    assert _ehr(ehr_reader, "Task", patients["silent"])[0]["code"]["text"] == "Check in with patient"

    # Replaying every push: all duplicates, no new measurement, alert or outbox item.
    for key in expected:
        assert set(_push(vendor, stories[key], chunk=500)) == {"duplicate"}
    with svc.db.transaction() as session:
        assert engine.run_scheduled_rules(session, datetime.now(UTC)) == []
        assert session.scalar(
            select(func.count()).select_from(Alert).where(Alert.tenant_id == tenant)
        ) == len(alerts)
        assert (
            session.scalar(select(func.count()).select_from(OutboxItem).where(OutboxItem.tenant_id == tenant))
            == queued
        )

    # A clinician acknowledges the safety alert in the dashboard (a launch for that patient).
    safety_alert = next(a for a in alerts if a.rule_id == "safety-item9")
    launch_id, handle = seed_launch(
        app, tenant_id=tenant, patient_id=patients["safety"], access_token="unused"
    )
    browser = app.test_client()
    browser.set_cookie(web.DEV_COOKIE, handle, domain="127.0.0.1")
    acked = browser.post(
        f"/app/{launch_id}/api/alerts/{safety_alert.id}/acknowledge",
        json={},
        headers={web.CSRF_HEADER: web.csrf_token(svc.secret_key, launch_id)},
        base_url=svc.settings.public_url,
    )
    assert acked.status_code == 200, acked.get_data(as_text=True)
    with svc.db.transaction() as session:
        audits = session.scalars(select(AuditEvent).where(AuditEvent.action == "alert.acknowledge")).all()
        assert [(a.actor_id, a.target) for a in audits] == [
            ("Practitioner/bench", f"alert/{safety_alert.id}")
        ]
    drain(worker, tenant)
    flags = _ehr(ehr_reader, "Flag", patients["safety"])
    tasks = _ehr(ehr_reader, "Task", patients["safety"])
    assert [f["status"] for f in flags] == ["inactive"] and "end" in flags[0]["period"]
    assert [t["status"] for t in tasks] == ["completed"]
    svc.db.dispose()
