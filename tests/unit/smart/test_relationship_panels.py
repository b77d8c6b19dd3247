"""The dashboard's goals, tasks and messages panels: what the clinician does, for the launched patient only,
queued as FHIR resources (validated R4) and audited on the patient's timeline."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from fhir_bridge import services
from fhir_bridge.relationship import messages
from fhir_bridge.storage.models import Message, OutboxItem, Tenant
from mappings.fhir_models import validate_resource
from tests.support.fake_ehr import FakeEhr
from tests.support.http import json_of
from tests.unit.smart.conftest import PUBLIC, full_launch
from tests.unit.smart.test_dashboard import csrf


def queued(app: Flask) -> dict[str, dict[str, Any]]:
    with app.app_context(), services.current().db.sessions() as session:
        return {i.resource_type: orjson.loads(i.body) for i in session.scalars(select(OutboxItem))}


def test_goal_task_message_are_queued_as_valid_fhir_and_shown_with_the_timeline(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr
) -> None:
    with smart.app_context(), services.current().db.transaction() as session:
        tenant = session.get(Tenant, "t1")
        assert tenant is not None
        tenant.crisis_line = "116 123"
    launch_id = full_launch(browser, ehr)
    headers = csrf(browser, launch_id)
    base = f"/app/{launch_id}/api"
    goal = browser.post(
        f"{base}/goals",
        json={"description": "PHQ-9 below 10 by March",
              "target": {"measure": "phq9", "comparator": "<", "value": 10, "due_date": "2027-03-31"}},
        headers=headers, base_url=PUBLIC,
    )  # fmt: skip
    assert goal.status_code == 201, goal.json
    task = browser.post(
        f"{base}/tasks", json={"kind": "questionnaire", "measure": "phq9", "due_date": "2026-12-20"},
        headers=headers, base_url=PUBLIC,
    )  # fmt: skip
    assert task.status_code == 201, task.json
    sent = browser.post(
        f"{base}/messages", json={"text": "How is it going?"}, headers=headers, base_url=PUBLIC
    )
    assert sent.status_code == 201

    resources = queued(smart)
    for resource in resources.values():
        validate_resource(resource)
    assert resources["Goal"]["subject"] == {"reference": "Patient/p1"}
    assert resources["Goal"]["target"][0]["detailQuantity"]["comparator"] == "<"
    assert resources["Goal"]["expressedBy"] == {"reference": "Patient/p1"}
    assert (
        resources["Task"]["for"] == {"reference": "Patient/p1"} and resources["Task"]["status"] == "requested"
    )
    assert resources["Task"]["focus"]["reference"].endswith("/Questionnaire/phq9")
    assert resources["Communication"]["sender"] == {"reference": "Practitioner/dr1"}
    assert resources["Communication"]["recipient"] == [{"reference": "Patient/p1"}]

    # The patient answers through their app: the dashboard counts it unread until it is opened.
    with smart.app_context(), services.current().db.transaction() as session:
        (mine,) = session.scalars(select(Message)).all()
        session.add(
            Message(tenant_id="t1", patient_id="p1", direction="to-clinician", sender="app:x", text="Fine!",
                    in_response_to=mine.id, ident_value="reply-1")
        )  # fmt: skip
    state = json_of(browser.get(f"{base}/relationship", base_url=PUBLIC))
    assert state["unread"] == 1 and [m["text"] for m in state["messages"]] == ["How is it going?", "Fine!"]
    assert "not for emergencies" in state["notice"] and "116 123" in state["notice"]
    assert state["goals"][0]["target"]["label"] == "PHQ-9 total score"
    assert state["tasks"][0]["status"] == "requested"
    actions = [e["action"] for e in state["timeline"]]
    assert actions[:3] == ["message.send", "task.assign", "goal.set"]
    assert all(e["who"] == "Practitioner/dr1" for e in state["timeline"][:3])
    assert browser.post(f"{base}/messages/read", json={}, headers=headers, base_url=PUBLIC).json == {
        "read": 1
    }
    assert json_of(browser.get(f"{base}/relationship", base_url=PUBLIC))["unread"] == 0

    # Edit the goal: the one queued Goal is rewritten (an upsert), not a second one.
    goal_id = json_of(goal)["id"]
    edited = browser.post(
        f"{base}/goals/{goal_id}", json={"status": "completed"}, headers=headers, base_url=PUBLIC
    )
    assert edited.status_code == 200 and json_of(edited)["status"] == "completed"
    assert queued(smart)["Goal"]["lifecycleStatus"] == "completed"


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("goals", {"description": ""}, "invalid-description"),
        ("goals", {"description": "x", "target": {"measure": "weight", "comparator": "<", "value": 1}},
         "invalid-goal-measure"),
        ("goals", {"description": "x", "target": {"measure": "phq9", "comparator": "!=", "value": 1}},
         "invalid-goal-comparator"),
        ("goals", {"description": "x", "target": {"measure": "phq9", "comparator": "<", "value": "ten"}},
         "invalid-goal-value"),
        ("goals", {"description": "x", "target": {"measure": "phq9", "comparator": "<", "value": 5,
                                                  "due_date": "next march"}}, "invalid-due-date"),
        ("tasks", {"kind": "homework"}, "invalid-task-kind"),
        ("tasks", {"kind": "questionnaire", "measure": "steps"}, "invalid-task-measure"),
        ("tasks", {"kind": "module", "title": ""}, "invalid-title"),
        ("messages", {"text": "x" * 2001}, "invalid-message"),
        ("messages", {"text": "  "}, "invalid-message"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_and_nothing_is_queued(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr, path: str, body: dict[str, Any], code: str
) -> None:
    launch_id = full_launch(browser, ehr)
    response = browser.post(
        f"/app/{launch_id}/api/{path}", json=body, headers=csrf(browser, launch_id), base_url=PUBLIC
    )
    assert response.status_code == 422 and json_of(response)["error"] == code, response.json
    assert queued(smart) == {}


def test_other_patients_items_and_missing_csrf_are_refused(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr
) -> None:
    from fhir_bridge.relationship import goals

    with smart.app_context(), services.current().db.transaction() as session:
        theirs = goals.create(session, tenant_id="t1", patient_id="p2", actor="dr2", expressed_by=None,
                              description="not yours", target=None)  # fmt: skip
        messages.send_to_patient(
            session, tenant_id="t1", patient_id="p2", actor="dr2", sender=None, text="p2"
        )
        other_goal = str(theirs.id)
    launch_id = full_launch(browser, ehr)
    base = f"/app/{launch_id}/api"
    state = json_of(browser.get(f"{base}/relationship", base_url=PUBLIC))
    assert state["goals"] == [] and state["messages"] == []
    headers = csrf(browser, launch_id)
    edit = browser.post(
        f"{base}/goals/{other_goal}", json={"status": "cancelled"}, headers=headers, base_url=PUBLIC
    )
    assert edit.status_code == 404
    no_csrf = browser.post(f"{base}/messages", json={"text": "hi"}, base_url=PUBLIC)
    assert no_csrf.status_code in (400, 403)
    assert len(queued(smart)) == 2  # p2's Goal and Communication only
