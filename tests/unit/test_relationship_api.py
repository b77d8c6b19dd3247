"""The vendor's side of goals, tasks and messages: cursor paging, scopes, validation, and isolation
between vendors and from ended enrollments (status and nothing stored)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from flask import Flask
from sqlalchemy import func, select

from fhir_bridge import enrollment, services
from fhir_bridge.relationship import goals, messages, tasks
from fhir_bridge.storage.models import Message, OutboxItem
from tests.conftest import AppFactory
from tests.support.openapi import assert_matches_spec
from tests.support.vendor import Vendor, add_tenant, register


@pytest.fixture
def app(make_app: AppFactory) -> Flask:
    app = make_app()
    add_tenant(services.from_app(app).db)
    return app


def enrol(app: Flask, vendor: Vendor, patient: str, user: str) -> str:
    svc = services.from_app(app)
    code = enrollment.create(
        svc.db, secret=svc.secret_key, tenant_id="general", patient_id=patient,
        vendor_client_id=vendor.client_id, created_by="dr", ttl_seconds=600,
    ).code  # fmt: skip
    claimed = vendor.claim(code, user)
    assert claimed.status_code == 201
    return str(claimed.json["id"])


def stored(app: Flask) -> tuple[int, int]:
    with services.from_app(app).db.sessions() as session:
        return (
            int(session.scalar(select(func.count()).select_from(Message)) or 0),
            int(session.scalar(select(func.count()).select_from(OutboxItem)) or 0),
        )


def test_pages_follow_the_cursor_and_polling_returns_only_changes(app: Flask) -> None:
    vendor = register(app, "acme-mood")
    enrol(app, vendor, "pat-1", "user-1")
    db = services.from_app(app).db
    with db.transaction() as session:
        made = [
            goals.create(session, tenant_id="general", patient_id="pat-1", actor="dr", expressed_by=None,
                         description=f"goal {n}", target=None)
            for n in range(3)
        ]  # fmt: skip
        first_id = str(made[0].id)
    seen, after = [], None
    while True:
        page = vendor.get("/api/v1/goals?limit=1" + (f"&after={after}" if after else ""))
        assert page.status_code == 200
        assert_matches_spec(page, "GET", "/api/v1/goals")
        seen += [g["description"] for g in page.json["items"]]
        after = page.json["next"]
        if not page.json["has_more"]:
            break
    assert sorted(seen) == ["goal 0", "goal 1", "goal 2"]
    last = vendor.get("/api/v1/goals?limit=3").json
    assert last["has_more"] is False
    assert vendor.get(f"/api/v1/goals?after={after}").json == {"items": [], "next": after, "has_more": False}
    cursor = vendor.get("/api/v1/goals?limit=2").json["next"]
    with db.transaction() as session:
        goals.update(session, tenant_id="general", patient_id="pat-1", goal_id=first_id, actor="dr",
                     changes={"status": "completed"})  # fmt: skip
    changed = vendor.get(f"/api/v1/goals?after={cursor}").json["items"]
    assert [g["description"] for g in changed] == ["goal 2", "goal 0"], "an edited goal comes again"


@pytest.mark.parametrize("query", ["after=not-a-cursor", "after=WyJ4IiwgInkiXQ", "limit=0", "limit=501",
                                   "limit=ten", "app_user_id=%E2%80%8Buser"])  # fmt: skip
def test_bad_parameters_are_400(app: Flask, query: str) -> None:
    vendor = register(app, "acme-mood")
    response = vendor.get(f"/api/v1/tasks?{query}")
    assert response.status_code == 400, response.json
    assert_matches_spec(response, "GET", "/api/v1/tasks")


def test_scopes_are_needed(app: Flask) -> None:
    vendor = register(app, "acme-mood")
    token = vendor.token_request(scope="enrollments").json["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert vendor.client.get("/api/v1/messages", headers=headers).status_code == 403
    posted = vendor.client.post("/api/v1/messages", json={"app_user_id": "u", "text": "x"}, headers=headers)
    assert posted.status_code == 403
    assert vendor.client.get("/api/v1/goals").status_code == 401
    assert stored(app)[0] == 0


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"app_user_id": "user-1", "text": "hi", "extra": 1}, 422),
        ({"app_user_id": "user-1", "text": "x" * 2001}, 422),
        ({"app_user_id": "user-1", "text": ""}, 422),
        ({"app_user_id": "user-1"}, 422),
        ({"app_user_id": "user 1", "text": "hi"}, 422),
        ({"app_user_id": "user-1", "text": "hi", "client_message_id": "a b"}, 422),
        ({"app_user_id": "user-1", "text": "hi", "in_response_to": "not-a-message"}, 404),
        ({"app_user_id": "nobody", "text": "hi"}, 404),
    ],
)
def test_bad_messages_are_refused_and_nothing_is_stored(
    app: Flask, body: dict[str, object], status: int
) -> None:
    vendor = register(app, "acme-mood")
    enrol(app, vendor, "pat-1", "user-1")
    before = stored(app)
    response = vendor.post("/api/v1/messages", json=body)
    assert response.status_code == status, response.json
    assert_matches_spec(response, "POST", "/api/v1/messages")
    assert stored(app) == before


def test_a_reply_to_another_patients_message_is_404(app: Flask) -> None:
    vendor = register(app, "acme-mood")
    enrol(app, vendor, "pat-1", "user-1")
    with services.from_app(app).db.transaction() as session:
        theirs = messages.send_to_patient(session, tenant_id="general", patient_id="pat-2", actor="dr",
                                          sender=None, text="for pat-2")  # fmt: skip
        other_id = str(theirs.id)
    before = stored(app)
    response = vendor.post(
        "/api/v1/messages", json={"app_user_id": "user-1", "text": "hi", "in_response_to": other_id}
    )
    assert response.status_code == 404
    assert stored(app) == before


def test_vendors_sharing_a_patient_see_the_care_team_but_not_each_others_messages(app: Flask) -> None:
    a, b = register(app, "app-a"), register(app, "app-b")
    enrol(app, a, "pat-1", "ua")
    ended = enrol(app, b, "pat-1", "ub")
    with services.from_app(app).db.transaction() as session:
        messages.send_to_patient(session, tenant_id="general", patient_id="pat-1", actor="dr", sender=None,
                                 text="to the patient")  # fmt: skip
        tasks.assign(session, tenant_id="general", patient_id="pat-1", actor="dr", kind="module",
                     measure=None, title="Breathing module", due=None)  # fmt: skip
    assert a.post("/api/v1/messages", json={"app_user_id": "ua", "text": "from app a"}).status_code == 201
    assert [m["text"] for m in a.get("/api/v1/messages").json["items"]] == ["to the patient", "from app a"]
    assert [m["text"] for m in b.get("/api/v1/messages").json["items"]] == ["to the patient"]
    assert [t["app_user_id"] for t in b.get("/api/v1/tasks").json["items"]] == ["ub"]
    # b's enrollment ends: nothing is readable or postable for ub any more.
    assert b.delete(f"/api/v1/enrollments/{ended}").status_code == 200
    assert b.get("/api/v1/tasks").json["items"] == []
    assert b.get("/api/v1/messages?app_user_id=ub").status_code == 404
    before = stored(app)
    assert b.post("/api/v1/messages", json={"app_user_id": "ub", "text": "late"}).status_code == 404
    assert stored(app) == before


TODAY = datetime.now(UTC).date()
STEPS_RECORD = {"date": TODAY.isoformat(), "steps": 7200}
APP_USERS = "https://fhir-bridge.org/fhir/sid/app-user/acme-mood"


def test_data_completes_only_its_patients_matching_tasks_and_moves_their_goals(app: Flask) -> None:
    vendor = register(app, "acme-mood")
    enrol(app, vendor, "pat-1", "user-1")
    enrol(app, vendor, "pat-2", "user-2")
    db = services.from_app(app).db
    with db.transaction() as session:
        for patient in ("pat-1", "pat-2"):
            tasks.assign(session, tenant_id="general", patient_id=patient, actor="dr", kind="check-in",
                         measure="steps", title=None, due=None)  # fmt: skip
            tasks.assign(session, tenant_id="general", patient_id=patient, actor="dr", kind="questionnaire",
                         measure="phq9", title=None, due=None)  # fmt: skip
            target = goals.check_target("steps", ">=", 6000, None)
            goals.create(session, tenant_id="general", patient_id=patient, actor="dr", expressed_by=None,
                         description="walk", target=target)  # fmt: skip
    pushed = vendor.post(
        "/api/v1/records",
        json={
            "records": [
                {"record_id": "s-1", "app_user_id": "user-1", "measure": "steps-daily", "data": STEPS_RECORD}
            ]
        },
    )
    assert pushed.json["results"][0]["status"] == "accepted", pushed.json
    states = {
        (t["app_user_id"], t["measure"]): t["status"] for t in vendor.get("/api/v1/tasks").json["items"]
    }
    assert states == {
        ("user-1", "steps"): "completed",
        ("user-1", "phq9"): "requested",
        ("user-2", "steps"): "requested",
        ("user-2", "phq9"): "requested",
    }
    page = vendor.get("/api/v1/goals?app_user_id=user-1").json
    assert page["items"][0]["progress"]["latest"] == 7200
    later = vendor.post(
        "/api/v1/records",
        json={"records": [{"record_id": "s-2", "app_user_id": "user-1", "measure": "steps-daily",
                           "data": {"date": TODAY.isoformat(), "steps": 4000}}]},
    )  # fmt: skip
    assert later.json["results"][0]["status"] == "accepted"
    (changed,) = vendor.get(f"/api/v1/goals?app_user_id=user-1&after={page['next']}").json["items"]
    assert changed["progress"]["latest"] == 4000 and changed["progress"]["met"] is False, (
        "polling sees progress"
    )
    progress = {g["app_user_id"]: g["progress"] for g in vendor.get("/api/v1/goals").json["items"]}
    assert progress["user-1"]["latest"] == 4000 and progress["user-1"]["met"] is False
    assert progress["user-2"] == {"latest": None, "at": None, "met": False}


def test_data_from_before_the_assignment_does_not_complete_a_task(app: Flask) -> None:
    """An app sending its history (last week's steps, a late sync) has not done what was just asked."""
    vendor = register(app, "acme-mood")
    enrol(app, vendor, "pat-1", "user-1")
    with services.from_app(app).db.transaction() as session:
        tasks.assign(session, tenant_id="general", patient_id="pat-1", actor="dr", kind="check-in",
                     measure="steps", title=None, due=None)  # fmt: skip
    week_ago = (TODAY - timedelta(days=7)).isoformat()
    old = {"record_id": "old-1", "app_user_id": "user-1", "measure": "steps-daily",
           "data": {"date": week_ago, "steps": 5000}}  # fmt: skip
    assert vendor.post("/api/v1/records", json={"records": [old]}).json["results"][0]["status"] == "accepted"
    (task,) = vendor.get("/api/v1/tasks").json["items"]
    assert task["status"] == "requested"
    new = {"record_id": "new-1", "app_user_id": "user-1", "measure": "steps-daily", "data": STEPS_RECORD}
    assert vendor.post("/api/v1/records", json={"records": [new]}).json["results"][0]["status"] == "accepted"
    (task,) = vendor.get("/api/v1/tasks").json["items"]
    assert task["status"] == "completed"


def test_a_fhir_pushed_observation_completes_a_check_in_too(app: Flask) -> None:
    import json

    vendor = register(app, "acme-mood")
    enrol(app, vendor, "pat-1", "user-1")
    with services.from_app(app).db.transaction() as session:
        tasks.assign(session, tenant_id="general", patient_id="pat-1", actor="dr", kind="check-in",
                     measure="steps", title=None, due=None)  # fmt: skip
    observation = {
        "resourceType": "Observation",
        "identifier": [{"system": "https://acme.example/records", "value": "obs-1"}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "41950-7"}]},
        "subject": {"identifier": {"system": APP_USERS, "value": "user-1"}},
        "effectiveDateTime": TODAY.isoformat(),
        "valueQuantity": {"value": 8042, "unit": "/d", "system": "http://unitsofmeasure.org", "code": "/d"},
    }  # fmt: skip
    response = vendor.client.post(
        "/fhir/Observation",
        data=json.dumps(observation),
        headers=vendor.headers(**{"Content-Type": "application/fhir+json"}),
    )
    assert response.status_code == 201, response.json
    (task,) = vendor.get("/api/v1/tasks").json["items"]
    assert task["status"] == "completed" and task["title"] == "Check in: steps per day"


def test_the_app_completes_a_module_task_once_and_never_anothers(app: Flask) -> None:
    vendor, other = register(app, "acme-mood"), register(app, "other-app")
    enrol(app, vendor, "pat-1", "user-1")
    enrol(app, other, "pat-2", "user-9")
    with services.from_app(app).db.transaction() as session:
        module = tasks.assign(session, tenant_id="general", patient_id="pat-1", actor="dr", kind="module",
                              measure=None, title="Sleep hygiene module", due=None)  # fmt: skip
        dropped = tasks.assign(session, tenant_id="general", patient_id="pat-1", actor="dr", kind="module",
                               measure=None, title="Old module", due=None)  # fmt: skip
        tasks.cancel(session, tenant_id="general", patient_id="pat-1", task_id=str(dropped.id), actor="dr")
        module_id, dropped_id = str(module.id), str(dropped.id)
    url = f"/api/v1/tasks/{module_id}/complete"
    before = stored(app)
    assert other.post(url, json={"app_user_id": "user-9"}).status_code == 404, "another patient's task"
    assert other.post(url, json={"app_user_id": "user-1"}).status_code == 404, "another vendor's user"
    assert stored(app) == before
    done = vendor.post(url, json={"app_user_id": "user-1"})
    assert done.status_code == 200 and done.json["status"] == "completed", done.json
    assert_matches_spec(done, "POST", "/api/v1/tasks/{task_id}/complete")
    again = vendor.post(url, json={"app_user_id": "user-1"})
    assert again.json["completed_at"] == done.json["completed_at"]
    refused = vendor.post(f"/api/v1/tasks/{dropped_id}/complete", json={"app_user_id": "user-1"})
    assert refused.status_code == 409 and refused.json["error"] == "task-not-open"
    assert vendor.post(url, json={"app_user_id": "user-1", "done": True}).status_code == 422
