"""Issue 10, done when: in headless Chromium the clinician sets a goal, assigns a PHQ-9 task and sends a
message; the vendor (a client of the real API) fetches them and receives the signed webhook, submits
the PHQ-9 and a reply; the dashboard shows the task done, the goal's progress and the reply; and the
third-party FHIR server (sekmet) holds the Goal, Task, Communications and Consent with the right
subject and status. The launch is seeded, as in test_dashboard_browser.py (the OAuth launch itself is
proven in test_smart_launch_e2e.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from fhir_bridge import enrollment, services
from fhir_bridge.delivery import Worker
from fhir_bridge.fhir_client import FhirClient
from fhir_bridge.relationship import webhooks
from fhir_bridge.relationship.identity import CONSENT_SYSTEM, GOAL_SYSTEM, MESSAGE_SYSTEM, TASK_SYSTEM
from fhir_bridge.storage.models import Enrollment, OutboxItem, Tenant
from tests.conftest import AppFactory
from tests.support.browser import axe_violations, chromium_context, require_chromium, screenshot
from tests.support.procs import free_port
from tests.support.sekmet import SekmetServer
from tests.support.smart_seed import ThreadedServer, put_patient, seed_launch
from tests.support.vendor import phq9_record, register
from tests.support.webhook_receiver import Receiver, verify_webhook

pytestmark = [pytest.mark.browser, pytest.mark.ehr]

# sekmet ignores Goal and QuestionnaireResponse search filters (docs/ehr-vendors.md): PUT by identifier.
QUIRKS = {"no_conditional_create": ["QuestionnaireResponse", "Goal"]}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([]).start()
    yield r
    r.stop()


def _drain(worker: Worker, tenant: str) -> None:
    from sqlalchemy import func, select

    deadline = time.monotonic() + 60
    while True:
        with worker.db.sessions() as session:
            left = session.scalar(
                select(func.count())
                .select_from(OutboxItem)
                .where(OutboxItem.tenant_id == tenant, OutboxItem.status == "pending")
            )
        handled = worker.run_once()
        if not left and not handled:
            return
        assert time.monotonic() < deadline, "outbox not drained"
        if not handled:
            time.sleep(0.05)


def _one(reader: FhirClient, resource_type: str, system: str, patient: str) -> dict[str, Any]:
    """The resource of ours for this patient (searched by type; sekmet ignores some filters)."""
    found = reader.search(resource_type, [("_count", "1000")], max_pages=100).resources
    mine = [
        r
        for r in found
        if any(i.get("system") == system for i in r.get("identifier") or [])
        and f"Patient/{patient}" in str(r.get("subject") or r.get("for") or r.get("patient"))
    ]
    assert len(mine) == 1, mine
    return mine[0]


def test_clinician_and_app_close_the_loop(
    make_app: AppFactory, sekmet: SekmetServer, receiver: Receiver
) -> None:
    require_chromium()
    port = free_port()
    app: Flask = make_app(
        PUBLIC_URL=f"http://127.0.0.1:{port}", ALLOW_INSECURE_LOOPBACK=True, WORKER_RETRY_BASE_SECONDS=0.05
    )
    svc = services.from_app(app)
    tenant, patient = "sek-rel", f"rel-{uuid.uuid4().hex[:12]}"
    put_patient(sekmet.base_url, patient, given="Sam", family="Moreau")
    with svc.db.transaction() as session:
        session.add(
            Tenant(id=tenant, name="Sekmet EHR", fhir_base_url=sekmet.base_url, smart_client_id="c",
                   quirks=QUIRKS, crisis_line="Crisis line 0800 555 0100")
        )  # fmt: skip
    vendor = register(app, "mood-app")
    webhooks.set_url(
        svc.db, client_id="mood-app", url=receiver.url, allow_insecure_loopback=True, actor="test"
    )
    code = enrollment.create(
        svc.db, secret=svc.secret_key, tenant_id=tenant, patient_id=patient,
        vendor_client_id="mood-app", created_by="Practitioner/bench", ttl_seconds=600,
    ).code  # fmt: skip
    assert vendor.claim(code, "sam-1").status_code == 201
    worker = Worker(svc)

    launch_id, handle = seed_launch(app, tenant_id=tenant, patient_id=patient, access_token="unused")
    with ThreadedServer(app, port) as server, chromium_context() as context:
        context.add_cookies([{"name": "fhir-bridge-dev", "value": handle, "url": server.url}])
        page = context.new_page()
        page.goto(f"{server.url}/app/{launch_id}/")
        page.wait_for_selector("body[data-relationship=ready]", timeout=60_000)
        assert "not for emergencies" in page.inner_text("#crisis-notice")
        assert "0800 555 0100" in page.inner_text("#crisis-notice")

        # The clinician sets a goal, assigns the PHQ-9 and writes to the patient.
        page.click(".goals summary")
        page.fill("#goal-text", "Feel like myself again: PHQ-9 below 10")
        page.select_option("#goal-measure", "phq9")
        page.select_option("#goal-comparator", "<")
        page.fill("#goal-value", "10")
        page.fill("#goal-due", "2027-03-31")
        page.click("#goal-form button[type=submit]")
        page.locator("#goals li[data-goal]").wait_for(timeout=10_000)
        # ... and edits its words and its target in place (below 10 becomes below 8).
        page.click("#goals .goal-edit summary")
        assert page.input_value("#goals .goal-edit select[name=measure]") == "phq9", (
            "the edit starts from the goal"
        )
        assert page.input_value("#goals .goal-edit input[name=due_date]") == "2027-03-31"
        page.fill(
            "#goals .goal-edit input[name=description]", "Feel like myself again: PHQ-9 below 8 by March"
        )
        page.fill("#goals .goal-edit input[name=value]", "8")
        page.click("#goals .goal-edit button[type=submit]")
        page.locator("#goals .goal-text").filter(has_text="by March").wait_for(timeout=10_000)
        assert "PHQ-9 total score below 8" in page.inner_text("#goals li[data-goal]")
        page.click(".tasks summary")
        page.select_option("#task-kind", "questionnaire:phq9")
        page.fill("#task-due", "2026-12-20")
        page.click("#task-form button[type=submit]")
        page.locator("#tasks li[data-status=requested]").wait_for(timeout=10_000)
        page.fill("#message-text", "How did the first week go?")
        page.click("#message-form button[type=submit]")
        page.locator("#thread li.to-patient").wait_for(timeout=10_000)
        violations = axe_violations(page)
        assert violations == [], violations

        # The vendor fetches them through the API and gets the signed webhooks.
        goals = vendor.get("/api/v1/goals?app_user_id=sam-1").json["items"]
        tasks = vendor.get("/api/v1/tasks?app_user_id=sam-1").json["items"]
        thread = vendor.get("/api/v1/messages?app_user_id=sam-1").json
        assert [(g["target"]["measure"], g["target"]["value"]) for g in goals] == [("phq9", 8)]
        assert [(t["measure"], t["status"]) for t in tasks] == [("phq9", "requested")]
        assert [m["text"] for m in thread["items"]] == ["How did the first week go?"]
        assert "0800 555 0100" in thread["notice"]
        _drain(worker, tenant)
        kinds = sorted(verify_webhook(app, "mood-app", body)["event"] for _, body in receiver.received)
        assert kinds == ["goal.changed", "goal.changed", "message.changed", "task.changed"]  # set, edited

        # The app submits the PHQ-9 (total 6) and a reply.
        pushed = vendor.post(
            "/api/v1/records",
            json={"records": [phq9_record("phq-e2e", "sam-1")]},
        )
        assert pushed.json["results"][0]["status"] == "accepted", pushed.json
        reply = vendor.post(
            "/api/v1/messages",
            json={
                "app_user_id": "sam-1",
                "text": "Better than I expected!",
                "in_response_to": thread["items"][0]["id"],
            },
        )
        assert reply.status_code == 201, reply.json

        # The dashboard shows the task done, the goal's progress and the reply, unread.
        page.reload()
        page.wait_for_selector("body[data-relationship=ready]", timeout=60_000)
        assert "Done" in page.inner_text("#tasks li[data-status=completed] .task-status")
        progress = page.inner_text("#goals .progress")
        assert "Latest 6" in progress and "target met" in progress
        assert page.inner_text("#thread li.to-clinician .message-text") == "Better than I expected!"
        assert page.inner_text("#unread") == "1 unread"
        page.focus("#message-text")  # the clinician turns to the thread: it counts as read
        page.locator("#unread").wait_for(state="hidden", timeout=10_000)
        timeline = page.inner_text("#timeline")
        for label in (
            "Goal set",
            "Task assigned",
            "Message sent to the patient",
            "Task completed",
            "Message from the patient",
        ):
            assert label in timeline, timeline
        screenshot(page, "dashboard-relationship.png")

    # The EHR holds what was agreed, for the right patient, in the right state.
    _drain(worker, tenant)
    reader = FhirClient(sekmet.base_url)
    goal = _one(reader, "Goal", GOAL_SYSTEM, patient)
    assert goal["lifecycleStatus"] == "active" and goal["subject"] == {"reference": f"Patient/{patient}"}
    assert goal["target"][0]["detailQuantity"]["value"] == 8, "the edited target"
    assert goal["description"]["text"] == "Feel like myself again: PHQ-9 below 8 by March", "the edit, once"
    task = _one(reader, "Task", TASK_SYSTEM, patient)
    assert task["status"] == "completed" and task["for"] == {"reference": f"Patient/{patient}"}
    assert task["focus"]["reference"] == "https://fhir-bridge.org/fhir/Questionnaire/phq9"
    consent = _one(reader, "Consent", CONSENT_SYSTEM, patient)
    assert consent["status"] == "active" and consent["patient"] == {"reference": f"Patient/{patient}"}
    sent = reader.search("Communication", [("subject", f"Patient/{patient}")]).resources
    by_text = {c["payload"][0]["contentString"]: c for c in sent}
    assert set(by_text) == {"How did the first week go?", "Better than I expected!"}
    assert by_text["How did the first week go?"]["sender"] == {"reference": "Practitioner/bench"}
    assert by_text["Better than I expected!"]["sender"] == {"reference": f"Patient/{patient}"}
    assert all(c["status"] == "completed" and c["identifier"][0]["system"] == MESSAGE_SYSTEM for c in sent)

    # Ending the enrollment makes the Consent inactive in the EHR.
    with svc.db.sessions() as session:
        from sqlalchemy import select

        enrollment_id = session.scalar(select(Enrollment.id).where(Enrollment.app_user_id == "sam-1"))
    assert vendor.delete(f"/api/v1/enrollments/{enrollment_id}").status_code == 200
    _drain(worker, tenant)
    assert _one(reader, "Consent", CONSENT_SYSTEM, patient)["status"] == "inactive"
