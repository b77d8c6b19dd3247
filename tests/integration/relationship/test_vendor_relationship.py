"""The loop closed, against the third-party FHIR server: consent on claim, the care team's goal, task
and message reach the vendor through the API, the app's PHQ-9 completes the task and moves the goal,
the app's reply reaches the EHR; ending the enrollment makes the Consent inactive and stops every flow.
Another vendor never reads or posts for these app users."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from fhir_bridge import services
from fhir_bridge.delivery import Worker
from fhir_bridge.fhir_client import FhirClient
from fhir_bridge.relationship import goals, messages, tasks
from fhir_bridge.relationship.identity import CONSENT_SYSTEM, GOAL_SYSTEM, MESSAGE_SYSTEM, TASK_SYSTEM
from fhir_bridge.storage.models import Message, OutboxItem, Tenant, WebhookEvent
from tests.conftest import AppFactory
from tests.integration.delivery.conftest import CLIENT_ID, drain
from tests.support.openapi import assert_matches_spec
from tests.support.outbox_seed import add_tenant
from tests.support.sekmet import SekmetServer
from tests.support.vendor import enroll, phq9_record, register

pytestmark = [pytest.mark.ehr]

# sekmet ignores Goal and QuestionnaireResponse search filters, so conditional writes on them cannot
# work there: those types go by PUT to the identifier value (docs/ehr-vendors.md).
QUIRKS = {"no_conditional_create": ["QuestionnaireResponse", "Goal"]}


def _by_identifier(reader: FhirClient, resource_type: str, system: str, value: str) -> list[dict[str, Any]]:
    found = reader.search(resource_type, [("identifier", f"{system}|{value}")]).resources
    return [r for r in found if any(i.get("value") == value for i in r.get("identifier") or [])]


def _outbox_count(app: Flask) -> int:
    with services.from_app(app).db.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(OutboxItem)) or 0)


def _message_count(app: Flask) -> int:
    with services.from_app(app).db.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Message)) or 0)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_goal_task_message_round_trip_consent_and_end(
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
    request.addfinalizer(svc.db.dispose)  # pooled PostgreSQL connections closed here, not by the GC
    tenant = f"rel-{database}-{uuid.uuid4().hex[:6]}"
    add_tenant(svc.db, tenant, smart_ehr.base_url, client_id=CLIENT_ID, quirks=QUIRKS)
    with svc.db.transaction() as session:
        row = session.get(Tenant, tenant)
        assert row is not None
        row.crisis_line = "0800 123 456"
    patient = f"p{uuid.uuid4().hex[:12]}"
    vendor = register(app, f"acme-{tenant}")
    other = register(app, f"other-{tenant}")
    enrollment_id = enroll(app, vendor, tenant, patient, "user-1")

    with svc.db.transaction() as session:
        goal = goals.create(
            session,
            tenant_id=tenant,
            patient_id=patient,
            actor="dr-test",
            expressed_by=f"Patient/{patient}",
            description="Feel better: PHQ-9 below 10 by March",
            target=goals.check_target("phq9", "<", 10, "2027-03-31"),
        )
        task = tasks.assign(
            session, tenant_id=tenant, patient_id=patient, actor="dr-test",
            kind="questionnaire", measure="phq9", title="Fill in the PHQ-9", due="2026-12-20",
        )  # fmt: skip
        note = messages.send_to_patient(
            session, tenant_id=tenant, patient_id=patient, actor="dr-test",
            sender="Practitioner/dr-test", text="How are the new sleep habits going?",
        )  # fmt: skip
        goal_id, task_id, note_id = str(goal.id), str(task.id), str(note.id)

    # The vendor fetches them for its app user, page by page with the opaque cursor.
    got_goals = vendor.get("/api/v1/goals?app_user_id=user-1")
    assert got_goals.status_code == 200, got_goals.json
    assert_matches_spec(got_goals, "GET", "/api/v1/goals")
    (g,) = got_goals.json["items"]
    assert g["id"] == goal_id and g["app_user_id"] == "user-1"
    assert g["target"]["measure"] == "phq9" and g["progress"] == {"latest": None, "at": None, "met": False}
    assert "patient" not in str(got_goals.json).lower()
    (t,) = vendor.get("/api/v1/tasks").json["items"]
    assert (t["id"], t["status"], t["measure"]) == (task_id, "requested", "phq9")
    page = vendor.get("/api/v1/messages?app_user_id=user-1&limit=1")
    assert_matches_spec(page, "GET", "/api/v1/messages")
    assert page.json["items"][0]["text"] == "How are the new sleep habits going?"
    assert "0800 123 456" in page.json["notice"] and "not for emergencies" in page.json["notice"]
    assert page.json["has_more"] is False

    # The app submits the PHQ-9 (total 6) and replies.
    pushed = vendor.post(
        "/api/v1/records",
        json={"records": [phq9_record("phq-1", "user-1")]},
    )
    assert pushed.json["results"][0]["status"] == "accepted", pushed.json
    reply = vendor.post(
        "/api/v1/messages",
        json={"app_user_id": "user-1", "text": "Better, thanks!", "in_response_to": note_id,
              "client_message_id": "m-1"},
    )  # fmt: skip
    assert reply.status_code == 201, reply.json
    assert_matches_spec(reply, "POST", "/api/v1/messages")
    again = vendor.post(
        "/api/v1/messages",
        json={"app_user_id": "user-1", "text": "Better, thanks!", "client_message_id": "m-1"},
    )
    assert again.status_code == 200 and again.json["id"] == reply.json["id"], (
        "the same client id is one message"
    )

    done = vendor.get("/api/v1/tasks")
    assert_matches_spec(done, "GET", "/api/v1/tasks")
    (t,) = done.json["items"]
    assert t["status"] == "completed"
    (g,) = vendor.get("/api/v1/goals").json["items"]
    assert g["progress"]["latest"] == 6 and g["progress"]["met"] is True

    # Another vendor: nothing of user-1, and its post for user-1 is refused with nothing stored.
    assert other.get("/api/v1/goals").json["items"] == []
    assert other.get("/api/v1/messages").json["items"] == []
    assert other.get("/api/v1/tasks?app_user_id=user-1").status_code == 404
    before = (_outbox_count(app), _message_count(app))
    refused = other.post("/api/v1/messages", json={"app_user_id": "user-1", "text": "hello"})
    assert_matches_spec(refused, "POST", "/api/v1/messages")
    assert refused.status_code == 404 and refused.json["error"] == "not-enrolled"
    assert (_outbox_count(app), _message_count(app)) == before

    drain(Worker(svc), tenant)
    (consent,) = _by_identifier(ehr_reader, "Consent", CONSENT_SYSTEM, _consent_ident(app, enrollment_id))
    assert consent["status"] == "active" and consent["patient"] == {"reference": f"Patient/{patient}"}
    assert consent["scope"]["coding"][0]["code"] == "patient-privacy"
    ehr_goal = ehr_reader.read("Goal", _ident(app, "Goal", GOAL_SYSTEM))
    assert ehr_goal["lifecycleStatus"] == "active" and ehr_goal["subject"] == {
        "reference": f"Patient/{patient}"
    }
    assert ehr_goal["target"][0]["detailQuantity"]["value"] == 10
    assert ehr_goal["target"][0]["measure"]["coding"][0]["code"] == "44261-6"
    (ehr_task,) = _by_identifier(ehr_reader, "Task", TASK_SYSTEM, _ident(app, "Task", TASK_SYSTEM))
    assert ehr_task["status"] == "completed" and ehr_task["for"] == {"reference": f"Patient/{patient}"}
    assert ehr_task["focus"]["reference"] == "https://fhir-bridge.org/fhir/Questionnaire/phq9"
    sent = ehr_reader.search("Communication", [("subject", f"Patient/{patient}")]).resources
    assert sorted(c["payload"][0]["contentString"] for c in sent) == [
        "Better, thanks!",
        "How are the new sleep habits going?",
    ]
    patient_msg = next(c for c in sent if c["payload"][0]["contentString"] == "Better, thanks!")
    assert patient_msg["sender"] == {"reference": f"Patient/{patient}"}
    assert patient_msg["inResponseTo"][0]["identifier"]["system"] == MESSAGE_SYSTEM

    # The vendor ends the enrollment: Consent inactive (the same resource), every flow stops.
    assert vendor.delete(f"/api/v1/enrollments/{enrollment_id}").status_code == 200
    drain(Worker(svc), tenant)
    (ended,) = _by_identifier(ehr_reader, "Consent", CONSENT_SYSTEM, _consent_ident(app, enrollment_id))
    assert ended["status"] == "inactive" and ended["id"] == consent["id"]
    assert "end" in ended["provision"]["period"]
    before = (_outbox_count(app), _message_count(app))
    assert vendor.get("/api/v1/goals?app_user_id=user-1").status_code == 404
    assert vendor.get("/api/v1/goals").json["items"] == []
    assert vendor.get("/api/v1/messages").json["items"] == []
    late = vendor.post("/api/v1/messages", json={"app_user_id": "user-1", "text": "still there?"})
    assert late.status_code == 404
    push = vendor.post(
        "/api/v1/records",
        json={"records": [phq9_record("phq-2", "user-1")]},
    )
    assert push.json["results"][0]["status"] == "rejected"
    assert (_outbox_count(app), _message_count(app)) == before
    with svc.db.transaction() as session:
        messages.send_to_patient(
            session, tenant_id=tenant, patient_id=patient, actor="dr-test", sender=None, text="Hello?"
        )
        assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 0


def _ident(app: Flask, resource_type: str, system: str) -> str:
    with services.from_app(app).db.sessions() as session:
        return str(
            session.scalar(
                select(OutboxItem.ident_value).where(
                    OutboxItem.resource_type == resource_type, OutboxItem.ident_system == system
                )
            )
        )


def _consent_ident(app: Flask, enrollment_id: str) -> str:
    from fhir_bridge.storage.models import Enrollment

    with services.from_app(app).db.sessions() as session:
        row = session.get(Enrollment, uuid.UUID(enrollment_id))
        assert row is not None and row.consent_identifier is not None
        return row.consent_identifier
