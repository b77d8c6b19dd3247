"""Rule alerts in the dashboard: shown with their reason, and acknowledging queues the EHR side (Flag
inactive, Task completed) through the outbox, with the clinician in the audit log."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from fhir_bridge import services
from fhir_bridge.rules import engine
from fhir_bridge.storage.models import Alert, AuditEvent, OutboxItem
from tests.support.fake_ehr import FakeEhr
from tests.support.http import json_of
from tests.unit.smart.conftest import PUBLIC, full_launch
from tests.unit.smart.test_dashboard import csrf


def _fire(app: Flask, rule_id: str, at: datetime) -> Alert:
    rule = engine.ruleset_for("t1").by_id(rule_id)
    assert rule is not None
    with app.app_context(), services.current().db.transaction() as session:
        alert = engine.fire(session, rule, "t1", "p1", None, at, f"{rule_id} reason", now=datetime.now(UTC))
        session.expunge(alert)
    return alert


def test_acknowledging_a_rule_alert_closes_its_flag_and_task_in_the_outbox_and_audits_who(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr
) -> None:
    safety = _fire(smart, "safety-item9", datetime(2026, 11, 30, 2, 30, tzinfo=UTC))
    silent = _fire(smart, "disengagement", datetime(2026, 12, 1, tzinfo=UTC))
    # The silent alert's Task already reached the EHR: acknowledging it needs an update.
    with smart.app_context(), services.current().db.transaction() as session:
        item = session.get(OutboxItem, silent.task_outbox_id)
        assert item is not None
        item.status, item.ehr_id = "delivered", "task-1"

    # The EHR holds the safety Flag (delivered) and a Flag of its own: only the latter is listed as an
    # EHR alert; the rule's own Flag is the bridge alert already shown.
    ehr.flags = [
        {"resourceType": "Flag", "id": "f-rule", "status": "active", "code": {"text": "Safety"},
         "identifier": [{"system": engine.ALERT_SYSTEM, "value": safety.ident_value}],
         "subject": {"reference": "Patient/p1"}},
        {"resourceType": "Flag", "id": "f-own", "status": "active", "code": {"text": "Fall risk"},
         "subject": {"reference": "Patient/p1"}},
    ]  # fmt: skip
    launch_id = full_launch(browser, ehr)
    alerts = json_of(browser.get(f"/app/{launch_id}/api/summary", base_url=PUBLIC))["alerts"]
    assert [a["id"] for a in alerts["ehr"]] == ["f-own"]
    shown = alerts["bridge"]
    assert {(a["rule"], a["priority"], a["reason"]) for a in shown} == {
        ("safety-item9", "urgent", "safety-item9 reason"),
        ("disengagement", "routine", "disengagement reason"),
    }
    headers = csrf(browser, launch_id)
    for alert in (safety, silent):
        url = f"/app/{launch_id}/api/alerts/{alert.id}/acknowledge"
        assert browser.post(url, json={}, headers=headers, base_url=PUBLIC).status_code == 200

    with smart.app_context(), services.current().db.transaction() as session:
        items = session.scalars(select(OutboxItem).order_by(OutboxItem.id)).all()
        rows = {(i.resource_type, i.ident_value): i for i in items}
        # Each Flag/Task keeps its one row, now holding the final state, to be sent again as a
        # conditional update by identifier (also the one already delivered to the EHR).
        for kind, alert, status in (("Flag", safety, "inactive"), ("Task", safety, "completed"),
                                    ("Task", silent, "completed")):  # fmt: skip
            assert alert.ident_value is not None
            row = rows[(kind, alert.ident_value)]
            body = orjson.loads(row.body)
            assert (row.method, row.status, body["status"]) == ("upsert", "pending", status), kind
            assert body["identifier"] == [{"system": engine.ALERT_SYSTEM, "value": alert.ident_value}]
        assert len(items) == 3
        audits = session.scalars(select(AuditEvent).where(AuditEvent.action == "alert.acknowledge")).all()
        assert {(a.actor_id, a.target) for a in audits} == {
            ("Practitioner/dr1", f"alert/{safety.id}"),
            ("Practitioner/dr1", f"alert/{silent.id}"),
        }


def test_the_dashboard_knows_the_rules_identifier_system() -> None:
    from smart_app.summary import RULE_ALERT_SYSTEM

    assert RULE_ALERT_SYSTEM == engine.ALERT_SYSTEM
