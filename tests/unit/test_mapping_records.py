"""Each bad record gets specific reasons naming the field; good records get deterministic identity."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from mappings import MappingContext, load_catalog
from mappings.fhir_models import validate_resource
from mappings.identity import (
    RECORD_IDENTIFIER_SYSTEM,
    device_full_url,
    device_resource,
    full_url,
)

CATALOG = load_catalog()
RECEIVED = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def ctx(record_id: str = "r-1", vendor: str = "acme", received_at: datetime = RECEIVED) -> MappingContext:
    return MappingContext(vendor, record_id, "Patient/p-1", device_full_url(vendor), received_at)


def reasons(measure: str, data: Any, **kwargs: Any) -> list[tuple[str, str]]:
    result = CATALOG.map(measure, data, ctx(**kwargs))
    assert not result.resources and not result.measurements
    return [(r.code, r.field) for r in result.rejections]


MOOD = {"time": "2024-06-01T08:00:00+02:00", "rating": 6}
SLEEP: dict[str, Any] = {
    "start": "2024-05-31T23:00:00+02:00",
    "end": "2024-06-01T07:00:00+02:00",
    "duration": 420,
}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"rating": 6}, [("missing", "time")]),
        ({**MOOD, "time": None}, [("missing", "time")]),
        ({**MOOD, "rating": 11}, [("out-of-range", "rating")]),
        ({**MOOD, "rating": -1}, [("out-of-range", "rating")]),
        ({**MOOD, "rating": "6"}, [("wrong-type", "rating")]),
        ({**MOOD, "rating": True}, [("wrong-type", "rating")]),
        ({**MOOD, "rating": 6.5}, [("wrong-type", "rating")]),
        ({**MOOD, "rating": float("nan")}, [("wrong-type", "rating")]),
        ({**MOOD, "time": "2024-06-01T08:00:00"}, [("no-timezone", "time")]),
        ({**MOOD, "time": "2024-06-01"}, [("no-timezone", "time")]),
        ({**MOOD, "time": "yesterday"}, [("invalid-date-time", "time")]),
        ({**MOOD, "time": 1717228800}, [("wrong-type", "time")]),
        ({**MOOD, "time": "2024-06-01T08:00:00+15:00"}, [("invalid-date-time", "time")]),
        ({**MOOD, "time": "2024-06-01T08:00:00+02:00:30"}, [("invalid-date-time", "time")]),
        ({**MOOD, "time": "1899-12-31T23:00:00Z"}, [("too-early", "time")]),
        ({**MOOD, "mood": "ok"}, [("unknown-field", "mood")]),
        ({"time": "x", "rating": "y"}, [("invalid-date-time", "time"), ("wrong-type", "rating")]),
    ],
)
def test_mood_rejections(data: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert sorted(reasons("mood", data)) == sorted(expected)


def test_whole_number_floats_are_accepted_as_integers() -> None:
    result = CATALOG.map("mood", {**MOOD, "rating": 6.0}, ctx())
    assert result.ok and result.resources[0].resource["valueInteger"] == 6


@pytest.mark.parametrize(
    ("duration", "expected"),
    [
        ({"value": 7}, [("missing", "duration.unit")]),
        ({"unit": "h"}, [("missing", "duration.value")]),
        ({"value": 7, "unit": "h", "per": "night"}, [("unknown-field", "duration.per")]),
        ({"value": 7, "unit": "hours"}, [("unit-not-convertible", "duration.unit")]),
        ({"value": 7, "unit": "/min"}, [("unit-not-convertible", "duration.unit")]),
        ({"value": "7", "unit": "h"}, [("wrong-type", "duration.value")]),
        ({"value": 25, "unit": "h"}, [("out-of-range", "duration")]),
        ("420", [("wrong-type", "duration")]),
    ],
)
def test_quantity_rejections(duration: Any, expected: list[tuple[str, str]]) -> None:
    assert reasons("sleep-duration", {**SLEEP, "duration": duration}) == expected


def test_out_of_range_after_conversion_names_the_canonical_unit() -> None:
    result = CATALOG.map("sleep-duration", {**SLEEP, "duration": {"value": 25, "unit": "h"}}, ctx())
    assert result.rejections[0].message == "Must be between 0 and 1440 min."


@pytest.mark.parametrize(
    ("duration", "minutes"),
    [
        (420, 420),
        ({"value": 420, "unit": "min"}, 420),
        ({"value": 7.5, "unit": "h"}, 450),
        ({"value": 25230, "unit": "s"}, 421),
    ],
)
def test_units_convert_to_the_canonical_unit(duration: Any, minutes: int) -> None:
    result = CATALOG.map("sleep-duration", {**SLEEP, "duration": duration}, ctx())
    assert result.ok, result.rejections
    assert result.resources[0].resource["valueQuantity"] == {
        "value": minutes,
        "unit": "min",
        "system": "http://unitsofmeasure.org",
        "code": "min",
    }
    assert [(m.code, m.value) for m in result.measurements] == [("sleep.duration", minutes)]


def test_timestamps_in_the_future_beyond_the_tolerance_are_rejected() -> None:
    near = (RECEIVED + timedelta(minutes=4, seconds=59)).isoformat()
    far = (RECEIVED + timedelta(minutes=5, seconds=1)).isoformat()
    assert CATALOG.map("mood", {**MOOD, "time": near}, ctx()).ok
    assert reasons("mood", {**MOOD, "time": far}) == [("in-future", "time")]
    strict = load_catalog(future_tolerance=timedelta(0))
    assert [r.code for r in strict.map("mood", {**MOOD, "time": near}, ctx()).rejections] == ["in-future"]


def test_a_date_is_in_the_future_only_once_it_has_begun_nowhere() -> None:
    # At 12:00 UTC it is already the next day in UTC+14 (Kiribati), so that date is accepted.
    assert CATALOG.map("steps-daily", {"date": "2024-06-02", "steps": 10}, ctx()).ok
    assert reasons("steps-daily", {"date": "2024-06-03", "steps": 10}) == [("in-future", "date")]
    early = datetime(2024, 6, 1, 0, 0, tzinfo=UTC)
    assert reasons("steps-daily", {"date": "2024-06-02", "steps": 10}, received_at=early) == [
        ("in-future", "date")
    ]
    for bad in ("2024-6-1", "2024-02-30", "20240601", 20240601):
        assert reasons("steps-daily", {"date": bad, "steps": 10}) == [("invalid-date", "date")]


def test_period_end_before_start_is_rejected() -> None:
    data = {**SLEEP, "start": SLEEP["end"], "end": SLEEP["start"]}
    assert reasons("sleep-duration", data) == [("period-reversed", "end")]


def test_questionnaire_rejections_name_each_item() -> None:
    answers = {
        "item1": 0,
        "item2": 5,
        "item4": "LA6572-7",
        "item5": None,
        "item6": "x",
        "item7": [1],
        "extra": 1,
    }
    got = reasons("gad7", {"authored": "2024-06-01T08:00:00Z", "answers": answers})
    assert sorted(got) == sorted(
        [
            ("invalid-answer", "answers.item2"),
            ("missing", "answers.item3"),
            ("invalid-answer", "answers.item4"),
            ("missing", "answers.item5"),
            ("invalid-answer", "answers.item6"),
            ("wrong-type", "answers.item7"),
            ("unknown-field", "answers.extra"),
        ]
    )
    assert reasons("gad7", {"answers": {}})[0] == ("missing", "authored")
    assert ("wrong-type", "answers") in reasons("gad7", {"authored": "2024-06-01T08:00:00Z", "answers": [1]})


def test_the_record_as_a_whole() -> None:
    assert reasons("mood", ["not", "an", "object"]) == [("wrong-type", "data")]
    assert reasons("no-such-measure", MOOD) == [("unknown-measure", "measure")]
    assert reasons("app-engagement", {"start": SLEEP["start"], "end": SLEEP["end"]}) == [("missing", "data")]
    with pytest.raises(ValueError, match="timezone-aware"):
        CATALOG.map("mood", MOOD, ctx(received_at=datetime(2024, 6, 1)))


def test_messages_never_echo_what_was_submitted() -> None:
    marker = "PHI-Jane-Doe-1970"
    data = {
        "time": marker,
        "rating": marker,
        marker: 1,
        "answers": {marker: marker},
    }
    for measure in CATALOG.measures():
        result = CATALOG.map(measure, data, ctx())
        assert result.rejections
        for rejection in result.rejections:
            assert marker not in rejection.message


def test_the_same_record_maps_to_byte_identical_resources() -> None:
    data = {"authored": "2024-05-01T08:30:00+02:00", "answers": {f"item{i}": 1 for i in range(1, 10)}}
    first = CATALOG.map("phq9", data, ctx())
    second = CATALOG.map("phq9", data, ctx(received_at=RECEIVED + timedelta(days=3)))
    assert [orjson.dumps(r.resource) for r in first.resources] == [
        orjson.dumps(r.resource) for r in second.resources
    ]
    assert first.resources == second.resources
    other = CATALOG.map("phq9", data, ctx(record_id="r-2"))
    assert {r.identifier_value for r in first.resources}.isdisjoint(
        {r.identifier_value for r in other.resources}
    )
    other_vendor = CATALOG.map("phq9", data, ctx(vendor="other"))
    assert {r.full_url for r in first.resources}.isdisjoint({r.full_url for r in other_vendor.resources})


def test_identifiers_are_short_fhir_ids_and_full_urls_derive_from_them() -> None:
    data = {"authored": "2024-05-01T08:30:00Z", "answers": {f"item{i}": 2 for i in range(1, 10)}}
    result = CATALOG.map("phq9", data, ctx(record_id="x" * 500))
    assert len(result.resources) == 3
    for r in result.resources:
        assert re.fullmatch(r"[a-z0-9]{1,64}", r.identifier_value)
        assert r.identifier_system == RECORD_IDENTIFIER_SYSTEM
        assert r.full_url == full_url(r.identifier_system, r.identifier_value)
        assert uuid.UUID(r.full_url.removeprefix("urn:uuid:")).version == 5
        ident = r.resource["identifier"]
        ident = ident[0] if isinstance(ident, list) else ident
        assert ident == {"system": r.identifier_system, "value": r.identifier_value}
        assert r.resource["subject"] == {"reference": "Patient/p-1"}
        assert r.resource["meta"]["tag"][0]["code"] == "patient-supplied"
    qr, total, item9 = (r.resource for r in result.resources)
    assert qr["author"] == qr["source"] == {"reference": "Patient/p-1"}
    assert total["device"] == item9["device"] == {"reference": device_full_url("acme")}


def test_the_app_device() -> None:
    device = device_resource("acme", "Acme Mood")
    assert device.full_url == device_full_url("acme") != device_full_url("acme2")
    assert re.fullmatch(r"[a-z0-9]{1,64}", device.identifier_value)
    validate_resource(device.resource)
    assert device.resource["type"]["coding"][0]["code"] == "706689003"
    assert device.resource["deviceName"] == [{"name": "Acme Mood", "type": "user-friendly-name"}]


def test_measurement_times() -> None:
    steps = CATALOG.map("steps-daily", {"date": "2024-05-01", "steps": 8000}, ctx())
    assert [(m.code, m.time, m.value) for m in steps.measurements] == [
        ("steps.daily", datetime(2024, 5, 1, tzinfo=UTC), 8000.0)
    ]
    sleep = CATALOG.map("sleep-duration", SLEEP, ctx())
    assert sleep.measurements[0].time == datetime.fromisoformat(SLEEP["start"])
    engagement = CATALOG.map(
        "app-engagement",
        {"start": SLEEP["start"], "end": SLEEP["end"], "sessions": 2, "messages_exchanged": 0},
        ctx(),
    )
    assert [(m.code, m.value) for m in engagement.measurements] == [
        ("engagement.sessions", 2.0),
        ("engagement.messages-exchanged", 0.0),
    ]
