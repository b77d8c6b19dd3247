"""Rule files and their evaluation, without a database: aggregates, loading errors, the stories."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fhir_bridge.rules.model import (
    AsOf,
    EpisodeState,
    History,
    RuleFileError,
    data_moments,
    load_rules,
    parse_file,
    run_rule,
    simulate,
)
from fhir_bridge.sandbox import synthetic
from mappings import MappingContext, load_catalog

T0 = datetime(2026, 9, 7, 18, 0, tzinfo=UTC)
CATALOG = load_catalog()
EXPECTED = {story.key: story.expected_alerts for story in synthetic.stories()}


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def rows_of(points: Sequence[tuple[str, float, float]]) -> list[tuple[str, datetime, float, int]]:
    return [(code, day(d), value, -300) for code, d, value in points]


def check(
    expr: str, points: Sequence[tuple[str, float, float]], at: float, tmp_path: Path
) -> tuple[bool, str]:
    path = tmp_path / "r.yaml"
    path.write_text(
        "apiVersion: fhir-bridge/rules/v1\nrules:\n"
        f"  - id: probe\n    let: {{v: '{expr}'}}\n    when: v >= -1000000\n"
        "    reason: '{v} {v.date}'\n    task: {text: x}\n"
    )
    rule = parse_file(path)[0]
    holds, env = rule.check(AsOf(History(rows_of(points), since=day(0)), day(at)))
    return holds, rule.explain(env)


PHQ = [("phq9.total", 0, 16.0), ("phq9.total", 7, 18.0), ("phq9.total", 56, 15.0), ("phq9.total", 63, 12.0)]


@pytest.mark.parametrize(
    ("expr", "at", "expected"),
    [
        ('latest("phq9.total")', 60, "15 2026-11-02"),  # as of day 60: the day-63 value is not yet known
        ('baseline("phq9.total")', 60, "16 2026-09-07"),
        ('change("phq9.total")', 60, "-1 2026-11-02"),
        ('change_pct("phq9.total")', 70, "-25 2026-11-09"),
        ('days_since_baseline("phq9.total")', 70, "63 ?"),
        ('weeks_since_baseline("phq9.total")', 60, "8 ?"),
        ('days_since_last("phq9.total")', 70, "7 ?"),
        ("days_since_last()", 70, "7 ?"),
        ('count("phq9.total", 14)', 63, "2 ?"),  # windows are inclusive: days 56 and 63
        ('max("phq9.total", 60)', 63, "18 2026-09-14"),
        ('min("phq9.total", 28)', 63, "12 2026-11-09"),
        ('latest("phq9.total") - baseline("phq9.total") * 2', 63, "-20 ?"),
    ],
)
def test_aggregates_as_of_a_moment(expr: str, at: float, expected: str, tmp_path: Path) -> None:
    holds, text = check(expr, PHQ, at, tmp_path)
    assert holds and text == expected


def test_missing_data_never_fires_and_shows_as_a_question_mark(tmp_path: Path) -> None:
    holds, text = check('latest("dwai.total")', PHQ, 70, tmp_path)
    assert not holds and text == "? ?"
    # No data at all: absence is counted from the start of the enrollment.
    holds, text = check("days_since_last()", [], 9, tmp_path)
    assert holds and text == "9 ?"


def test_no_response_reason_names_the_values() -> None:
    rule = load_rules().by_id("no-response")
    assert rule is not None
    history_ = History(rows_of([("phq9.total", 0, 16.0), ("phq9.total", 56, 15.0)]))
    events = run_rule(rule, history_, [day(0), day(56)], EpisodeState())
    assert [e.kind for e in events] == ["fired"]
    assert events[0].reason == (
        "PHQ-9 15 on 2026-11-02, after 8 weeks: -6 % since baseline 16 (2026-09-07); "
        "a response is a fall of 50 % or more."
    )


def test_an_episode_fires_once_until_its_condition_clears_and_the_alert_is_closed() -> None:
    rule = load_rules().by_id("severe")
    assert rule is not None
    values = [21.0, 22.0, 12.0, 23.0]
    history_ = History(rows_of([("phq9.total", 7 * i, v) for i, v in enumerate(values)]))
    state = EpisodeState()
    events = run_rule(rule, history_, [day(0), day(7)], state)
    assert [e.kind for e in events] == ["fired"]  # the second severe score is the same episode
    events = run_rule(rule, history_, [day(14)], state)
    assert [e.kind for e in events] == ["ended"]
    assert run_rule(rule, history_, [day(21)], state) == []  # still open (not acknowledged): no repeat
    state.open = False  # acknowledged
    assert [e.kind for e in run_rule(rule, history_, [day(28)], state)] == ["fired"]


def _story_rows(key: str, end: datetime) -> list[tuple[str, datetime, float, int]]:
    rows: list[tuple[str, datetime, float, int]] = []
    for record in synthetic.generate(key, app_user_id="u1", end=end):
        result = CATALOG.map(
            record["measure"],
            record["data"],
            MappingContext(
                vendor_id="v",
                record_id=record["record_id"],
                patient_reference="Patient/p",
                device_full_url="urn:uuid:00000000-0000-0000-0000-000000000000",
                received_at=end,
            ),
        )
        assert not result.rejections
        for m in result.measurements:
            offset = m.time.utcoffset()
            rows.append((m.code, m.time, m.value, int(offset.total_seconds() // 60) if offset else 0))
    return rows


@pytest.mark.parametrize("key", list(EXPECTED))
def test_each_story_fires_exactly_its_expected_rules_however_it_arrives(key: str) -> None:
    end = datetime(2026, 12, 7, 12, tzinfo=UTC)
    rows = _story_rows(key, end)
    rules = load_rules()
    fired = [e.rule.id for e in simulate(rules, rows, end) if e.kind == "fired"]
    assert sorted(fired) == sorted(EXPECTED[key])
    # One record at a time, with the episode state carried over: the same firings at the same moments.
    history_ = History(rows, since=min(r[1] for r in rows))
    one_by_one: list[tuple[str, datetime]] = []
    for rule in rules.enabled():
        state = EpisodeState()
        for row in sorted(rows, key=lambda r: r[1]):
            for event in run_rule(rule, history_, data_moments(rule, [(row[0], row[1])]), state):
                if event.kind == "fired":
                    one_by_one.append((rule.id, event.at))
        if rule.trigger == "schedule":
            one_by_one += [
                (rule.id, e.at) for e in run_rule(rule, history_, [end], state) if e.kind == "fired"
            ]
    at_once = [(e.rule.id, e.at) for e in simulate(rules, rows, end) if e.kind == "fired"]
    assert sorted(one_by_one) == sorted(at_once)


# -- loading ------------------------------------------------------------------------------------

GOOD = """apiVersion: fhir-bridge/rules/v1
rules:
  - id: {id}
    let: {{t: latest("phq9.total")}}
    when: {when}
    reason: "PHQ-9 {{t}}"
    task: {{text: Look}}
"""


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.format(id="x", when="t >= 1").replace("v1", "v9"), r"r\.yaml: apiVersion: must be"),
        (GOOD.format(id="x", when="frobnicate(t)"), r"rules\[0\] \(x\)\.when: unknown function 'frobnicate'"),
        (GOOD.format(id="x", when="u >= 1"), r"rules\[0\] \(x\)\.when: unknown name 'u'"),
        (GOOD.format(id="x", when="t >="), r"\(x\)\.when: not a valid expression"),
        (GOOD.format(id="x", when="t.__class__ >= 1"), r"\(x\)\.when: 't.__class__' is not allowed"),
        (GOOD.format(id="x", when="latest(phq9) >= 1"), r"\(x\)\.when: latest\(\) needs a measurement code"),
        (GOOD.format(id="X!", when="t >= 1"), r"rules\[0\]\.id: required"),
        (
            GOOD.format(id="x", when="t >= 1").replace("{t}", "{nope}"),
            r"\(x\)\.reason: \{nope\} names nothing",
        ),
        (
            GOOD.format(id="x", when="t >= 1").replace("task: {text: Look}", ""),
            r"\(x\): needs a flag, a task",
        ),
        (GOOD.format(id="x", when="t >= 1") + "  - id: x\n    when: t\n", r"\(x\)\.when: unknown name 't'"),
        (GOOD.format(id="x", when="t >= 1").replace("{t}", "{t:d}"), r"\(x\)\.reason: bad number format 'd'"),
        ("rules: [\n", r"r\.yaml: not valid YAML"),
    ],
)
def test_a_bad_rule_file_is_refused_naming_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RuleFileError, match=message):
        parse_file(write(tmp_path, text, "r.yaml"))


def test_the_shipped_defaults_carry_the_documented_ids() -> None:
    rules = load_rules()
    assert [r.id for r in rules.rules] == [
        "safety-item9",
        "severe",
        "no-response",
        "disengagement",
        "alliance-drop",
    ]
    safety = rules.by_id("safety-item9")
    assert safety is not None and safety.flag is not None and safety.task is not None
    assert safety.flag.category == ("safety", "behavioral") and safety.task.priority == "urgent"


def test_absence_rules_read_only_latest_values_so_the_schedule_stays_cheap() -> None:
    rules = load_rules()
    assert [r.id for r in rules.rules if r.latest_only] == ["safety-item9", "severe", "disengagement"]


def test_tenant_files_replace_rules_by_id_and_can_turn_one_off(tmp_path: Path) -> None:
    write(
        tmp_path,
        "apiVersion: fhir-bridge/rules/v1\nrules:\n"
        "  - {id: severe, enabled: false}\n"
        "  - id: alliance-drop\n    params: {drop: 4, days: 28}\n"
        "    let:\n"
        '      fall: max("dwai.total", days) - latest("dwai.total")\n'
        "    when: fall >= drop\n    reason: 'D-WAI down {fall}'\n    task: {text: Talk}\n",
    )
    rules = load_rules(tmp_path)
    assert [r.id for r in rules.enabled()] == [
        "safety-item9",
        "no-response",
        "disengagement",
        "alliance-drop",
    ]
    drop = rules.by_id("alliance-drop")
    assert drop is not None and drop.params["drop"] == 4
    history_ = History(rows_of([("dwai.total", 0, 26.0), ("dwai.total", 14, 21.0)]))
    assert drop.check(AsOf(history_, day(14)))[0]


def test_an_absence_rule_fires_on_the_schedule_and_new_data_ends_its_episode() -> None:
    rule = load_rules().by_id("disengagement")
    assert rule is not None and rule.trigger == "schedule"
    history_ = History(rows_of([("steps.daily", 0, 5000.0), ("mood.rating", 21, 6.0)]), since=day(0))
    state = EpisodeState()
    # Data arriving never fires an absence rule (there is no ongoing episode to end: nothing to do).
    assert run_rule(rule, history_, [day(0)], state, end_only=True) == []
    fired = run_rule(rule, history_, [day(9)], state)  # the schedule, nine quiet days later
    assert [e.kind for e in fired] == ["fired"] and fired[0].reason.startswith("No app data for 9 days")
    assert [e.kind for e in run_rule(rule, history_, [day(21)], state, end_only=True)] == ["ended"]


def test_fhirpath_over_the_history_as_of_a_moment(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "apiVersion: fhir-bridge/rules/v1\nrules:\n  - id: probe\n    let:\n"
        "      last: >-\n        fhirpath(\"measurement.where(code = 'phq9.total').value.last()\")\n"
        "      high: >-\n        fhirpath(\"measurement.where(code = 'phq9.total' and value >= 15)\n"
        '        .count()")\n'
        "    when: last < 16\n    reason: '{last} {high}'\n    task: {text: x}\n",
    )
    rule = parse_file(path)[0]
    history_ = History(rows_of(PHQ))
    holds, env = rule.check(AsOf(history_, day(60)))  # as of day 60: 16, 18, 15 known
    assert holds and rule.explain(env) == "15 3"
    holds, env = rule.check(AsOf(history_, day(10)))
    assert not holds and rule.explain(env) == "18 2"


def test_a_fhirpath_syntax_error_is_refused_at_load(tmp_path: Path) -> None:
    text = GOOD.format(id="x", when="fhirpath('measurement.where(') >= 1")
    with pytest.raises(RuleFileError, match=r"\(x\)\.when: fhirpath\('measurement.where\('\): column"):
        parse_file(write(tmp_path, text, "r.yaml"))
