"""The sandbox FHIR endpoint behaves like a correct R4 server for everything fhir-bridge does with an EHR."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest

from mappings.fhir_models import validate_resource
from tests.support.http import json_object_of, json_of
from tests.support.smart import AppKey
from tests.unit.sandbox.conftest import FHIR, OTHER_PATIENT, PATIENT, Driver

LOINC = "http://loinc.org"
PHQ9_TOTAL = "44261-6"
GAD7_TOTAL = "70274-6"
STEPS = "41950-7"
IDENT = "https://fhir-bridge.org/fhir/id/test"


def observation(
    patient: str = PATIENT,
    *,
    code: str = PHQ9_TOTAL,
    when: str = "2024-05-02T10:00:00Z",
    category: str = "survey",
    value: int = 12,
    ident: str | None = None,
    status: str = "final",
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "status": status,
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when,
        "valueInteger": value,
    }
    if ident:
        resource["identifier"] = [{"system": IDENT, "value": ident}]
    return resource


@pytest.fixture
def system_token(driver: Driver, rs384_key: AppKey) -> str:
    driver.register_backend(rs384_key)
    return driver.backend_token(rs384_key)


def create(driver: Driver, token: str, resource: dict[str, Any], **headers: str) -> dict[str, Any]:
    response = driver.fhir("POST", resource["resourceType"], token, resource, headers=headers)
    assert response.status_code == 201, response.json
    return json_object_of(response)


def ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def search(driver: Driver, token: str, query: str) -> dict[str, Any]:
    response = driver.fhir("GET", query, token)
    assert response.status_code == 200, response.json
    return json_object_of(response)


# -- create, read, update ------------------------------------------------------------------------


def test_create_then_read(driver: Driver, system_token: str) -> None:
    response = driver.fhir("POST", "Observation", system_token, observation())
    assert response.status_code == 201
    created = json_of(response)
    assert created["meta"]["versionId"] == "1"
    assert response.headers["ETag"] == 'W/"1"'
    assert response.headers["Location"] == f"{FHIR}/Observation/{created['id']}/_history/1"
    assert response.mimetype == "application/fhir+json"

    read = driver.fhir("GET", f"Observation/{created['id']}", system_token)
    assert read.status_code == 200
    assert read.json == created
    assert read.headers["ETag"] == 'W/"1"'


def test_client_supplied_id_is_replaced_on_create(driver: Driver, system_token: str) -> None:
    created = create(driver, system_token, observation() | {"id": "mine"})
    assert created["id"] != "mine"


def test_update_and_update_as_create(driver: Driver, system_token: str) -> None:
    task = {
        "resourceType": "Task",
        "id": "follow-up-1",
        "status": "requested",
        "intent": "order",
        "for": {"reference": f"Patient/{PATIENT}"},
    }
    created = driver.fhir("PUT", "Task/follow-up-1", system_token, task)
    assert created.status_code == 201
    assert json_of(created)["meta"]["versionId"] == "1"
    updated = driver.fhir("PUT", "Task/follow-up-1", system_token, task | {"status": "completed"})
    assert updated.status_code == 200
    assert json_of(updated)["meta"]["versionId"] == "2"
    assert json_of(driver.fhir("GET", "Task/follow-up-1", system_token))["status"] == "completed"
    stale = driver.fhir("PUT", "Task/follow-up-1", system_token, task, headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert json_of(driver.fhir("GET", "Task?status=requested", system_token))["total"] == 0


def test_update_needs_the_same_id_in_body_and_url(driver: Driver, system_token: str) -> None:
    response = driver.fhir(
        "PUT",
        "Task/a",
        system_token,
        {"resourceType": "Task", "id": "b", "status": "draft", "intent": "order"},
    )
    assert response.status_code == 400
    assert json_of(response)["resourceType"] == "OperationOutcome"


def test_invalid_resource_gets_an_operation_outcome_with_the_element_path(
    driver: Driver, system_token: str
) -> None:
    bad = observation()
    bad["code"]["coding"][0]["system"] = 5
    bad["effectiveDateTime"] = "2024-13-45"
    response = driver.fhir("POST", "Observation", system_token, bad)
    assert response.status_code == 422
    outcome = json_of(response)
    assert outcome["resourceType"] == "OperationOutcome"
    expressions = {e for issue in outcome["issue"] for e in issue.get("expression", [])}
    assert "Observation.code.coding[0].system" in expressions
    assert "Observation.effectiveDateTime" in expressions
    assert json_of(driver.fhir("GET", "Observation", system_token))["total"] == 0


def test_status_codes_are_checked_like_a_real_ehr(driver: Driver, system_token: str) -> None:
    response = driver.fhir("POST", "Observation", system_token, observation(status="done"))
    assert response.status_code == 422
    assert json_of(response)["issue"][0]["expression"] == ["Observation.status"]


def test_references_must_point_at_existing_resources(driver: Driver, system_token: str) -> None:
    response = driver.fhir("POST", "Observation", system_token, observation(patient="nobody"))
    assert response.status_code == 422
    assert json_of(response)["issue"][0]["expression"] == ["Observation.subject.reference"]


def test_unsupported_things_are_refused_clearly(driver: Driver, system_token: str) -> None:
    assert driver.fhir("GET", "Medication?code=1", system_token).status_code == 404
    assert driver.fhir("POST", "Observation", system_token, {"resourceType": "Patient"}).status_code == 400
    xml = driver.fhir("GET", "Observation", system_token, headers={"Accept": "application/fhir+xml"})
    assert xml.status_code == 406
    form = driver.http.post(
        "/fhir/Observation",
        data="<Observation/>",
        headers={"Authorization": f"Bearer {system_token}", "Content-Type": "application/xml"},
    )
    assert form.status_code == 415
    assert driver.fhir("DELETE", "Observation/x", system_token).status_code == 405


def test_requests_without_a_valid_token_are_refused(driver: Driver) -> None:
    missing = driver.http.get("/fhir/Patient")
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert json_of(missing)["resourceType"] == "OperationOutcome"
    wrong = driver.fhir("GET", "Patient", "not-a-token")
    assert wrong.status_code == 401
    assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]


# -- conditional create --------------------------------------------------------------------------


def test_conditional_create_is_idempotent(driver: Driver, system_token: str) -> None:
    header = {"If-None-Exist": f"identifier={IDENT}|obs-1"}
    first = driver.fhir("POST", "Observation", system_token, observation(ident="obs-1"), headers=header)
    second = driver.fhir(
        "POST", "Observation", system_token, observation(ident="obs-1", value=3), headers=header
    )
    assert (first.status_code, second.status_code) == (201, 200)
    assert json_of(second)["id"] == json_of(first)["id"]
    assert json_of(second)["valueInteger"] == 12  # the existing resource, untouched
    assert search(driver, system_token, f"Observation?identifier={IDENT}|obs-1")["total"] == 1


def test_conditional_create_with_several_matches_is_refused(driver: Driver, system_token: str) -> None:
    create(driver, system_token, observation(ident="dup"))
    create(driver, system_token, observation(ident="dup"))
    response = driver.fhir(
        "POST",
        "Observation",
        system_token,
        observation(ident="dup"),
        headers={"If-None-Exist": f"identifier={IDENT}|dup"},
    )
    assert response.status_code == 412


def test_conditional_create_criteria_must_be_a_valid_search(driver: Driver, system_token: str) -> None:
    response = driver.fhir(
        "POST", "Observation", system_token, observation(), headers={"If-None-Exist": "colour=blue"}
    )
    assert response.status_code == 400
    assert "Unknown search parameter" in json_of(response)["issue"][0]["diagnostics"]


# -- transaction and batch -----------------------------------------------------------------------


def _record_bundle(record: str, *, bad_status: bool = False) -> dict[str, Any]:
    """A QuestionnaireResponse, the score Observation derived from it, the app Device and a Provenance."""
    qr_url, obs_url, dev_url = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))
    device = {
        "resourceType": "Device",
        "identifier": [{"system": IDENT, "value": "device-acme"}],
        "deviceName": [{"name": "Acme Mood", "type": "user-friendly-name"}],
    }
    qr = {
        "resourceType": "QuestionnaireResponse",
        "identifier": {"system": IDENT, "value": f"{record}-qr"},
        "questionnaire": "https://fhir-bridge.org/fhir/Questionnaire/phq9|1.0.0",
        "status": "completed",
        "subject": {"reference": f"Patient/{PATIENT}"},
        "authored": "2024-05-02T10:00:00Z",
        "author": {"reference": dev_url},
    }
    obs = observation(ident=f"{record}-score") | {
        "derivedFrom": [{"reference": qr_url}],
        "device": {"reference": dev_url},
    }
    if bad_status:
        obs["status"] = "nonsense"
    provenance = {
        "resourceType": "Provenance",
        "target": [{"reference": qr_url}, {"reference": obs_url}],
        "recorded": "2024-05-02T10:00:05Z",
        "agent": [{"who": {"reference": dev_url}}],
    }

    def post(full_url: str | None, resource: dict[str, Any], condition: str | None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"]},
        }
        if full_url:
            entry["fullUrl"] = full_url
        if condition:
            entry["request"]["ifNoneExist"] = condition
        return entry

    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            post(dev_url, device, f"identifier={IDENT}|device-acme"),
            post(qr_url, qr, f"identifier={IDENT}|{record}-qr"),
            post(obs_url, obs, f"identifier={IDENT}|{record}-score"),
            post(None, provenance, None),
        ],
    }


def test_transaction_resolves_urn_uuid_references(driver: Driver, system_token: str) -> None:
    response = driver.fhir("POST", "", system_token, _record_bundle("r1"))
    assert response.status_code == 200, response.json
    result = json_of(response)
    assert result["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == ["201 Created"] * 4
    device_id, qr_id, obs_id, prov_id = (e["response"]["location"].split("/")[1] for e in result["entry"])

    obs = json_of(driver.fhir("GET", f"Observation/{obs_id}", system_token))
    assert obs["derivedFrom"] == [{"reference": f"QuestionnaireResponse/{qr_id}"}]
    assert obs["device"] == {"reference": f"Device/{device_id}"}
    prov = json_of(driver.fhir("GET", f"Provenance/{prov_id}", system_token))
    assert [t["reference"] for t in prov["target"]] == [
        f"QuestionnaireResponse/{qr_id}",
        f"Observation/{obs_id}",
    ]
    assert (
        search(driver, system_token, f"Observation?derived-from=QuestionnaireResponse/{qr_id}")["total"] == 1
    )


def test_transaction_with_if_none_exist_is_idempotent(driver: Driver, system_token: str) -> None:
    first = json_of(driver.fhir("POST", "", system_token, _record_bundle("r2")))
    again = json_of(driver.fhir("POST", "", system_token, _record_bundle("r2")))
    assert [e["response"]["status"] for e in again["entry"]] == ["200 OK", "200 OK", "200 OK", "201 Created"]
    assert [e["response"]["location"] for e in again["entry"][:3]] == [
        e["response"]["location"] for e in first["entry"][:3]
    ]
    assert search(driver, system_token, "Observation")["total"] == 1
    assert search(driver, system_token, "QuestionnaireResponse")["total"] == 1
    # A second record from the same app reuses the Device the first one created.
    third = json_of(driver.fhir("POST", "", system_token, _record_bundle("r3")))
    assert third["entry"][0]["response"]["status"] == "200 OK"
    assert search(driver, system_token, "Device")["total"] == 1


def test_transaction_is_all_or_nothing(driver: Driver, system_token: str) -> None:
    response = driver.fhir("POST", "", system_token, _record_bundle("r4", bad_status=True))
    assert response.status_code == 422
    assert json_of(response)["resourceType"] == "OperationOutcome"
    assert "Bundle.entry[2].resource.status" in json_of(response)["issue"][0]["expression"]
    for rtype in ("Device", "QuestionnaireResponse", "Observation", "Provenance"):
        assert search(driver, system_token, rtype)["total"] == 0, rtype


def test_batch_entries_succeed_or_fail_on_their_own(driver: Driver, system_token: str) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": observation(ident="b1"), "request": {"method": "POST", "url": "Observation"}},
            {"resource": observation(status="bogus"), "request": {"method": "POST", "url": "Observation"}},
            {
                "resource": observation()
                | {"derivedFrom": [{"reference": "urn:uuid:0b4c1c39-cb6f-4e0b-a4a6-1d7c0d8b7b37"}]},
                "request": {"method": "POST", "url": "Observation"},
            },
            {"request": {"method": "GET", "url": f"Patient/{PATIENT}"}},
        ],
    }
    response = driver.fhir("POST", "", system_token, bundle)
    assert response.status_code == 200
    entries = json_of(response)["entry"]
    assert json_of(response)["type"] == "batch-response"
    assert [e["response"]["status"].split()[0] for e in entries] == ["201", "422", "422", "200"]
    assert entries[1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert "urn:uuid" in entries[2]["response"]["outcome"]["issue"][0]["diagnostics"]
    assert entries[3]["resource"]["id"] == PATIENT
    assert search(driver, system_token, "Observation")["total"] == 1


# -- search --------------------------------------------------------------------------------------


@pytest.fixture
def seeded(driver: Driver, system_token: str) -> dict[str, str]:
    """A handful of Observations for two patients; names -> ids."""
    made = {
        "phq_may2": create(driver, system_token, observation(when="2024-05-02T10:00:00Z", ident="a"))["id"],
        "phq_may3": create(driver, system_token, observation(when="2024-05-03T08:30:00+02:00", value=9))[
            "id"
        ],
        "phq_jun": create(driver, system_token, observation(when="2024-06-10", value=5))["id"],
        "gad_may2": create(driver, system_token, observation(code=GAD7_TOTAL, when="2024-05-02T11:00:00Z"))[
            "id"
        ],
        "steps": create(
            driver,
            system_token,
            observation(code=STEPS, category="activity", when="2024-05-02", status="preliminary"),
        )["id"],
        "other": create(driver, system_token, observation(OTHER_PATIENT, when="2024-05-02T10:00:00Z"))["id"],
    }
    return made


def _found(driver: Driver, token: str, query: str, seeded: dict[str, str]) -> set[str]:
    names = {v: k for k, v in seeded.items()}
    return {names[i] for i in ids(search(driver, token, query))}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (f"Observation?patient={PATIENT}", {"phq_may2", "phq_may3", "phq_jun", "gad_may2", "steps"}),
        (f"Observation?patient=Patient/{PATIENT}", {"phq_may2", "phq_may3", "phq_jun", "gad_may2", "steps"}),
        (f"Observation?subject=Patient/{OTHER_PATIENT}", {"other"}),
        (f"Observation?subject={FHIR}/Patient/{OTHER_PATIENT}", {"other"}),
        (f"Observation?patient={PATIENT}&code={LOINC}|{PHQ9_TOTAL}", {"phq_may2", "phq_may3", "phq_jun"}),
        (f"Observation?patient={PATIENT}&code={GAD7_TOTAL}", {"gad_may2"}),
        (f"Observation?patient={PATIENT}&code={LOINC}|{GAD7_TOTAL},{LOINC}|{STEPS}", {"gad_may2", "steps"}),
        (f"Observation?code=http://snomed.info/sct|{PHQ9_TOTAL}", set()),
        (f"Observation?patient={PATIENT}&category=activity", {"steps"}),
        (
            f"Observation?patient={PATIENT}&category=http://terminology.hl7.org/CodeSystem/observation-category|survey",
            {"phq_may2", "phq_may3", "phq_jun", "gad_may2"},
        ),
        (f"Observation?identifier={IDENT}|a", {"phq_may2"}),
        ("Observation?identifier=a", {"phq_may2"}),
        (f"Observation?patient={PATIENT}&status=preliminary", {"steps"}),
        # dates: a day covers the whole day; a dateTime with a zone is compared in UTC
        (f"Observation?patient={PATIENT}&date=2024-05-02", {"phq_may2", "gad_may2", "steps"}),
        (f"Observation?patient={PATIENT}&date=eq2024-05", {"phq_may2", "phq_may3", "gad_may2", "steps"}),
        (f"Observation?patient={PATIENT}&date=lt2024-05-02T11:00:00Z", {"phq_may2", "steps"}),
        (f"Observation?patient={PATIENT}&date=le2024-05-02T11:00:00Z", {"phq_may2", "gad_may2", "steps"}),
        (f"Observation?patient={PATIENT}&date=gt2024-05-02", {"phq_may3", "phq_jun"}),
        (f"Observation?patient={PATIENT}&date=ge2024-05-03", {"phq_may3", "phq_jun"}),
        (f"Observation?patient={PATIENT}&date=2024-05-03T06:30:00Z", {"phq_may3"}),
        (
            f"Observation?patient={PATIENT}&date=ge2024-05-01&date=lt2024-06",
            {"phq_may2", "phq_may3", "gad_may2", "steps"},
        ),
    ],
)
def test_search_parameters(
    driver: Driver, system_token: str, seeded: dict[str, str], query: str, expected: set[str]
) -> None:
    assert _found(driver, system_token, query, seeded) == expected


def test_search_sorts_by_date_and_last_updated(
    driver: Driver, system_token: str, seeded: dict[str, str]
) -> None:
    names = {v: k for k, v in seeded.items()}
    base = f"Observation?patient={PATIENT}&code={PHQ9_TOTAL}"
    ascending = [names[i] for i in ids(search(driver, system_token, base + "&_sort=date"))]
    descending = [names[i] for i in ids(search(driver, system_token, base + "&_sort=-date"))]
    assert ascending == ["phq_may2", "phq_may3", "phq_jun"]
    assert descending == ["phq_jun", "phq_may3", "phq_may2"]
    by_update = [names[i] for i in ids(search(driver, system_token, base + "&_sort=-_lastUpdated"))]
    assert by_update == ["phq_jun", "phq_may3", "phq_may2"]  # created in that order, newest first


def test_sort_by_any_date_parameter_follows_updates(driver: Driver, system_token: str) -> None:
    def task(tid: str, authored: str, modified: str) -> dict[str, Any]:
        return {
            "resourceType": "Task",
            "id": tid,
            "status": "requested",
            "intent": "order",
            "for": {"reference": f"Patient/{PATIENT}"},
            "authoredOn": authored,
            "lastModified": modified,
        }

    for tid, authored, modified in (("t1", "2024-01-01", "2024-03-01"), ("t2", "2024-02-01", "2024-01-15")):
        assert (
            driver.fhir("PUT", f"Task/{tid}", system_token, task(tid, authored, modified)).status_code == 201
        )
    assert ids(search(driver, system_token, "Task?_sort=authored-on")) == ["t1", "t2"]
    assert ids(search(driver, system_token, "Task?_sort=modified")) == ["t2", "t1"]
    # An update moves the resource in both orders.
    driver.fhir("PUT", "Task/t1", system_token, task("t1", "2024-06-01", "2024-01-01"))
    assert ids(search(driver, system_token, "Task?_sort=authored-on")) == ["t2", "t1"]
    assert ids(search(driver, system_token, "Task?_sort=-modified")) == ["t2", "t1"]


def test_search_pages_with_next_links_until_done(driver: Driver, system_token: str) -> None:
    made = {
        create(driver, system_token, observation(when=f"2024-01-{d:02d}", value=d))["id"]
        for d in range(1, 24)
    }
    seen: list[str] = []
    url = f"Observation?patient={PATIENT}&_sort=date&_count=5"
    pages = 0
    while url:
        bundle = search(driver, system_token, url)
        pages += 1
        # The total comes with the first page (counting again on every page would double the cost).
        assert bundle.get("total") == (23 if pages == 1 else None)
        assert len(bundle.get("entry", [])) <= 5
        seen += ids(bundle)
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        url = urlsplit(nxt[0]).path.removeprefix("/fhir/") + "?" + urlsplit(nxt[0]).query if nxt else ""
        if nxt:
            assert nxt[0].startswith(f"{FHIR}/Observation?")
    assert pages == 5
    assert seen == sorted(seen, key=lambda i: seen.index(i)) and set(seen) == made and len(seen) == 23
    values = [json_of(driver.fhir("GET", f"Observation/{i}", system_token))["valueInteger"] for i in seen]
    assert values == list(range(1, 24))
    # Asked for, the total is on every page, and the next link keeps asking for it.
    last = search(driver, system_token, f"Observation?patient={PATIENT}&_count=5&_offset=20&_total=accurate")
    assert last["total"] == 23 and len(last["entry"]) == 3
    first = search(driver, system_token, f"Observation?patient={PATIENT}&_count=5&_total=accurate")
    assert "_total=accurate" in next(link["url"] for link in first["link"] if link["relation"] == "next")


def test_search_count_zero_and_summary_count(
    driver: Driver, system_token: str, seeded: dict[str, str]
) -> None:
    counted = search(driver, system_token, f"Observation?patient={PATIENT}&_summary=count")
    assert counted["total"] == 5 and "entry" not in counted
    bundle = search(driver, system_token, f"Observation?patient={PATIENT}&_count=0")
    assert bundle["total"] == 5 and "entry" not in bundle


def test_search_by_id_name_and_questionnaire(driver: Driver, system_token: str) -> None:
    assert ids(search(driver, system_token, f"Patient?_id={PATIENT}")) == [PATIENT]
    assert ids(search(driver, system_token, "Patient?name=rivera")) == [PATIENT]
    assert ids(search(driver, system_token, "Patient?family=Riv")) == [PATIENT]
    assert ids(search(driver, system_token, "Patient?name:exact=Rivera")) == [PATIENT]
    assert ids(search(driver, system_token, "Patient?name:contains=iver")) == [PATIENT]
    assert ids(search(driver, system_token, "Patient?identifier=MRN-100001")) == [PATIENT]
    driver.fhir("POST", "", system_token, _record_bundle("q1"))
    found = search(
        driver,
        system_token,
        "QuestionnaireResponse?questionnaire=https://fhir-bridge.org/fhir/Questionnaire/phq9",
    )
    assert found["total"] == 1
    assert search(driver, system_token, f"QuestionnaireResponse?patient={OTHER_PATIENT}")["total"] == 0
    assert (
        search(driver, system_token, "QuestionnaireResponse?authored=2024-05-02&status=completed")["total"]
        == 1
    )


@pytest.mark.parametrize(
    "query",
    [
        "Observation?colour=blue",
        "Observation?date=yesterday",
        "Observation?date=ge2024-13-01",
        "Observation?_sort=code",
        "Observation?_count=5000",
        "Observation?code:text=phq",
        "Observation?subject.name=Rivera",
        "Flag?status=active",  # not an R4 search parameter of Flag: refused, never ignored
        "QuestionnaireResponse?_sort=date",
    ],
)
def test_bad_searches_are_refused_not_ignored(driver: Driver, system_token: str, query: str) -> None:
    response = driver.fhir("GET", query, system_token)
    assert response.status_code == 400, query
    assert json_of(response)["resourceType"] == "OperationOutcome"


def test_lenient_handling_skips_unknown_parameters_and_says_so(
    driver: Driver, system_token: str, seeded: dict[str, str]
) -> None:
    response = driver.fhir(
        "GET",
        f"Observation?patient={PATIENT}&colour=blue",
        system_token,
        headers={"Prefer": "handling=lenient"},
    )
    assert response.status_code == 200
    bundle = json_of(response)
    assert bundle["total"] == 5
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    assert "colour" not in self_link and f"patient={PATIENT}" in self_link


def test_unsupported_interactions_say_what_is_supported(driver: Driver, system_token: str) -> None:
    response = driver.fhir("GET", f"Patient/{PATIENT}/_history", system_token)
    assert response.status_code == 404
    assert "/fhir/metadata" in json_of(response)["issue"][0]["diagnostics"]


def test_transaction_puts_may_reference_each_other(driver: Driver, system_token: str) -> None:
    goal = {
        "resourceType": "Goal",
        "id": "g1",
        "lifecycleStatus": "active",
        "description": {"text": "Walk daily"},
        "subject": {"reference": f"Patient/{PATIENT}"},
        "addresses": [{"reference": "Goal/g2"}],
    }
    other = goal | {"id": "g2", "addresses": [{"reference": "Goal/g1"}]}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": goal, "request": {"method": "PUT", "url": "Goal/g1"}},
            {"resource": other, "request": {"method": "PUT", "url": "Goal/g2"}},
        ],
    }
    response = driver.fhir("POST", "", system_token, bundle)
    assert response.status_code == 200, response.json
    assert [e["response"]["status"] for e in json_of(response)["entry"]] == ["201 Created", "201 Created"]


def test_search_by_post(driver: Driver, system_token: str, seeded: dict[str, str]) -> None:
    response = driver.http.post(
        "/fhir/Observation/_search",
        data={"patient": PATIENT, "code": GAD7_TOTAL},
        headers={"Authorization": f"Bearer {system_token}"},
    )
    assert response.status_code == 200
    assert ids(json_object_of(response)) == [seeded["gad_may2"]]


# -- scopes and the patient compartment ------------------------------------------------------------


def test_patient_token_sees_only_its_patient(
    driver: Driver, system_token: str, seeded: dict[str, str]
) -> None:
    driver.register()
    token = driver.ehr_launch_token(scope="launch patient/Observation.rs patient/Patient.rs")["access_token"]
    # A search without a patient is narrowed to the launch patient...
    assert seeded["other"] not in ids(search(driver, token, "Observation"))
    assert search(driver, token, "Observation")["total"] == 5
    # ...naming another patient is refused, and so is reading another patient's resource.
    assert driver.fhir("GET", f"Observation?patient={OTHER_PATIENT}", token).status_code == 403
    assert driver.fhir("GET", f"Observation/{seeded['other']}", token).status_code == 403
    assert driver.fhir("GET", f"Patient/{OTHER_PATIENT}", token).status_code == 403
    assert driver.fhir("GET", f"Patient/{PATIENT}", token).status_code == 200
    assert ids(search(driver, token, "Patient")) == [PATIENT]


def test_v1_scopes_are_understood(driver: Driver, seeded: dict[str, str]) -> None:
    driver.register(scopes=["launch", "patient/*.read"])
    token = driver.ehr_launch_token(scope="launch patient/Observation.read")["access_token"]
    assert search(driver, token, "Observation")["total"] == 5
    assert driver.fhir("GET", f"Patient/{PATIENT}", token).status_code == 403  # not granted
    assert driver.fhir("POST", "Observation", token, observation()).status_code == 403  # read is not write


def test_search_and_read_permissions_are_separate(driver: Driver, seeded: dict[str, str]) -> None:
    driver.register()
    token = driver.ehr_launch_token(scope="launch patient/Observation.r")["access_token"]
    assert driver.fhir("GET", f"Observation/{seeded['phq_may2']}", token).status_code == 200
    assert driver.fhir("GET", "Observation", token).status_code == 403


def test_granular_v2_scope_limits_to_its_category(driver: Driver, seeded: dict[str, str]) -> None:
    driver.register()
    token = driver.ehr_launch_token(scope="launch patient/Observation.rs?category=activity")["access_token"]
    assert ids(search(driver, token, "Observation")) == [seeded["steps"]]
    assert driver.fhir("GET", f"Observation/{seeded['phq_may2']}", token).status_code == 403


def test_patient_token_writes_only_for_its_patient(driver: Driver) -> None:
    driver.register()
    token = driver.ehr_launch_token(scope="launch patient/Task.cu")["access_token"]
    task = {"resourceType": "Task", "status": "requested", "intent": "order"}
    mine = driver.fhir("POST", "Task", token, task | {"for": {"reference": f"Patient/{PATIENT}"}})
    assert mine.status_code == 201
    theirs = driver.fhir("POST", "Task", token, task | {"for": {"reference": f"Patient/{OTHER_PATIENT}"}})
    assert theirs.status_code == 403


def test_user_token_sees_every_patient(driver: Driver, seeded: dict[str, str]) -> None:
    driver.register()
    token = driver.ehr_launch_token(scope="launch user/Observation.rs")["access_token"]
    assert search(driver, token, f"Observation?patient={OTHER_PATIENT}")["total"] == 1


# -- discovery and the chart -----------------------------------------------------------------------


def test_capability_statement_is_valid_r4_and_lists_the_search_parameters(driver: Driver) -> None:
    response = driver.http.get("/fhir/metadata")
    assert response.status_code == 200
    statement = json_of(response)
    validate_resource(statement)
    assert statement["fhirVersion"] == "4.0.1"
    observation_entry = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Observation")
    names = {p["name"] for p in observation_entry["searchParam"]}
    assert {"patient", "subject", "code", "category", "date", "identifier", "status"} <= names
    assert observation_entry["conditionalCreate"] is True and observation_entry["updateCreate"] is True
    assert {i["code"] for i in statement["rest"][0]["interaction"]} == {"transaction", "batch"}
    assert "development and demo only" in statement["software"]["name"]


CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"


def _consent(status: str, value: str) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "identifier": [{"system": IDENT, "value": value}],
        "status": status,
        "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{PATIENT}"},
        "policyRule": {"text": "share the app's data with the care team"},
    }  # fmt: skip


@pytest.mark.parametrize("how", ["transaction", "batch", "single"])
def test_conditional_update_creates_once_then_replaces(driver: Driver, system_token: str, how: str) -> None:
    """What fhir-bridge's upserts (Consent, Goal, Task, Communication) need: PUT Type?identifier=..."""
    value = f"consent-{how}"
    url = f"Consent?identifier={IDENT}|{value}"

    def put(status: str) -> tuple[int, str]:
        resource = _consent(status, value)
        if how == "single":
            response = driver.fhir("PUT", url, system_token, resource)
            assert response.status_code in (200, 201), response.json
            return response.status_code, response.headers["Location"]
        bundle = {"resourceType": "Bundle", "type": how,
                  "entry": [{"resource": resource, "request": {"method": "PUT", "url": url}}]}  # fmt: skip
        response = driver.fhir("POST", "", system_token, bundle)
        assert response.status_code == 200, response.json
        answer = json_of(response)["entry"][0]["response"]
        return int(answer["status"][:3]), answer["location"]

    created, first = put("active")
    updated, second = put("inactive")
    assert (created, updated) == (201, 200)
    assert first.split("/_history")[0] == second.split("/_history")[0]
    found = search(driver, system_token, f"Consent?identifier={IDENT}|{value}")
    assert found["total"] == 1 and found["entry"][0]["resource"]["status"] == "inactive"


def test_conditional_update_matching_several_is_412(driver: Driver, system_token: str) -> None:
    for _ in range(2):
        create(driver, system_token, _consent("active", "twice"))
    response = driver.fhir(
        "PUT", f"Consent?identifier={IDENT}|twice", system_token, _consent("inactive", "twice")
    )
    assert response.status_code == 412
    assert driver.fhir("PUT", "Consent", system_token, _consent("inactive", "x")).status_code == 400
