"""Scores and severity bands against hand-computed cases, at both edges of every band.

The expected values here are written from the published cut points (clinical-content.md 1.3-1.7), not
read from the specs, so a wrong band in a YAML file fails here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from mappings import MappingContext, MapResult, load_catalog
from mappings.identity import device_full_url

CATALOG = load_catalog()
CONTEXT = MappingContext(
    vendor_id="acme",
    record_id="r-1",
    patient_reference="Patient/p-1",
    device_full_url=device_full_url("acme"),
    received_at=datetime(2024, 6, 1, tzinfo=UTC),
)
OWN = "https://fhir-bridge.org/fhir/CodeSystem/fhir-bridge"
V3 = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


def _answers(total: int, items: int, per_item_max: int = 3, first: int = 0) -> dict[str, int]:
    """Scores for ``items`` items adding up to ``total`` (greedy: the first items take the most)."""
    assert first * items <= total <= per_item_max * items
    answers = {}
    remaining = total - first * items
    for i in range(1, items + 1):
        extra = min(per_item_max - first, remaining)
        answers[f"item{i}"] = first + extra
        remaining -= extra
    return answers


def _map(measure: str, answers: dict[str, Any]) -> MapResult:
    result = CATALOG.map(measure, {"authored": "2024-05-01T08:30:00+02:00", "answers": answers}, CONTEXT)
    assert result.ok, result.rejections
    return result


def _score(result: MapResult, code: str) -> tuple[float, tuple[str, str] | None]:
    for r in result.resources:
        res = r.resource
        if res["resourceType"] == "Observation" and res["code"]["coding"][0]["code"] == code:
            interp = res.get("interpretation")
            band = (interp[0]["coding"][0]["system"], interp[0]["coding"][0]["code"]) if interp else None
            return res["valueQuantity"]["value"], band
    raise AssertionError(f"no Observation {code}")


PHQ9 = [
    (0, "phq9-none-minimal"),
    (4, "phq9-none-minimal"),
    (5, "phq9-mild"),
    (9, "phq9-mild"),
    (10, "phq9-moderate"),
    (14, "phq9-moderate"),
    (15, "phq9-moderately-severe"),
    (19, "phq9-moderately-severe"),
    (20, "phq9-severe"),
    (27, "phq9-severe"),
]


@pytest.mark.parametrize(("total", "band"), PHQ9)
def test_phq9_total_and_band(total: int, band: str) -> None:
    result = _map("phq9", _answers(total, 9))
    assert _score(result, "44261-6") == (total, (OWN, band))
    assert [m.value for m in result.measurements if m.code == "phq9.total"] == [total]


def test_phq9_difficulty_answer_never_counts() -> None:
    plain = _map("phq9", _answers(7, 9))
    with_difficulty = _map("phq9", {**_answers(7, 9), "difficulty": "LA6574-3"})
    assert _score(plain, "44261-6") == _score(with_difficulty, "44261-6") == (7, (OWN, "phq9-mild"))


@pytest.mark.parametrize(
    ("answer", "score", "flag"),
    [(0, 0, "NEG"), ("LA6568-5", 0, "NEG"), (1, 1, "POS"), ("LA6570-1", 2, "POS"), (3, 3, "POS")],
)
def test_phq9_item9_is_its_own_observation(answer: Any, score: int, flag: str) -> None:
    answers = {**{f"item{i}": 0 for i in range(1, 9)}, "item9": answer}
    result = _map("phq9", answers)
    (item9,) = [
        r.resource
        for r in result.resources
        if r.resource_type == "Observation" and r.resource["code"]["coding"][0]["code"] == "44260-8"
    ]
    assert item9["interpretation"][0]["coding"][0]["code"] == flag
    qr = result.resources[0]
    assert item9["derivedFrom"] == [{"reference": qr.full_url}]
    assert item9["performer"] == [{"reference": "Patient/p-1"}]
    assert [m.value for m in result.measurements if m.code == "phq9.item9"] == [score]
    # The total includes item 9.
    assert _score(result, "44261-6")[0] == score


GAD7 = [
    (0, "gad7-minimal"),
    (4, "gad7-minimal"),
    (5, "gad7-mild"),
    (9, "gad7-mild"),
    (10, "gad7-moderate"),
    (14, "gad7-moderate"),
    (15, "gad7-severe"),
    (21, "gad7-severe"),
]


@pytest.mark.parametrize(("total", "band"), GAD7)
def test_gad7_total_and_band(total: int, band: str) -> None:
    result = _map("gad7", _answers(total, 7))
    assert _score(result, "70274-6") == (total, (OWN, band))


@pytest.mark.parametrize("code", ["LA6570-1", "LA18938-3"])
def test_gad7_item2_accepts_both_answer_codes_and_scores_them_2(code: str) -> None:
    answers = {**{f"item{i}": 0 for i in range(1, 8)}, "item2": code}
    result = _map("gad7", answers)
    assert _score(result, "70274-6")[0] == 2
    qr = result.resources[0].resource
    item2 = next(i for i in qr["item"] if i["linkId"] == "68509-9")
    # Recorded as the answer our Questionnaire offers, so the response validates against it.
    assert item2["answer"][0]["valueCoding"]["code"] == "LA6570-1"


def test_gad7_item_other_than_2_does_not_accept_the_variant_code() -> None:
    answers = {**{f"item{i}": 0 for i in range(1, 8)}, "item3": "LA18938-3"}
    result = CATALOG.map("gad7", {"authored": "2024-05-01T08:30:00Z", "answers": answers}, CONTEXT)
    assert [(r.code, r.field) for r in result.rejections] == [("invalid-answer", "answers.item3")]


@pytest.mark.parametrize(
    ("measure", "code", "total", "flag"),
    [
        ("phq2", "55758-7", 0, "NEG"),
        ("phq2", "55758-7", 2, "NEG"),
        ("phq2", "55758-7", 3, "POS"),
        ("phq2", "55758-7", 6, "POS"),
        ("gad2", "gad2-total", 0, "NEG"),
        ("gad2", "gad2-total", 2, "NEG"),
        ("gad2", "gad2-total", 3, "POS"),
        ("gad2", "gad2-total", 6, "POS"),
    ],
)
def test_two_item_screens_are_positive_from_3(measure: str, code: str, total: int, flag: str) -> None:
    assert _score(_map(measure, _answers(total, 2)), code) == (total, (V3, flag))


@pytest.mark.parametrize("total", [6, 7, 18, 29, 30])
def test_dwai_total(total: int) -> None:
    result = _map("dwai", _answers(total, 6, per_item_max=5, first=1))
    assert _score(result, "dwai-total") == (total, None)


def test_dwai_theme_sums() -> None:
    # Themes: goal = items 1 and 4, task = items 2 and 5, bond = items 3 and 6.
    result = _map("dwai", {"item1": 1, "item2": 2, "item3": 3, "item4": 4, "item5": 5, "item6": 5})
    assert _score(result, "dwai-goal")[0] == 5
    assert _score(result, "dwai-task")[0] == 7
    assert _score(result, "dwai-bond")[0] == 8
    assert _score(result, "dwai-total")[0] == 20
    assert {m.code: m.value for m in result.measurements} == {
        "dwai.total": 20,
        "dwai.bond": 8,
        "dwai.task": 7,
        "dwai.goal": 5,
    }
