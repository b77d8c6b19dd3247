"""Progress toward measurable goals, from the data the bridge accepted.

One function answers "what is the latest value of this measure for this patient":
:func:`note_accepted` keeps it on the goal as records are accepted (the push path calls
:func:`fhir_bridge.relationship.tasks.on_accepted`, which calls it). When the rules engine's
measurement ledger lands, :func:`latest` is the one place to read it from instead.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fhir_bridge.relationship.measures import LOINC, MEASURES
from fhir_bridge.storage.models import Goal

ACTIVE = ("proposed", "active", "on-hold")


def value_of(resource: dict[str, Any], code: str) -> float | None:
    """The numeric value of an Observation coded ``code`` (LOINC), or None."""
    if resource.get("resourceType") != "Observation":
        return None
    codings = (resource.get("code") or {}).get("coding") or []
    if not any(c.get("system") == LOINC and c.get("code") == code for c in codings if isinstance(c, dict)):
        return None
    if isinstance(resource.get("valueInteger"), int):
        return float(resource["valueInteger"])
    quantity = resource.get("valueQuantity") or {}
    value = quantity.get("value")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def effective(resource: dict[str, Any]) -> str:
    when = resource.get("effectiveDateTime") or (resource.get("effectivePeriod") or {}).get("start") or ""
    return when if isinstance(when, str) else ""


def note_accepted(goals: list[Goal], resources: list[dict[str, Any]], now: datetime) -> list[Goal]:
    """Record on ``goals`` (one patient's measurable, live goals) the newest value of each one's
    measure found in ``resources``; returns the goals that changed."""
    changed: list[Goal] = []
    for goal in goals:
        measure = MEASURES.get(goal.measure or "")
        if measure is None:
            continue
        found = [(effective(r), v) for r in resources if (v := value_of(r, measure.code)) is not None]
        if not found:
            continue
        when, value = max(found)
        taken = _parse(when) or now
        if goal.latest_at is None or taken >= goal.latest_at:
            goal.latest_value, goal.latest_at = value, taken
            goal.updated_at = now  # vendors polling with a cursor see the new progress
            changed.append(goal)
    return changed


def _parse(text: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else None


def latest(goal: Goal) -> tuple[float, datetime] | None:
    """The latest accepted value of the goal's measure and when it was taken, or None."""
    if goal.latest_value is None or goal.latest_at is None:
        return None
    return goal.latest_value, goal.latest_at


def summary(goal: Goal) -> dict[str, Any] | None:
    """What the dashboard and the vendor see: latest value, and whether the target is met."""
    if not goal.measure or goal.comparator is None or goal.target_value is None:
        return None
    now_value = latest(goal)
    if now_value is None:
        return {"latest": None, "at": None, "met": False}
    value, at = now_value
    target = goal.target_value
    met = {
        "<": value < target,
        "<=": value <= target,
        ">=": value >= target,
        ">": value > target,
    }[goal.comparator]
    return {"latest": value, "at": at.isoformat().replace("+00:00", "Z"), "met": met}
