"""Synthetic app users with clinical stories: the native push records a mental-health app would send.

DEVELOPMENT, DEMO AND TEST DATA ONLY. Pure and deterministic (no I/O, no database, no clock unless
``end`` is left out), so ``fhir-bridge demo``, the rules tests and the benchmarks all see the same
people. Each of the five stories is built so that exactly its ``expected_alerts`` fire under the
default rule thresholds whenever ``days >= 70``; the shapes (baseline, % change at week 8, silent
gap, item 9, D-WAI drop) are pinned by ``tests/unit/sandbox/test_synthetic.py``. The contract is
``/work/briefs/stories.md`` (summarised in docs/architecture.md, "Synthetic stories").

How the numbers are made: one :class:`random.Random` per (story, user, seed) drives the noise, drawn
in a fixed order, so the same call returns the same records. Trajectories are a target curve plus
small noise, then clamped to the bounds the story promises (e.g. "never >= 20"), so no seed and no
``end`` can break a story. Times are local wall-clock times in the story's IANA zone (never UTC),
written with the offset that applies that day (DST included), and avoid the hours a DST switch skips
or repeats.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

PHQ9_ITEMS = tuple(f"item{i}" for i in range(1, 10))
GAD7_ITEMS = tuple(f"item{i}" for i in range(1, 8))
DWAI_ITEMS = tuple(f"item{i}" for i in range(1, 7))
WEEK_8 = 56
SILENT_DAYS = 14  # the silent story sends nothing in the final 14 days


@dataclass(frozen=True)
class Story:
    """One synthetic person's course: what a demo viewer reads, where they live, what must fire."""

    key: str
    label: str
    tz: str
    expected_alerts: tuple[str, ...]


_STORIES: tuple[Story, ...] = (
    Story("responder", "Responder: PHQ-9 halves by week 8, alliance rising", "America/Chicago", ()),
    Story(
        "non-responder",
        "Non-responder: flat PHQ-9 after 8 weeks",
        "Europe/Berlin",
        ("no-response",),
    ),
    Story("silent", "Silent: all data stopped two weeks ago", "Asia/Kolkata", ("disengagement",)),
    Story(
        "safety",
        "Safety: PHQ-9 item 9 turned positive at the last check",
        "Australia/Sydney",
        ("safety-item9",),
    ),
    Story(
        "alliance-drop",
        "Alliance drop: D-WAI falls before symptoms worsen",
        "America/Sao_Paulo",
        ("alliance-drop",),
    ),
)


def stories() -> tuple[Story, ...]:
    """The five stories, in contract order (patient N of a demo gets ``stories()[N % 5]``)."""
    return _STORIES


def story(key: str) -> Story:
    """The story named ``key``; ``KeyError`` naming the known keys otherwise."""
    return _find(key)


def _find(key: str) -> Story:
    for s in _STORIES:
        if s.key == key:
            return s
    raise KeyError(f"unknown story {key!r}; known: {', '.join(s.key for s in _STORIES)}")


@dataclass(frozen=True)
class _Shape:
    """The numbers behind a story (private: the contract is :class:`Story` and the records)."""

    phq9: Callable[[int, int, random.Random], int]  # (day, days, rng) -> total
    dwai: Callable[[int, int, random.Random], int]  # (day, days, rng) -> total 6-30
    steps: int  # typical weekday steps
    engagement: Callable[[int, int], float]  # (day, days) -> probability of using the app that day


def _lerp(day: float, d0: float, v0: float, d1: float, v1: float) -> float:
    if day <= d0:
        return v0
    if day >= d1:
        return v1
    return v0 + (v1 - v0) * (day - d0) / (d1 - d0)


def _noise(rng: random.Random) -> int:
    return rng.choice((-1, 0, 0, 1))


def _clamp(value: float, low: int, high: int) -> int:
    return max(low, min(high, round(value)))


def _alliance_drop_start(days: int) -> int:
    """Day the alliance starts to fall: ~70 with 120 days, earlier for short windows so it still shows.

    D-WAI is answered on days 14, 28, ...; the drop spans two of those (28 days) and must end on one
    that lies inside the window, the last of which may fall after ``end`` on its day.
    """
    return max(14, min(70, 14 * ((days - 1) // 14) - 28))


def _phq_responder(day: int, days: int, rng: random.Random) -> int:
    if day == 0:
        return 17
    target = _lerp(day, 0, 17, WEEK_8, 6) if day <= WEEK_8 else _lerp(day, WEEK_8, 6, 120, 4)
    return _clamp(target + _noise(rng), 0, 7 if day >= WEEK_8 else 19)


def _phq_non_responder(day: int, days: int, rng: random.Random) -> int:
    if day == 0:
        return 15
    return _clamp(_lerp(day, 0, 15, 28, 14) + _noise(rng), 12, 16)


def _phq_silent(day: int, days: int, rng: random.Random) -> int:
    if day == 0:
        return 14
    target = _lerp(day, 0, 14, WEEK_8, 6) if day <= WEEK_8 else 5
    return _clamp(target + _noise(rng), 0, 7 if day >= WEEK_8 else 19)


def _phq_safety(day: int, days: int, rng: random.Random) -> int:
    if day == 0:
        return 16
    target = _lerp(day, 0, 16, WEEK_8, 7)
    return _clamp(target + _noise(rng), 0, 8 if day >= WEEK_8 else 19)


def _phq_alliance_drop(day: int, days: int, rng: random.Random) -> int:
    if day == 0:
        return 18
    worsens = max(WEEK_8 + 7, _alliance_drop_start(days) + 35)
    if day >= worsens:
        return 8  # worse than week 8, still 50 % below baseline: no `no-response`
    if day >= WEEK_8:
        return 7
    return _clamp(_lerp(day, 0, 18, WEEK_8, 7) + _noise(rng), 7, 19)


def _dwai_rising(day: int, days: int, rng: random.Random) -> int:
    return _clamp(_lerp(day, 14, 17, max(42, min(98, days - 14)), 27) + _noise(rng), 6, 30)


def _dwai_flat(day: int, days: int, rng: random.Random) -> int:
    return _clamp(20 + _noise(rng), 6, 30)


def _dwai_alliance_drop(day: int, days: int, rng: random.Random) -> int:
    """No noise: the fall must be the only fall. 26 at the start, -2 two weeks on, -10 at four weeks.

    The big step lies between two answers 14 days apart, so a "fall of 6 within 28 days" rule sees it
    whatever the times of day (answers 28 days apart may be a few minutes more than 28 days apart).
    """
    start = _alliance_drop_start(days)
    if day <= start:
        return _clamp(_lerp(day, 14, 24, start, 26), 6, 30)
    return 24 if day <= start + 14 else 16


def _engaged(p: float) -> Callable[[int, int], float]:
    return lambda day, days: p


def _engagement_alliance(day: int, days: int) -> float:
    return 0.9 if day < _alliance_drop_start(days) else 0.45


def _engagement_silent(day: int, days: int) -> float:
    return 0.85 if day < days - SILENT_DAYS - 21 else 0.4


_SHAPES: dict[str, _Shape] = {
    "responder": _Shape(_phq_responder, _dwai_rising, 7800, _engaged(0.9)),
    "non-responder": _Shape(_phq_non_responder, _dwai_flat, 4200, _engaged(0.75)),
    "silent": _Shape(_phq_silent, _dwai_flat, 6500, _engagement_silent),
    "safety": _Shape(_phq_safety, _dwai_rising, 5600, _engaged(0.85)),
    "alliance-drop": _Shape(_phq_alliance_drop, _dwai_alliance_drop, 6900, _engagement_alliance),
}


class _Builder:
    """Collects (time, measure, data) for one call, dropping anything outside the window."""

    def __init__(self, tz: ZoneInfo, start: datetime, end: datetime, cutoff: datetime) -> None:
        self.tz = tz
        self.start = start
        self.end = end
        self.cutoff = cutoff  # nothing later than this (the silent story's last day), <= end
        self.items: list[tuple[datetime, int, str, dict[str, Any]]] = []

    def local(self, day: date, hour: int, minute: int, second: int = 0) -> datetime:
        return datetime.combine(day, time(hour, minute, second), self.tz)

    def inside(self, *times: datetime) -> bool:
        return all(self.start <= t <= self.cutoff for t in times)

    def add(self, at: datetime, measure: str, data: dict[str, Any]) -> None:
        self.items.append((at, len(self.items), measure, data))


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def _spread(total: int, names: tuple[str, ...], low: int, high: int, rng: random.Random) -> dict[str, int]:
    """Split a questionnaire total over its items (each ``low``-``high``), at random but exactly."""
    scores = dict.fromkeys(names, low)
    remaining = total - low * len(names)
    while remaining > 0:
        name = rng.choice([n for n in names if scores[n] < high])
        scores[name] += 1
        remaining -= 1
    return scores


def _phq9_answers(total: int, item9: int, rng: random.Random) -> dict[str, int | str]:
    answers: dict[str, int | str] = dict(_spread(total - item9, PHQ9_ITEMS[:8], 0, 3, rng))
    answers["item9"] = item9
    answers["difficulty"] = (
        "LA6572-7" if total < 5 else "LA6573-5" if total < 10 else "LA6575-0" if total < 20 else "LA6574-3"
    )
    return answers


def _missed_weeks(weeks: int, rng: random.Random) -> set[int]:
    """1-2 skipped PHQ-9 weeks: never the baseline, week 8, or the last two weeks of the window."""
    early = [w for w in range(2, 7) if w < weeks - 2]
    late = [w for w in range(10, weeks - 2)]
    missed = {rng.choice(early)} if early else set()
    if late and rng.random() < 0.7:
        missed.add(rng.choice(late))
    return missed


def generate(
    story: Story | str,
    *,
    app_user_id: str,
    days: int = 120,
    end: datetime | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Native push records ``{record_id, app_user_id, measure, data}`` for one user, in time order.

    They cover ``[end - days, end]`` (``end`` defaults to now; it must be timezone-aware). Record ids
    come from (story, user, seed, index), so replaying the same call yields identical records and a
    re-push is a no-op for the bridge.
    """
    s = _find(story) if isinstance(story, str) else story
    if days < 1:
        raise ValueError("days must be at least 1")
    end = end if end is not None else datetime.now(UTC)
    if end.tzinfo is None:
        raise ValueError("end must be timezone-aware")
    end = end.replace(microsecond=0)
    start = end - timedelta(days=days)
    cutoff = end - timedelta(days=SILENT_DAYS) if s.key == "silent" else end
    shape = _SHAPES[s.key]
    tz = ZoneInfo(s.tz)
    rng = random.Random(f"{s.key}|{app_user_id}|{seed}")  # noqa: S311 - reproducible test data, not secrets
    b = _Builder(tz, start, end, cutoff)
    first_day = start.astimezone(tz).date()
    last_day = end.astimezone(tz).date()
    n_days = (last_day - first_day).days
    missed = _missed_weeks((n_days - 1) // 7 + 1, rng)
    # Questionnaires are answered on the mornings of days 0, 7, 14 ... before the end's local day, so
    # the last one is known in advance (the safety story's positive item 9) and lies before ``end``.
    q_days = [d for d in range(0, n_days, 7) if d // 7 not in missed]
    last_phq9_day = max(q_days) if q_days else 0
    steps_missing_yesterday = False
    phq_now = 0  # the latest PHQ-9 course value, for the mood ratings

    for d in range(n_days + 1):
        day = first_day + timedelta(days=d)
        weekend = day.weekday() >= 5
        # Every day draws all its randomness, used or not: one measure's gaps never shift another's noise.
        r_sleep = (
            rng.randint(22, 23),
            rng.randint(0, 59),
            rng.randint(0, 40),
            rng.randint(8, 45),
            rng.random(),
        )
        r_steps = (rng.gauss(1.0, 0.18), rng.random())
        r_mood = (rng.randint(18, 21), rng.randint(0, 59), rng.random(), _noise(rng))
        r_use = (rng.random(), rng.randint(1, 5), rng.randint(4, 45), rng.randint(0, 2), rng.randint(0, 8))
        r_q = (rng.randint(8, 10), rng.randint(0, 59))

        # Sleep ending this morning: bed 22:00-23:59 the evening before, up 06:15-07:35 (+45 min at weekends).
        bed = b.local(day - timedelta(days=1), r_sleep[0], r_sleep[1])
        up = b.local(day, 6, 15 + r_sleep[2]) + timedelta(minutes=45 if weekend else 0)
        if r_sleep[4] > 0.08 and b.inside(bed, up):
            in_bed = int((up.astimezone(UTC) - bed.astimezone(UTC)).total_seconds() // 60)
            asleep = max(0, in_bed - r_sleep[3])
            b.add(
                up,
                "sleep-duration",
                {"start": _iso(bed), "end": _iso(up), "duration": {"value": asleep, "unit": "min"}},
            )

        # Steps of the whole local day, sent just before midnight; never two missing days in a row.
        day_end = b.local(day, 23, 59, 59)
        missing = r_steps[1] < 0.06 and not steps_missing_yesterday
        steps_missing_yesterday = missing
        if not missing and b.inside(b.local(day, 0, 0), day_end):
            typical = shape.steps * (0.8 if weekend else 1.0)
            b.add(
                day_end,
                "steps-daily",
                {"date": day.isoformat(), "steps": max(300, round(typical * r_steps[0]))},
            )

        # App use that local day (a day with DST has 23 or 25 hours: the period says so).
        if r_use[0] < shape.engagement(d, n_days):
            period_start = b.local(day, 0, 0)
            period_end = b.local(day + timedelta(days=1), 0, 0)
            if b.inside(period_start, period_end):
                b.add(
                    period_end,
                    "app-engagement",
                    {
                        "start": _iso(period_start),
                        "end": _iso(period_end),
                        "active_minutes": r_use[2],
                        "sessions": r_use[1],
                        "modules_completed": r_use[3],
                        "messages_exchanged": r_use[4],
                    },
                )

        # Questionnaires in the morning: PHQ-9 weekly, GAD-7 and D-WAI fortnightly.
        if d % 7 == 0 and d < n_days:
            at = b.local(day, r_q[0], r_q[1])
            week = d // 7
            if d == 0 and at < start:  # the baseline opens the window
                at = (start + timedelta(seconds=59)).replace(second=0).astimezone(tz)
            total = phq_now = shape.phq9(d, n_days, rng)
            if week not in missed and b.inside(at):
                item9 = 1 if s.key == "safety" and d == last_phq9_day else 0
                b.add(at, "phq9", {"authored": _iso(at), "answers": _phq9_answers(total, item9, rng)})
            if week % 2 == 0:
                gad = _clamp(total * 0.75 + _noise(rng), 0, 21)
                gad_at = at + timedelta(minutes=6)
                if b.inside(gad_at):
                    b.add(
                        gad_at,
                        "gad7",
                        {"authored": _iso(gad_at), "answers": _spread(gad, GAD7_ITEMS, 0, 3, rng)},
                    )
                if d > 0:
                    dwai = shape.dwai(d, n_days, rng)
                    dwai_at = at + timedelta(minutes=11)
                    if b.inside(dwai_at):
                        b.add(
                            dwai_at,
                            "dwai",
                            {"authored": _iso(dwai_at), "answers": _spread(dwai, DWAI_ITEMS, 1, 5, rng)},
                        )

        # Mood check-in most evenings (a worse PHQ-9 course, a lower mood).
        if r_mood[2] < 0.85:
            at = b.local(day, r_mood[0], r_mood[1])
            if b.inside(at):
                b.add(
                    at, "mood", {"time": _iso(at), "rating": _clamp(8.5 - phq_now * 0.3 + r_mood[3], 0, 10)}
                )

    b.items.sort(key=lambda item: (item[0].astimezone(UTC), item[1]))
    return [
        {
            "record_id": _record_id(s.key, app_user_id, seed, index),
            "app_user_id": app_user_id,
            "measure": measure,
            "data": data,
        }
        for index, (_, _, measure, data) in enumerate(b.items)
    ]


def _record_id(key: str, app_user_id: str, seed: int, index: int) -> str:
    digest = hashlib.sha256(f"{key}\x1f{app_user_id}\x1f{seed}\x1f{index}".encode()).hexdigest()
    return f"syn-{digest[:28]}"
