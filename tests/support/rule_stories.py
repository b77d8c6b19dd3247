"""The five synthetic stories for the rules tests: ``fhir_bridge.sandbox.synthetic`` (the demo engineer's
generator) when it is installed, else the small stand-in histories below (native push records the real
mapping accepts, following the same contract).

Weekly PHQ-9 (weeks 3 and 11 missed), D-WAI every two weeks, daily steps; timestamps in the story's
own UTC offset. Deterministic: the same call gives identical records.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

EXPECTED: dict[str, tuple[str, ...]] = {
    "responder": (),
    "non-responder": ("no-response",),
    "silent": ("disengagement",),
    "safety": ("safety-item9",),
    "alliance-drop": ("alliance-drop",),
}
OFFSETS = {"responder": -6, "non-responder": -5, "silent": 1, "safety": -8, "alliance-drop": 9}


def _phq9_total(key: str, week: int) -> int:
    if key == "responder":
        return max(5, round(17 - 11 * min(week, 8) / 8))
    if key == "non-responder":
        return (15, 14, 16, 13, 15, 12, 14, 16, 15, 13, 14, 16, 15, 12, 14, 15, 13, 14)[week % 18]
    if key == "silent":
        return max(6, round(14 - 8 * min(week, 8) / 8))
    if key == "safety":
        return max(7, round(16 - 9 * min(week, 8) / 8))
    # alliance-drop: 18 -> 7 by week 8, then 8-9 (still >= 50 % down)
    return round(18 - 11 * week / 8) if week <= 8 else (8, 9)[week % 2]


def _dwai_total(key: str, day: int) -> int:
    if key == "alliance-drop":
        return 26 if day < 70 else max(18, 26 - (day - 70) * 8 // 28)
    if key == "responder":
        return min(28, 20 + day // 20)
    return 22 + (day // 14) % 2


def _phq9_answers(total: int, item9: int) -> dict[str, Any]:
    rest = total - item9
    answers: dict[str, Any] = {}
    for i in range(1, 9):
        score = min(3, rest)
        answers[f"item{i}"] = score
        rest -= score
    answers["item9"] = item9
    answers["difficulty"] = "LA6573-5"
    return answers


def _dwai_answers(total: int) -> dict[str, Any]:
    rest = total - 6
    answers: dict[str, Any] = {}
    for i in range(1, 7):
        extra = min(4, rest)
        answers[f"item{i}"] = 1 + extra
        rest -= extra
    return answers


def history(
    key: str, *, app_user_id: str, days: int = 120, end: datetime | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    end = (end or datetime.now(UTC)).astimezone(UTC)
    tz = timezone(timedelta(hours=OFFSETS[key]))
    start = end - timedelta(days=days)
    stop = end - timedelta(days=14) if key == "silent" else end
    records: list[dict[str, Any]] = []

    def add(measure: str, when: datetime, data: dict[str, Any]) -> None:
        if when > stop:
            return
        index = len(records)
        records.append(
            {
                "record_id": f"{key}-{app_user_id}-{seed}-{index}",
                "app_user_id": app_user_id,
                "measure": measure,
                "data": data,
                "_at": when,
            }
        )

    last_phq9_day = max(d for d in range(0, days + 1, 7) if d <= days - 1)
    for day in range(days + 1):
        moment = start + timedelta(days=day)
        local = moment.astimezone(tz).replace(hour=20, minute=30, second=0, microsecond=0)
        if local > end:
            local -= timedelta(days=1)
        if day % 7 == 0 and day // 7 not in (3, 11):
            week = day // 7
            item9 = 1 if key == "safety" and day == last_phq9_day else 0
            add(
                "phq9",
                local,
                {"authored": local.isoformat(), "answers": _phq9_answers(_phq9_total(key, week), item9)},
            )
        if day % 14 == 0:
            add(
                "dwai",
                local - timedelta(minutes=5),
                {
                    "authored": (local - timedelta(minutes=5)).isoformat(),
                    "answers": _dwai_answers(_dwai_total(key, day)),
                },
            )
        steps_day = local.date()
        if day % 9 != 4:  # an occasional missing day
            midnight = datetime(steps_day.year, steps_day.month, steps_day.day, tzinfo=UTC)
            add("steps-daily", midnight, {"date": steps_day.isoformat(), "steps": 6000 + (day * 733) % 4000})
    records.sort(key=lambda r: r["_at"])
    for record in records:
        del record["_at"]
    return records


Generator = Callable[..., list[dict[str, Any]]]


def source() -> tuple[dict[str, tuple[str, ...]], Generator]:
    """(story key -> expected rule ids, generate(key, *, app_user_id, end)): the real generator if present."""
    try:
        from fhir_bridge.sandbox import synthetic  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return EXPECTED, history
    expected = {story.key: tuple(story.expected_alerts) for story in synthetic.stories()}

    def generate(key: str, *, app_user_id: str, end: datetime | None = None) -> list[dict[str, Any]]:
        return list(synthetic.generate(key, app_user_id=app_user_id, end=end))

    return expected, generate
