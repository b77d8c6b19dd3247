"""SMART scope syntax (v1 and v2) and FHIR date ranges: two small languages the sandbox must read right."""

from __future__ import annotations

import pytest

from fhir_bridge.sandbox.fhirdates import DateFormatError, parse_range
from fhir_bridge.sandbox.scopes import Grant, Rule, ScopeError, narrow, parse_resource_scope

US = 1_000_000
DAY = 86_400 * US


@pytest.mark.parametrize(
    ("text", "level", "rtype", "perms"),
    [
        ("patient/Observation.rs", "patient", "Observation", "rs"),
        ("user/*.cruds", "user", "*", "cruds"),
        ("system/Observation.c", "system", "Observation", "c"),
        ("patient/Observation.read", "patient", "Observation", "rs"),
        ("patient/*.write", "patient", "*", "cud"),
        ("user/Task.*", "user", "Task", "cruds"),
    ],
)
def test_resource_scopes_parse(text: str, level: str, rtype: str, perms: str) -> None:
    scope = parse_resource_scope(text)
    assert scope is not None
    assert (scope.level, scope.resource_type, scope.permissions) == (level, rtype, frozenset(perms))


@pytest.mark.parametrize(
    "text", ["patient/Observation.sr", "patient/Observation.x", "patient/observation.rs", "user/*."]
)
def test_malformed_resource_scopes_are_errors(text: str) -> None:
    with pytest.raises(ScopeError):
        parse_resource_scope(text)


def test_context_scopes_are_not_resource_scopes() -> None:
    for text in ("launch", "launch/patient", "openid", "fhirUser", "offline_access"):
        assert parse_resource_scope(text) is None


def test_granular_constraint_is_kept() -> None:
    scope = parse_resource_scope("patient/Observation.rs?category=survey")
    assert scope is not None and scope.constraint == (("category", "survey"),)


def test_narrow_keeps_what_is_covered_in_the_form_asked() -> None:
    allowed = ["launch", "openid", "patient/*.rs", "patient/Task.cu"]
    asked = [
        "launch",
        "fhirUser",
        "patient/Observation.read",
        "patient/Task.c",
        "patient/Task.d",
        "user/*.rs",
    ]
    assert narrow(asked, allowed, levels=("patient", "user")) == [
        "launch",
        "patient/Observation.read",
        "patient/Task.c",
    ]
    assert narrow(["system/Observation.c"], ["system/*.cruds"], levels=("patient", "user")) == []


def test_constrained_registration_covers_only_requests_with_the_same_constraint() -> None:
    allowed = ["patient/Observation.rs?category=survey"]
    assert narrow(["patient/Observation.rs"], allowed, levels=("patient",)) == []
    assert narrow(["patient/Observation.rs?category=survey"], allowed, levels=("patient",)) == [
        "patient/Observation.rs?category=survey"
    ]


def test_grant_rules_follow_level_and_patient() -> None:
    grant = Grant("patient/Observation.rs user/Patient.r", patient="p1")
    assert grant.rules("Observation", "s") == [Rule("p1")]
    assert grant.rules("Observation", "c") == []
    assert grant.rules("Patient", "r") == [Rule(None)]
    # A patient scope without a patient in context allows nothing.
    assert Grant("patient/*.rs", patient=None).rules("Observation", "r") == []


@pytest.mark.parametrize(
    ("text", "width"),
    [
        ("2024", 366 * DAY),
        ("2024-02", 29 * DAY),
        ("2024-05-02", DAY),
        ("2024-05-02T10:00Z", 60 * US),
        ("2024-05-02T10:00:00Z", US),
        ("2024-05-02T10:00:00.5Z", US // 10),
        ("2024-05-02T10:00:00.123456Z", 1),
    ],
)
def test_dates_are_ranges_as_wide_as_their_precision(text: str, width: int) -> None:
    lo, hi = parse_range(text)
    assert hi - lo == width


def test_time_zones_are_compared_in_utc() -> None:
    assert parse_range("2024-05-03T08:30:00+02:00") == parse_range("2024-05-03T06:30:00Z")
    assert parse_range("2024-05-02T23:30:00-05:00")[0] > parse_range("2024-05-02")[1] - 1


@pytest.mark.parametrize("text", ["yesterday", "2024-13", "2024-02-30", "2024-05-02T25:00:00Z", "24-05-02"])
def test_bad_dates_are_refused(text: str) -> None:
    with pytest.raises(DateFormatError):
        parse_range(text)
