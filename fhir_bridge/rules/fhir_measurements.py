"""Measurements from Observations a vendor pushes as FHIR (``/fhir``), so rules see them as they see
native records.

Only questionnaire scores and scored item Observations the catalogue defines are read (PHQ-9 total and
item 9, GAD-7 total, D-WAI totals, ...): their codes, from the catalogue, say which ledger code they
are, and their values are unit-free numbers (``valueInteger``, ``valueQuantity.value``, or, for an item,
a ``valueCodeableConcept`` whose answer code the catalogue scores). Device data pushed as FHIR (steps,
sleep) is not read as values: units vary between apps, and a wrong unit would make a rule fire on
nothing; it is recorded as ``fhir.observation`` = 1 at its time, so absence rules see the app is in use.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from mappings import Catalog, Measurement, load_catalog
from mappings.spec import QuestionnaireSpec

# Any other final Observation a vendor pushed as FHIR: only "the app sent data then" (value 1).
ACTIVITY = "fhir.observation"


@lru_cache(maxsize=1)
def _default_catalog() -> Catalog:
    # Codes and answer scores do not depend on the deployment's item text or tolerance settings.
    return load_catalog()


@lru_cache(maxsize=8)
def _tables(
    catalog: Catalog,
) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], dict[tuple[str, str], float]]]:
    """(system, code) -> ledger code; and for item Observations, answer (system, code) -> score."""
    codes: dict[tuple[str, str], str] = {}
    answers: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
    for measure in catalog.measures():
        spec = catalog.spec(measure)
        if not isinstance(spec, QuestionnaireSpec):
            continue
        for score in spec.scores:
            if score.measurement:
                for coding in score.code.codings:
                    codes[(coding.system, coding.code)] = score.measurement
        for item_obs in spec.item_observations:
            if not item_obs.measurement:
                continue
            item = next((i for i in spec.items if i.name == item_obs.item), None)
            scored = {
                (o.coding.system, o.coding.code): float(o.score)
                for o in (spec.answer_lists.get(item.answers, ()) if item is not None else ())
                if o.score is not None
            }
            for coding in item_obs.code.codings:
                codes[(coding.system, coding.code)] = item_obs.measurement
                answers[(coding.system, coding.code)] = scored
    return codes, answers


def _when(resource: dict[str, Any]) -> datetime | None:
    raw = resource.get("effectiveDateTime") or (resource.get("effectivePeriod") or {}).get("start")
    if not isinstance(raw, str) or "T" not in raw:
        return None  # a date without a time: no moment to evaluate as of
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _day(resource: dict[str, Any]) -> datetime | None:
    """A date-only effective time as midnight UTC (as the native mapping records measures by date)."""
    raw = resource.get("effectiveDateTime") or (resource.get("effectivePeriod") or {}).get("start")
    if not isinstance(raw, str) or len(raw) != 10:
        return None
    try:
        return datetime.fromisoformat(raw).replace(tzinfo=UTC)
    except ValueError:
        return None


def measurements_of(resource: dict[str, Any], catalog: Catalog | None = None) -> tuple[Measurement, ...]:
    """The ledger measurements one pushed FHIR resource carries (none for most)."""
    if resource.get("resourceType") == "QuestionnaireResponse":
        # Scored only when mapped natively; as FHIR it still says the app was used at that moment.
        authored = _when({"effectiveDateTime": resource.get("authored")})
        ok = resource.get("status") in ("completed", "amended") and authored is not None
        return (Measurement(ACTIVITY, authored, 1.0),) if ok and authored is not None else ()
    if resource.get("resourceType") != "Observation" or resource.get("status") not in (
        "final",
        "amended",
        "corrected",
    ):
        return ()
    codes, answers = _tables(catalog or _default_catalog())
    key: tuple[str, str] | None = None
    for coding in (resource.get("code") or {}).get("coding") or []:
        if isinstance(coding, dict) and (str(coding.get("system")), str(coding.get("code"))) in codes:
            key = (str(coding.get("system")), str(coding.get("code")))
            break
    when = _when(resource)
    if key is None:
        # Not a score, but data from the app all the same: absence rules (days_since_last("*")) must
        # see it, or a vendor pushing only device data as FHIR would look disengaged.
        moment = when or _day(resource)
        return (Measurement(ACTIVITY, moment, 1.0),) if moment is not None else ()
    if when is None:
        return ()
    value: float | None = None
    if isinstance(resource.get("valueInteger"), int) and not isinstance(resource.get("valueInteger"), bool):
        value = float(resource["valueInteger"])
    elif isinstance((resource.get("valueQuantity") or {}).get("value"), int | float):
        value = float(resource["valueQuantity"]["value"])
    elif key in answers:
        for coding in (resource.get("valueCodeableConcept") or {}).get("coding") or []:
            if isinstance(coding, dict) and (coding.get("system"), coding.get("code")) in answers[key]:
                value = answers[key][(coding["system"], coding["code"])]
                break
    if value is None:
        return ()
    return (Measurement(codes[key], when, value),)
