"""The synthetic stories: every record is one the bridge accepts, and each story has the shape it promises.

The numbers are read back through the real mapping engine (its scores and measurements), the way the
rules engine will see them, not recomputed here. The thresholds are the default rule thresholds of
the stories contract: severe at PHQ-9 >= 20, no response when a PHQ-9 56+ days after the baseline is
down less than 50 %, disengagement after 7 days without data, alliance drop when D-WAI falls by 6
within 28 days, safety on item 9 >= 1.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from fhir_bridge.sandbox.synthetic import Story, generate, stories, story
from mappings import load_catalog
from mappings.catalog import Catalog
from mappings.identity import device_full_url
from mappings.model import MappingContext, Measurement

# Ends that put the window across DST switches in both hemispheres, and one at a UTC day boundary.
ENDS = (
    datetime(2026, 12, 7, 3, 0, tzinfo=UTC),
    datetime(2025, 4, 20, 23, 59, 59, tzinfo=UTC),
    datetime(2025, 11, 15, 0, 0, tzinfo=UTC),
)
BASELINES = {"responder": 17, "non-responder": 15, "silent": 14, "safety": 16, "alliance-drop": 18}


@cache
def _catalog() -> Catalog:
    return load_catalog()


def _map_all(records: list[dict[str, Any]], end: datetime) -> list[Measurement]:
    measurements: list[Measurement] = []
    for r in records:
        ctx = MappingContext(
            "synthetic-app", r["record_id"], "Patient/p-1", device_full_url("synthetic-app"), end
        )
        result = _catalog().map(r["measure"], r["data"], ctx)
        assert result.ok, (r["measure"], result.rejections)
        measurements += result.measurements
    return measurements


def _series(measurements: list[Measurement], code: str) -> list[tuple[datetime, float]]:
    return sorted((m.time, m.value) for m in measurements if m.code == code)


def _times(record: dict[str, Any]) -> list[datetime]:
    data = record["data"]
    keys = [k for k in ("authored", "time", "start", "end") if k in data]
    if keys:
        return [datetime.fromisoformat(data[k]) for k in keys]
    return []


def test_five_stories_in_contract_order_each_in_a_real_non_utc_zone() -> None:
    keys = [s.key for s in stories()]
    assert keys == ["responder", "non-responder", "silent", "safety", "alliance-drop"]
    assert story("silent") is stories()[2]
    assert all(s.label and s.tz not in ("UTC", "Etc/UTC") for s in stories())
    assert {s.key: s.expected_alerts for s in stories()} == {
        "responder": (),
        "non-responder": ("no-response",),
        "silent": ("disengagement",),
        "safety": ("safety-item9",),
        "alliance-drop": ("alliance-drop",),
    }
    with pytest.raises(KeyError, match="known: responder"):
        story("nobody")


@pytest.mark.parametrize("end", ENDS, ids=lambda e: e.date().isoformat())
@pytest.mark.parametrize("days", [120, 70])
@pytest.mark.parametrize("s", stories(), ids=lambda s: s.key)
def test_every_record_maps_without_rejection_inside_the_window_in_the_story_zone(
    s: Story, days: int, end: datetime
) -> None:
    records = generate(s, app_user_id="user-1", days=days, end=end)
    _map_all(records, end)
    start = end - timedelta(days=days)
    offsets = set()
    for r in records:
        assert set(r) == {"record_id", "app_user_id", "measure", "data"}
        assert r["app_user_id"] == "user-1"
        for t in _times(r):
            assert start <= t <= end, r
            offsets.add(t.utcoffset())
            assert t.utcoffset() == t.astimezone(ZoneInfo(s.tz)).utcoffset(), r
    assert timedelta(0) not in offsets
    measures = {r["measure"] for r in records}
    assert measures == {"steps-daily", "sleep-duration", "app-engagement", "mood", "phq9", "gad7", "dwai"}


def test_same_call_same_records_and_ids_unique_and_seeded() -> None:
    end = ENDS[0]
    one = generate("safety", app_user_id="u-9", end=end, seed=3)
    assert one == generate("safety", app_user_id="u-9", end=end, seed=3)
    assert one == generate(story("safety"), app_user_id="u-9", end=end, seed=3)
    assert len({r["record_id"] for r in one}) == len(one)
    other_seed = generate("safety", app_user_id="u-9", end=end, seed=4)
    assert {r["record_id"] for r in one}.isdisjoint(r["record_id"] for r in other_seed)
    other_user = generate("safety", app_user_id="u-10", end=end, seed=3)
    assert {r["record_id"] for r in one}.isdisjoint(r["record_id"] for r in other_user)


def test_records_are_in_time_order_and_end_defaults_to_now() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    records = generate("non-responder", app_user_id="u", days=30)
    after = datetime.now(UTC)
    assert records
    instants = [_instant(r, story("non-responder")) for r in records]
    assert instants == sorted(instants)
    assert before - timedelta(days=30) <= instants[0] and instants[-1] <= after


def _instant(r: dict[str, Any], s: Story) -> datetime:
    """When the app had the record: a day's steps at the end of that local day, otherwise its last time."""
    if r["measure"] == "steps-daily":
        return datetime.fromisoformat(r["data"]["date"] + "T23:59:59").replace(tzinfo=ZoneInfo(s.tz))
    return max(_times(r))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        generate("responder", app_user_id="u", end=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="days"):
        generate("responder", app_user_id="u", days=0)
    with pytest.raises(KeyError):
        generate("nobody", app_user_id="u")


SHAPE_CASES = [(s, days, seed) for s in stories() for days in (120, 70) for seed in range(4)]


@pytest.mark.parametrize(
    ("s", "days", "seed"), SHAPE_CASES, ids=[f"{s.key}-{d}d-seed{n}" for s, d, n in SHAPE_CASES]
)
def test_story_shapes_fire_exactly_the_expected_rules(s: Story, days: int, seed: int) -> None:
    end = ENDS[seed % len(ENDS)]
    records = generate(s, app_user_id=f"user-{seed}", days=days, end=end, seed=seed)
    measurements = _map_all(records, end)
    phq = _series(measurements, "phq9.total")
    item9 = _series(measurements, "phq9.item9")
    dwai = _series(measurements, "dwai.total")
    start = end - timedelta(days=days)
    fired: set[str] = set()

    # Baseline: the first PHQ-9, at the start of the window.
    baseline_time, baseline = phq[0]
    assert baseline == BASELINES[s.key]
    assert baseline_time - start < timedelta(days=1)
    assert all(value < 20 for _, value in phq), "never severe"

    # PHQ-9 weekly with 1-2 missed weeks; GAD-7 and D-WAI fortnightly.
    weeks = round((phq[-1][0] - baseline_time).days / 7) + 1
    assert 1 <= weeks - len(phq) <= 2
    for code in ("gad7.total", "dwai.total"):
        gaps = [
            b[0] - a[0]
            for a, b in zip(_series(measurements, code), _series(measurements, code)[1:], strict=False)
        ]
        assert all(timedelta(days=13) < g < timedelta(days=15) for g in gaps), code

    # Response at and after week 8.
    late = [v for t, v in phq if t - baseline_time >= timedelta(days=56)]
    # (With 70 days the silent story stops on day 56, so it may have no answer from week 8.)
    assert late or s.key == "silent", "a PHQ-9 at or after week 8"
    if any((baseline - v) / baseline < 0.5 for v in late):
        fired.add("no-response")
    if s.key == "non-responder":
        assert all(12 <= v <= 16 for _, v in phq)
    elif late:
        assert (baseline - late[0]) / baseline >= 0.5

    # Item 9.
    positives = [(t, v) for t, v in item9 if v >= 1]
    if positives:
        fired.add("safety-item9")
        assert s.key == "safety"
        assert positives == [item9[-1]] and positives[0][1] == 1
        assert end - positives[0][0] <= timedelta(days=10)
        last_total = phq[-1][1]
        assert last_total < 20 and (baseline - last_total) / baseline >= 0.5

    # Gaps in all data (including the time from the last record to the end of the window).
    instants = [*sorted(_instant(r, s) for r in records), end]
    longest = max(b - a for a, b in pairwise(instants))
    if longest >= timedelta(days=7):
        fired.add("disengagement")
    if s.key == "silent":
        assert all(t <= end - timedelta(days=14) for r in records for t in _times(r))
        assert end - instants[-2] < timedelta(days=15)
    else:
        assert longest < timedelta(days=3)

    # Working alliance: a fall of 6+ within 28 days.
    falls = [a[1] - b[1] for a in dwai for b in dwai if timedelta(0) < b[0] - a[0] <= timedelta(days=28)]
    if falls and max(falls) >= 6:
        fired.add("alliance-drop")
    if s.key == "alliance-drop":
        assert max(falls) >= 8
        assert dwai[0][1] <= 26 and max(v for _, v in dwai) >= 25
        drop_end = next(t for (t, v) in dwai if v <= max(v for _, v in dwai) - 8)
        week8 = min(v for t, v in phq if t - start >= timedelta(days=55))
        assert phq[-1][1] > week8, "symptoms worsen after week 8"
        assert all(v in (8, 9) for t, v in phq if t > drop_end), "worse than week 8 once the alliance fell"
    if s.key == "responder":
        assert dwai[-1][1] - dwai[0][1] >= 6, "alliance rising"

    assert fired == set(s.expected_alerts)


def test_alliance_drop_happens_between_days_70_and_98_with_120_days() -> None:
    end = ENDS[0]
    measurements = _map_all(generate("alliance-drop", app_user_id="u", end=end), end)
    dwai = _series(measurements, "dwai.total")
    start = end - timedelta(days=120)
    by_day = {round((t - start) / timedelta(days=1)): v for t, v in dwai}
    before = [v for d, v in by_day.items() if d <= 71]
    after = [v for d, v in by_day.items() if d >= 97]
    assert max(before[-1:]) >= 25 and min(after) <= before[-1] - 8
