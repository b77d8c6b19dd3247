"""The dashboard's data and actions, with the EHR faked at the transport: what a clinician sees and does."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

import orjson
import pytest
import time_machine
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from auth import smart_launch as sl
from fhir_bridge import services
from fhir_bridge.storage.models import Alert, OutboxItem, SmartLaunch
from smart_app import summary
from tests.support.fake_ehr import BASE, FakeEhr, observation
from tests.support.http import json_of
from tests.unit.smart.conftest import PUBLIC, add_tenant, calls, full_launch

OURS = summary.OUR_CODES


def csrf(browser: FlaskClient, launch_id: str) -> dict[str, str]:
    page = browser.get(f"/app/{launch_id}/", base_url=PUBLIC).get_data(as_text=True)
    match = re.search(r'"csrf": "([0-9a-f]+)"', page)
    assert match
    return {"X-CSRF-Token": match.group(1)}


def test_summary_shows_trends_markers_and_engagement_for_the_launched_patient(
    browser: FlaskClient, ehr: FakeEhr
) -> None:
    ehr.observations = [
        observation("44261-6", 18, "2026-01-05T09:00:00-05:00"),
        observation("44261-6", 11, "2026-02-02T09:00:00-05:00"),
        observation("44261-6", 8, "2026-03-02T09:00:00-05:00"),  # <= 50 % of 18: response
        observation("44261-6", 4, "2026-04-06T09:00:00-05:00"),  # < 5: remission
        observation("70274-6", 12, "2026-01-05T09:05:00-05:00"),
        observation("dwai-total", 20, "2026-01-12T10:00:00Z", system=OURS),
        observation("41950-7", 6500, "2026-04-05"),
        observation("44261-6", 27, "2026-04-07T09:00:00Z", patient="someone-else"),  # F4
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
            "subject": {"reference": "Group/1"},
            "effectiveDateTime": "2026-04-08",
            "valueInteger": 27,
        },
    ]
    ehr.flags = [
        {
            "resourceType": "Flag",
            "id": "f1",
            "status": "active",
            "code": {"text": "Safety plan review"},
            "subject": {"reference": "Patient/p1"},
            "period": {"start": "2026-04-01"},
        },
        {
            "resourceType": "Flag",
            "id": "f2",
            "status": "active",
            "code": {"text": "Other patient's flag"},
            "subject": {"reference": "Patient/p9"},
        },
    ]
    ehr.tasks = [
        {
            "resourceType": "Task",
            "id": "t1",
            "status": "requested",
            "intent": "order",
            "priority": "urgent",
            "code": {"text": "Check in"},
            "for": {"reference": f"{BASE}/Patient/p1"},
            "authoredOn": "2026-04-02",
        },
        {
            "resourceType": "Task",
            "id": "t2",
            "status": "completed",
            "intent": "order",
            "code": {"text": "Done already"},
            "for": {"reference": "Patient/p1"},
        },
    ]
    launch_id = full_launch(browser, ehr)
    with time_machine.travel("2026-04-20T12:00:00Z", tick=False):
        response = browser.get(f"/app/{launch_id}/api/summary", base_url=PUBLIC)
    data = json_of(response)
    assert response.status_code == 200
    assert data["patient"]["name"] == "Alex Rivera"
    assert data["series"]["phq9"]["v"] == [18, 11, 8, 4]
    assert data["series"]["gad7"]["v"] == [12]
    assert data["series"]["dwai_total"]["v"] == [20]
    assert data["series"]["steps"]["v"] == [6500]
    markers = data["markers"]["phq9"]
    assert markers["baseline"]["v"] == 18
    assert markers["response"]["v"] == 8
    assert markers["remission"]["v"] == 4
    assert markers["latest"]["band"] == "None-minimal"
    assert data["markers"]["gad7"]["latest"]["band"] == "Moderate"
    assert data["dropped"]["other_patient"] == 3  # two Observations and one Flag, never shown
    texts = [a["text"] for a in data["alerts"]["ehr"]]
    assert texts == ["Safety plan review", "Check in"]
    assert data["engagement"]["silent_days"] == 14  # last data 6 April
    assert data["engagement"]["days"][0][0] == "2026-01-05"
    assert 27 not in data["series"]["phq9"]["v"]
    search = [parse_qs(u.split("?", 1)[1]) for u in calls(ehr) if "/Observation?" in u]
    assert search == [{"patient": ["p1"], "_count": ["1000"]}]


def test_empty_record_and_failed_searches_are_reported_per_panel(browser: FlaskClient, ehr: FakeEhr) -> None:
    import responses

    launch_id = full_launch(browser, ehr)
    ehr.rsps.replace(responses.GET, f"{BASE}/Flag", status=503, json={"resourceType": "OperationOutcome"})
    data = json_of(browser.get(f"/app/{launch_id}/api/summary", base_url=PUBLIC))
    assert data["series"] == {}
    assert data["engagement"]["last_data"] is None
    assert [(p["panel"], p["code"]) for p in data["problems"]] == [("alerts", "ehr-search-failed")]
    assert "HTTP 503" in data["problems"][0]["message"]


def test_expired_access_token_is_refreshed_once_and_the_rotated_refresh_token_replaces_the_old(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr
) -> None:
    ehr.expires_in = 60
    launch_id = full_launch(browser, ehr)
    with time_machine.travel(time.time() + 120):
        assert browser.get(f"/app/{launch_id}/api/summary", base_url=PUBLIC).status_code == 200
        assert browser.get(f"/app/{launch_id}/api/summary", base_url=PUBLIC).status_code == 200
    refreshes = [f for f in ehr.token_requests if f["grant_type"] == ["refresh_token"]]
    assert len(refreshes) == 1
    assert refreshes[0]["refresh_token"] == ["rt-1-secret"]
    assert refreshes[0]["client_id"] == ["fhir-bridge-app"]
    with time_machine.travel(time.time() + 240):
        browser.get(f"/app/{launch_id}/api/summary", base_url=PUBLIC)
    refreshes = [f for f in ehr.token_requests if f["grant_type"] == ["refresh_token"]]
    assert [r["refresh_token"] for r in refreshes] == [["rt-1-secret"], ["rt-2-secret"]]  # R10: never twice


def test_failed_refresh_ends_the_session_with_a_relaunch_message(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr
) -> None:
    ehr.expires_in = 60
    launch_id = full_launch(browser, ehr)
    ehr.token_status = 400  # R7: invalid_grant on refresh
    with time_machine.travel(time.time() + 120):
        first = browser.get(f"/app/{launch_id}/api/summary", base_url=PUBLIC)
        second = browser.get(f"/app/{launch_id}/api/summary", base_url=PUBLIC)
    assert first.status_code == second.status_code == 401
    assert json_of(first)["error"] == "session-expired"
    assert "Open the app again" in json_of(first)["message"]
    assert len([f for f in ehr.token_requests if f["grant_type"] == ["refresh_token"]]) == 1
    with smart.app_context(), services.current().db.transaction() as session:
        row = session.get(SmartLaunch, launch_id)
        assert row is not None and row.status == "needs-relaunch" and row.refresh_token_enc is None


def test_a_401_from_the_ehr_refreshes_once_then_asks_to_relaunch(browser: FlaskClient, ehr: FakeEhr) -> None:
    import responses

    launch_id = full_launch(browser, ehr)
    ehr.rsps.replace(responses.GET, f"{BASE}/Observation", status=401, json={})
    response = browser.get(f"/app/{launch_id}/api/summary", base_url=PUBLIC)  # F9
    assert response.status_code == 401
    assert len([f for f in ehr.token_requests if f["grant_type"] == ["refresh_token"]]) == 1


def test_follow_up_request_queues_one_task_per_request_id(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr
) -> None:
    launch_id = full_launch(browser, ehr)
    headers = csrf(browser, launch_id)
    body = {"reason": "no-response", "note": "PHQ-9 flat after 8 weeks", "request_id": "abc-12345678"}
    first = browser.post(f"/app/{launch_id}/api/follow-up", json=body, headers=headers, base_url=PUBLIC)
    again = browser.post(f"/app/{launch_id}/api/follow-up", json=body, headers=headers, base_url=PUBLIC)
    assert (first.status_code, again.status_code) == (202, 200)
    with smart.app_context(), services.current().db.transaction() as session:
        (item,) = session.scalars(select(OutboxItem)).all()
        task = orjson.loads(item.body)
    assert item.resource_type == "Task" and item.tenant_id == "t1"
    assert task["for"] == {"reference": "Patient/p1"}
    assert task["requester"] == {"reference": "Practitioner/dr1"}
    assert task["status"] == "requested" and task["intent"] == "order"
    assert task["note"] == [{"text": "PHQ-9 flat after 8 weeks"}]
    assert task["identifier"][0]["value"] == item.ident_value
    from mappings.fhir_models import validate_resource

    validate_resource(task)


@pytest.mark.parametrize(
    "body",
    [
        {"reason": "because", "request_id": "abc-12345678"},
        {"reason": "other", "note": "x" * 501, "request_id": "abc-12345678"},
        {"reason": "other", "request_id": "<script>"},
    ],
)
def test_follow_up_refuses_bad_input_and_queues_nothing(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr, body: dict[str, Any]
) -> None:
    launch_id = full_launch(browser, ehr)
    response = browser.post(
        f"/app/{launch_id}/api/follow-up", json=body, headers=csrf(browser, launch_id), base_url=PUBLIC
    )
    assert response.status_code == 422
    assert json_of(response)["error"].startswith("invalid-")
    with smart.app_context(), services.current().db.transaction() as session:
        assert session.scalars(select(OutboxItem)).all() == []


def test_acknowledging_an_alert_records_who_and_only_works_for_this_patient(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr
) -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    with smart.app_context(), services.current().db.transaction() as session:
        session.add(
            Alert(id=mine, tenant_id="t1", patient_id="p1", rule_id="no-response", reason="PHQ-9 down 10 %")
        )
        session.add(Alert(id=theirs, tenant_id="t1", patient_id="p2", rule_id="no-response", reason="other"))
    launch_id = full_launch(browser, ehr)
    data = json_of(browser.get(f"/app/{launch_id}/api/summary", base_url=PUBLIC))
    assert [a["id"] for a in data["alerts"]["bridge"]] == [str(mine)]
    headers = csrf(browser, launch_id)
    url = f"/app/{launch_id}/api/alerts/{{}}/acknowledge"
    assert browser.post(url.format(theirs), json={}, headers=headers, base_url=PUBLIC).status_code == 404
    assert (
        browser.post(url.format("not-a-uuid"), json={}, headers=headers, base_url=PUBLIC).status_code == 404
    )
    assert browser.post(url.format(mine), json={}, headers=headers, base_url=PUBLIC).status_code == 200
    assert browser.post(url.format(mine), json={}, headers=headers, base_url=PUBLIC).status_code == 409
    with smart.app_context(), services.current().db.transaction() as session:
        row = session.get(Alert, mine)
        assert row is not None and row.status == "acknowledged" and row.acknowledged_by == "Practitioner/dr1"
        other = session.get(Alert, theirs)
        assert other is not None and other.status == "open"


def test_registration_page_lists_what_an_ehr_registration_form_asks_for(smart: Flask) -> None:
    add_tenant(
        smart,
        "t2",
        name="Oracle Clinic",
        fhir_base_url="https://fhir.example.net/r4/abc",
        smart_client_auth="private_key_jwt",
        scope_syntax="v1",
        smart_client_id="cid-2",
    )
    page = smart.test_client().get("/registration", base_url=PUBLIC)
    body = page.get_data(as_text=True)
    assert page.status_code == 200
    assert f"{PUBLIC}/launch" in body
    assert f"{PUBLIC}/callback/t2" in body
    assert f"{PUBLIC}/.well-known/jwks.json" in body
    assert "patient/Observation.read" in body  # v1 syntax for the v1 tenant
    assert "patient/Observation.rs" in body
    blocks = re.findall(r'<pre class="copyable"[^>]*>(.*?)</pre>', body, re.S)
    import html

    documents = [orjson.loads(html.unescape(b)) for b in blocks]
    oracle = next(d for d in documents if d["client_id"] == "cid-2")
    assert oracle["token_endpoint_auth_method"] == "private_key_jwt"
    assert oracle["redirect_uris"] == [f"{PUBLIC}/callback/t2"]
    assert oracle["jwks_uri"] == f"{PUBLIC}/.well-known/jwks.json"


def test_dashboard_page_has_every_panel_and_no_inline_script(browser: FlaskClient, ehr: FakeEhr) -> None:
    launch_id = full_launch(browser, ehr)
    body = browser.get(f"/app/{launch_id}/", base_url=PUBLIC).get_data(as_text=True)
    for heading in (
        "Open alerts",
        "Symptoms",
        "Digital alliance",
        "Engagement",
        "Sleep and steps",
        "App enrollment",
    ):
        assert f">{heading}" in body
    scripts = re.findall(r"<script([^>]*)>", body)
    assert all("nonce=" in s or 'type="application/json"' in s for s in scripts)
    assert " on" not in "".join(re.findall(r"<[^>]+>", body)).replace(" only", "")  # no onclick= etc.


# -- the auth pieces on their own ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 300),
        (0, 300),
        (-1, 300),
        ("3600", 3600),
        (1e12, 3600),
        (True, 300),
        (5, 30),
        ("abc", 300),
        (600, 600),
    ],
)
def test_expires_in_is_clamped(value: Any, expected: int) -> None:
    assert sl.clamp_expires_in(value) == expected  # D7


def test_scopes_follow_the_tenants_syntax() -> None:
    v2 = sl.launch_scopes("", syntax="v2", kind="ehr")
    v1 = sl.launch_scopes("patient/Observation.rs user/Task.cruds", syntax="v1", kind="standalone")
    assert v2.split()[:3] == ["launch", "openid", "fhirUser"]
    assert "patient/Observation.rs" in v2 and "online_access" in v2
    assert v1.split() == [
        "launch/patient",
        "openid",
        "fhirUser",
        "patient/Observation.read",
        "user/Task.*",
        "offline_access",
    ]
    assert sl.can_read("patient/Observation.read", "Observation")
    assert sl.can_read("user/*.rs", "Flag")
    assert not sl.can_read("patient/Observation.r", "Observation")  # reading without search is not enough
    assert not sl.can_read("system/Observation.rs", "Observation")


def test_pkce_pair_is_s256_of_the_verifier() -> None:
    import base64
    import hashlib

    verifier, challenge = sl.pkce_pair()
    assert 43 <= len(verifier) <= 128
    assert (
        challenge
        == base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )
