"""Rules see what vendors push as FHIR too: PHQ-9 total and item 9 Observations reach the ledger and fire
the same rules as native records; device data in FHIR (units vary) counts only as "the app sent data"."""

from __future__ import annotations

from typing import Any

from flask import Flask
from sqlalchemy import select

from fhir_bridge import services
from fhir_bridge.rules.fhir_measurements import measurements_of
from fhir_bridge.storage.models import Alert, Measurement
from tests.support.vendor import Vendor
from tests.unit.test_fhir_push import app, fhir_post, obs, vendor  # noqa: F401 - fixtures

LOINC = "http://loinc.org"
POST = {"method": "POST", "url": "Observation"}
ITEM9_2 = {"coding": [{"system": LOINC, "code": "LA6570-1"}]}  # "More than half the days": scores 2


def _score(
    code: str, record: str, value: dict[str, Any], when: str = "2026-11-20T09:00:00-05:00"
) -> dict[str, Any]:
    changes: dict[str, Any] = {
        "identifier": [{"system": "https://acme.example/records", "value": record}],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": when,
        "valueQuantity": None,
    }
    return obs(**(changes | value))


def test_fhir_pushed_scores_reach_the_ledger_and_fire_rules(app: Flask, vendor: Vendor) -> None:  # noqa: F811
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": _score("44261-6", "t1", {"valueInteger": 22}), "request": POST},
            {"resource": _score("44260-8", "i1", {"valueCodeableConcept": ITEM9_2}), "request": POST},
            {"resource": obs(), "request": POST},  # steps: not read
        ],
    }  # fmt: skip
    response = fhir_post(vendor, "/fhir", bundle)
    assert response.status_code == 200, response.get_data(as_text=True)
    with app.app_context(), services.current().db.transaction() as session:
        ledger = {(m.code, m.value) for m in session.scalars(select(Measurement))}
        # Steps: not as a value (units vary), only as "the app sent data" for absence rules.
        assert ledger == {("phq9.total", 22.0), ("phq9.item9", 2.0), ("fhir.observation", 1.0)}
        rules = sorted(a.rule_id for a in session.scalars(select(Alert)))
        assert rules == ["safety-item9", "severe"]
    # The same Bundle again: duplicates, nothing new.
    assert fhir_post(vendor, "/fhir", bundle).status_code == 200
    with app.app_context(), services.current().db.transaction() as session:
        assert len(session.scalars(select(Alert)).all()) == 2


def test_only_final_scores_with_a_time_and_a_number_count() -> None:
    base = _score("44261-6", "x", {"valueInteger": 12})
    assert [m.code for m in measurements_of(base)] == ["phq9.total"]
    assert measurements_of(base | {"status": "preliminary"}) == ()
    assert measurements_of(base | {"effectiveDateTime": "2026-11-20"}) == ()  # no moment to evaluate at
    steps = measurements_of(obs())  # effectiveDateTime 2026-11-20 (a date)
    assert [(m.code, m.time.isoformat(), m.value) for m in steps] == [
        ("fhir.observation", "2026-11-20T00:00:00+00:00", 1.0)
    ]
    assert measurements_of(_score("44261-6", "x", {"valueString": "12"})) == ()
    assert measurements_of(_score("70274-6", "g", {"valueQuantity": {"value": 9}}))[0].code == "gad7.total"
    qr = {"resourceType": "QuestionnaireResponse", "status": "completed", "authored": "2026-11-20T08:00:00Z"}
    assert [m.code for m in measurements_of(qr)] == ["fhir.observation"]
    assert measurements_of(qr | {"status": "in-progress"}) == ()
