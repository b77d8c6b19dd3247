"""From the EHR's search pages to what the dashboard draws: series, markers, engagement, alerts.

This is the read path the benchmark measures, so it stays close to the cost of fetching the pages:
pages are parsed with orjson, resources are read as plain dicts (no ``fhir.resources`` validation),
and each Observation is looked at once. Whatever the EHR returns, a resource whose subject is not
the launched patient is dropped and counted, never shown (checklist F4, T10).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from mappings.identity import CANONICAL, CODE_SYSTEM_URL

LOINC = "http://loinc.org"
OUR_CODES = CODE_SYSTEM_URL


@dataclass(frozen=True)
class Measure:
    """One series the dashboard draws, and the codes its Observations carry."""

    key: str
    label: str
    unit: str
    codes: tuple[tuple[str, str], ...]
    # A component code to read instead of valueQuantity (e.g. one engagement metric of several).
    component: tuple[str, str] | None = None
    scale: float = 1.0


# Series keyed by (system, code). LOINC where it exists; our CodeSystem for D-WAI and engagement.
MEASURES: tuple[Measure, ...] = (
    Measure("phq9", "PHQ-9 total", "score", ((LOINC, "44261-6"),)),
    Measure("phq9_item9", "PHQ-9 item 9", "score", ((LOINC, "44260-8"),)),
    Measure("gad7", "GAD-7 total", "score", ((LOINC, "70274-6"),)),
    Measure("dwai_total", "D-WAI total", "score", ((OUR_CODES, "dwai-total"),)),
    # The themes the dwai mapping derives as Observations (the items themselves live only in the
    # QuestionnaireResponse): what the clinician reads as bond, tasks and goals.
    *(
        Measure(f"dwai_{theme}", f"D-WAI {label}", "score", ((OUR_CODES, f"dwai-{theme}"),))
        for theme, label in (("bond", "bond"), ("task", "tasks"), ("goal", "goals"))
    ),
    Measure("steps", "Steps per day", "steps", ((LOINC, "41950-7"),)),
    Measure("sleep", "Sleep", "h", ((LOINC, "93832-4"),)),
    Measure("mood", "Mood", "score", ((OUR_CODES, "mood-rating"),)),
    Measure(
        "engagement",
        "App use",
        "min",
        ((OUR_CODES, "app-engagement"),),
        component=(OUR_CODES, "active-minutes"),
    ),
)

_BY_CODE: dict[tuple[str, str], Measure] = {c: m for m in MEASURES for c in m.codes}
SEARCH_CODES = ",".join(f"{system}|{code}" for system, code in _BY_CODE)

# Severity bands (clinical-content.md 1.3 and 1.6): lower bound, label.
PHQ9_BANDS = ((0, "None-minimal"), (5, "Mild"), (10, "Moderate"), (15, "Moderately severe"), (20, "Severe"))
GAD7_BANDS = ((0, "Minimal"), (5, "Mild"), (10, "Moderate"), (15, "Severe"))
_SLEEP_UNITS = {"h": 1.0, "hour": 1.0, "hours": 1.0, "min": 1 / 60, "minutes": 1 / 60, "s": 1 / 3600}


def _instant(text: Any) -> float | None:
    """Epoch milliseconds of a FHIR date/dateTime/instant (a date alone is noon UTC of that day)."""
    if not isinstance(text, str) or len(text) < 4:
        return None
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp() * 1000
        if len(text) < 10:
            return None
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() * 1000


def _when(resource: Mapping[str, Any]) -> float | None:
    when = resource.get("effectiveDateTime")
    if when is None:
        period = resource.get("effectivePeriod")
        if isinstance(period, dict):
            when = period.get("end") or period.get("start")
    if when is None:
        when = resource.get("effectiveInstant") or resource.get("issued")
    return _instant(when)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _value(resource: Mapping[str, Any], measure: Measure) -> float | None:
    if measure.component is not None:
        for component in resource.get("component") or ():
            if not isinstance(component, dict):
                continue
            for coding in (component.get("code") or {}).get("coding") or ():
                if (
                    isinstance(coding, dict)
                    and (coding.get("system"), coding.get("code")) == measure.component
                ):
                    quantity = component.get("valueQuantity")
                    if isinstance(quantity, dict):
                        return _number(quantity.get("value"))
                    return _number(component.get("valueInteger"))
        return None
    quantity = resource.get("valueQuantity")
    if isinstance(quantity, dict):
        number = _number(quantity.get("value"))
        if number is not None and measure.key == "sleep":
            unit = quantity.get("code") or quantity.get("unit") or "h"
            factor = _SLEEP_UNITS.get(str(unit))
            return None if factor is None else round(number * factor, 2)
        return number
    if "valueInteger" in resource:
        return _number(resource.get("valueInteger"))
    string = resource.get("valueString")
    if isinstance(string, str):
        try:
            return _number(float(string))
        except ValueError:
            return None
    return None


def subject_is(resource: Mapping[str, Any], patient_id: str, fhir_base: str, *, key: str = "subject") -> bool:
    """Whether the resource's subject reference is exactly the launched patient."""
    ref = resource.get(key)
    if not isinstance(ref, dict):
        return False
    reference = ref.get("reference")
    if not isinstance(reference, str):
        return False
    return reference == f"Patient/{patient_id}" or reference == f"{fhir_base}/Patient/{patient_id}"


@dataclass
class Series:
    t: list[float] = field(default_factory=list)
    v: list[float] = field(default_factory=list)

    def sorted(self) -> Series:
        if all(self.t[i] <= self.t[i + 1] for i in range(len(self.t) - 1)):
            return self
        pairs = sorted(zip(self.t, self.v, strict=True))
        return Series([p[0] for p in pairs], [p[1] for p in pairs])


@dataclass
class ObservationDigest:
    """What the Observation pages became: one series per measure, the days with data, what was dropped."""

    series: dict[str, Series] = field(default_factory=dict)
    foreign: int = 0
    unreadable: int = 0
    total: int = 0


def digest_observations(
    pages: Iterable[Mapping[str, Any]], *, patient_id: str, fhir_base: str
) -> ObservationDigest:
    """Read search-result Bundles once: keep the launched patient's Observations of known measures."""
    out = ObservationDigest()
    series = out.series
    own = f"Patient/{patient_id}"
    own_abs = f"{fhir_base}/Patient/{patient_id}"
    for page in pages:
        for entry in page.get("entry") or ():
            if not isinstance(entry, dict):
                continue
            search = entry.get("search")
            if isinstance(search, dict) and search.get("mode") not in (None, "match"):
                continue
            resource = entry.get("resource")
            if not isinstance(resource, dict) or resource.get("resourceType") != "Observation":
                continue
            out.total += 1
            subject = resource.get("subject")
            reference = subject.get("reference") if isinstance(subject, dict) else None
            if reference != own and reference != own_abs:
                out.foreign += 1
                continue
            if resource.get("status") in {"entered-in-error", "cancelled"}:
                continue
            measure = None
            for coding in (resource.get("code") or {}).get("coding") or ():
                if isinstance(coding, dict):
                    measure = _BY_CODE.get((coding.get("system"), coding.get("code")))  # type: ignore[arg-type]
                    if measure is not None:
                        break
            if measure is None:
                continue
            when = _when(resource)
            value = _value(resource, measure)
            if when is None or value is None:
                out.unreadable += 1
                continue
            target = series.get(measure.key)
            if target is None:
                target = series[measure.key] = Series()
            target.t.append(when)
            target.v.append(value)
    for key, found in list(series.items()):
        series[key] = found.sorted()
    return out


# -- derived facts ----------------------------------------------------------------------------


def band(score: float, bands: tuple[tuple[int, str], ...]) -> str:
    label = bands[0][1]
    for low, name in bands:
        if score >= low:
            label = name
    return label


def phq9_markers(phq9: Series) -> dict[str, Any]:
    """Baseline, response (>= 50 % drop from baseline) and remission (< 5), clinical-content.md §6.1."""
    if not phq9.t:
        return {}
    baseline_t, baseline_v = phq9.t[0], phq9.v[0]
    markers: dict[str, Any] = {"baseline": {"t": baseline_t, "v": baseline_v}}
    for t, v in zip(phq9.t[1:], phq9.v[1:], strict=True):
        if "response" not in markers and baseline_v > 0 and v <= baseline_v * 0.5:
            markers["response"] = {"t": t, "v": v}
        if "remission" not in markers and v < 5 and baseline_v >= 5:
            markers["remission"] = {"t": t, "v": v}
    latest_v = phq9.v[-1]
    markers["latest"] = {"t": phq9.t[-1], "v": latest_v, "band": band(latest_v, PHQ9_BANDS)}
    if baseline_v > 0:
        markers["change_pct"] = round((latest_v - baseline_v) / baseline_v * 100)
    return markers


def engagement(digest: ObservationDigest, *, today: date) -> dict[str, Any]:
    """Days with any app data, the last day with data, and for how many days the app has been silent."""
    days: dict[str, float] = {}
    last: float | None = None
    for key, series in digest.series.items():
        for t, v in zip(series.t, series.v, strict=True):
            day = datetime.fromtimestamp(t / 1000, UTC).date().isoformat()
            if key == "engagement":
                days[day] = days.get(day, 0.0) + v
            else:
                days.setdefault(day, 0.0)
            if last is None or t > last:
                last = t
    silent = None
    if last is not None:
        silent = max(0, (today - datetime.fromtimestamp(last / 1000, UTC).date()).days)
    return {
        "days": [[day, round(minutes, 1)] for day, minutes in sorted(days.items())],
        "last_data": last,
        "silent_days": silent,
    }


def coded_text(concept: Any) -> str | None:
    if not isinstance(concept, dict):
        return None
    text = concept.get("text")
    if isinstance(text, str) and text:
        return text[:300]
    for coding in concept.get("coding") or ():
        if isinstance(coding, dict) and isinstance(coding.get("display"), str):
            return str(coding["display"])[:300]
    return None


def alert_items(
    pages: Iterable[Mapping[str, Any]], *, kind: str, patient_id: str, fhir_base: str, foreign: list[int]
) -> list[dict[str, Any]]:
    """Open Flags or Tasks about the launched patient, as plain text for the alerts panel."""
    items: list[dict[str, Any]] = []
    for page in pages:
        for entry in page.get("entry") or ():
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict) or resource.get("resourceType") != kind:
                continue
            key = "subject" if kind == "Flag" else "for"
            if not subject_is(resource, patient_id, fhir_base, key=key):
                foreign[0] += 1
                continue
            status = resource.get("status")
            if kind == "Flag" and status != "active":
                continue
            if kind == "Task" and status in {
                "completed",
                "cancelled",
                "entered-in-error",
                "rejected",
                "failed",
            }:
                continue
            ours = any(
                isinstance(i, dict) and str(i.get("system", "")).startswith(CANONICAL)
                for i in resource.get("identifier") or ()
            )
            when = (
                (resource.get("period") or {}).get("start") if kind == "Flag" else resource.get("authoredOn")
            )
            items.append(
                {
                    "kind": kind,
                    "id": str(resource.get("id", ""))[:64],
                    "text": coded_text(resource.get("code")) or resource.get("description") or kind,
                    "description": str(resource.get("description") or "")[:500] if kind == "Task" else "",
                    "priority": resource.get("priority") if kind == "Task" else None,
                    "status": status,
                    "category": coded_text((resource.get("category") or [None])[0])
                    if kind == "Flag"
                    else None,
                    "at": _instant(when),
                    "from_bridge": ours,
                }
            )
    return items


def to_json_series(digest: ObservationDigest) -> dict[str, Any]:
    return {key: {"t": s.t, "v": s.v} for key, s in digest.series.items()}


def today_utc() -> date:
    return datetime.now(UTC).date()


def window_start(days: int) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)
