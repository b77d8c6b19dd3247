"""The search parameters the sandbox supports, per resource type, and how each is indexed.

Only standard FHIR R4 parameter names and meanings are used (http://hl7.org/fhir/R4/searchparameter-registry.html),
so an app that works against the sandbox asks nothing of a real EHR that R4 does not define. A
parameter the sandbox does not know is refused with 400 rather than silently ignored: an ignored
filter returns other patients' data, which is exactly what a demo must never hide.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from fhir_bridge.sandbox.fhirdates import DateFormatError, parse_range

Kind = Literal["token", "reference", "date", "string", "uri"]

# Open ends of a Period: far outside any real date but inside a signed 64-bit integer.
MIN_US = -(2**62)
MAX_US = 2**62


@dataclass(frozen=True)
class SearchParam:
    name: str
    kind: Kind
    paths: tuple[str, ...]
    # Reference parameters: only references to these types are indexed (empty: any type).
    targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class IndexRow:
    param: str
    system: str | None = None
    code: str | None = None
    value: str | None = None
    lo: int | None = None
    hi: int | None = None


def _p(name: str, kind: Kind, *paths: str, targets: tuple[str, ...] = ()) -> SearchParam:
    return SearchParam(name, kind, paths, targets)


_PATIENT = ("Patient",)

PARAMS: dict[str, tuple[SearchParam, ...]] = {
    "Observation": (
        _p("patient", "reference", "subject", targets=_PATIENT),
        _p("subject", "reference", "subject"),
        _p("code", "token", "code"),
        _p("category", "token", "category"),
        _p("date", "date", "effectiveDateTime", "effectivePeriod", "effectiveInstant"),
        _p("status", "token", "status"),
        _p("identifier", "token", "identifier"),
        _p("encounter", "reference", "encounter"),
        _p("derived-from", "reference", "derivedFrom"),
        _p("device", "reference", "device"),
        _p("performer", "reference", "performer"),
        _p("based-on", "reference", "basedOn"),
        _p("has-member", "reference", "hasMember"),
    ),
    "QuestionnaireResponse": (
        _p("patient", "reference", "subject", targets=_PATIENT),
        _p("subject", "reference", "subject"),
        _p("questionnaire", "uri", "questionnaire"),
        _p("status", "token", "status"),
        _p("authored", "date", "authored"),
        _p("identifier", "token", "identifier"),
        _p("encounter", "reference", "encounter"),
        _p("author", "reference", "author"),
        _p("source", "reference", "source"),
        _p("based-on", "reference", "basedOn"),
    ),
    "Patient": (
        _p("identifier", "token", "identifier"),
        _p("name", "string", "name"),
        _p("family", "string", "name.family"),
        _p("given", "string", "name.given"),
        _p("birthdate", "date", "birthDate"),
        _p("gender", "token", "gender"),
        _p("active", "token", "active"),
        _p("general-practitioner", "reference", "generalPractitioner"),
    ),
    "Practitioner": (
        _p("identifier", "token", "identifier"),
        _p("name", "string", "name"),
        _p("family", "string", "name.family"),
        _p("given", "string", "name.given"),
        _p("active", "token", "active"),
    ),
    "PractitionerRole": (
        _p("identifier", "token", "identifier"),
        _p("practitioner", "reference", "practitioner"),
        _p("organization", "reference", "organization"),
        _p("role", "token", "code"),
        _p("active", "token", "active"),
    ),
    "Organization": (
        _p("identifier", "token", "identifier"),
        _p("name", "string", "name", "alias"),
        _p("active", "token", "active"),
    ),
    "Encounter": (
        _p("patient", "reference", "subject", targets=_PATIENT),
        _p("subject", "reference", "subject"),
        _p("status", "token", "status"),
        _p("class", "token", "class"),
        _p("type", "token", "type"),
        _p("date", "date", "period"),
        _p("identifier", "token", "identifier"),
        _p("participant", "reference", "participant.individual"),
        _p("practitioner", "reference", "participant.individual", targets=("Practitioner",)),
    ),
    "Device": (
        _p("patient", "reference", "patient", targets=_PATIENT),
        _p("identifier", "token", "identifier"),
        _p("status", "token", "status"),
        _p("type", "token", "type"),
        _p("device-name", "string", "deviceName.name"),
        _p("manufacturer", "string", "manufacturer"),
        _p("organization", "reference", "owner"),
    ),
    "Provenance": (
        _p("target", "reference", "target"),
        _p("patient", "reference", "target", targets=_PATIENT),
        _p("agent", "reference", "agent.who"),
        _p("entity", "reference", "entity.what"),
        _p("recorded", "date", "recorded"),
    ),
    "Flag": (
        _p("patient", "reference", "subject", targets=_PATIENT),
        _p("subject", "reference", "subject"),
        _p("date", "date", "period"),
        _p("identifier", "token", "identifier"),
        _p("author", "reference", "author"),
        _p("encounter", "reference", "encounter"),
    ),
    "Task": (
        _p("patient", "reference", "for", targets=_PATIENT),
        _p("subject", "reference", "for"),
        _p("status", "token", "status"),
        _p("business-status", "token", "businessStatus"),
        _p("intent", "token", "intent"),
        _p("priority", "token", "priority"),
        _p("code", "token", "code"),
        _p("identifier", "token", "identifier"),
        _p("authored-on", "date", "authoredOn"),
        _p("modified", "date", "lastModified"),
        _p("period", "date", "executionPeriod"),
        _p("focus", "reference", "focus"),
        _p("owner", "reference", "owner"),
        _p("requester", "reference", "requester"),
        _p("encounter", "reference", "encounter"),
        _p("based-on", "reference", "basedOn"),
        _p("part-of", "reference", "partOf"),
    ),
    "Goal": (
        _p("patient", "reference", "subject", targets=_PATIENT),
        _p("subject", "reference", "subject"),
        _p("lifecycle-status", "token", "lifecycleStatus"),
        _p("achievement-status", "token", "achievementStatus"),
        _p("category", "token", "category"),
        _p("identifier", "token", "identifier"),
        _p("start-date", "date", "startDate"),
        _p("target-date", "date", "target.dueDate"),
    ),
    "Communication": (
        _p("patient", "reference", "subject", targets=_PATIENT),
        _p("subject", "reference", "subject"),
        _p("status", "token", "status"),
        _p("category", "token", "category"),
        _p("medium", "token", "medium"),
        _p("identifier", "token", "identifier"),
        _p("sent", "date", "sent"),
        _p("received", "date", "received"),
        _p("sender", "reference", "sender"),
        _p("recipient", "reference", "recipient"),
        _p("encounter", "reference", "encounter"),
        _p("based-on", "reference", "basedOn"),
        _p("part-of", "reference", "partOf"),
    ),
    "Consent": (
        _p("patient", "reference", "patient", targets=_PATIENT),
        _p("status", "token", "status"),
        _p("category", "token", "category"),
        _p("scope", "token", "scope"),
        _p("identifier", "token", "identifier"),
        _p("date", "date", "dateTime"),
        _p("period", "date", "provision.period"),
        _p("action", "token", "provision.action"),
        _p("actor", "reference", "provision.actor.reference"),
        _p("consentor", "reference", "performer"),
        _p("organization", "reference", "organization"),
        _p("source-reference", "reference", "sourceReference"),
    ),
    "Questionnaire": (
        _p("url", "uri", "url"),
        _p("identifier", "token", "identifier"),
        _p("status", "token", "status"),
        _p("version", "token", "version"),
        _p("name", "string", "name"),
        _p("title", "string", "title"),
        _p("publisher", "string", "publisher"),
        _p("code", "token", "item.code"),
        _p("date", "date", "date"),
    ),
}

SUPPORTED_TYPES: tuple[str, ...] = tuple(sorted(PARAMS))

# Which parameter puts a resource in a patient's compartment (http://hl7.org/fhir/R4/compartmentdefinition-patient.html,
# narrowed to the elements that name the patient). Patient itself is in its own compartment by id.
COMPARTMENT: dict[str, str] = {
    "Observation": "patient",
    "QuestionnaireResponse": "patient",
    "Encounter": "patient",
    "Device": "patient",
    "Provenance": "patient",
    "Flag": "patient",
    "Task": "patient",
    "Goal": "patient",
    "Communication": "patient",
    "Consent": "patient",
}

# The date parameter each type is most often sorted by; its start is kept on the resource row too
# (``StoredResource.sort_lo``), so `_sort` on it needs no per-resource look-up.
PRIMARY_DATE: dict[str, str] = {
    "Observation": "date",
    "QuestionnaireResponse": "authored",
    "Encounter": "date",
    "Flag": "date",
    "Task": "authored-on",
    "Goal": "start-date",
    "Communication": "sent",
    "Consent": "date",
    "Questionnaire": "date",
    "Provenance": "recorded",
    "Patient": "birthdate",
}

_BY_NAME: dict[str, dict[str, SearchParam]] = {t: {p.name: p for p in ps} for t, ps in PARAMS.items()}


def param(resource_type: str, name: str) -> SearchParam | None:
    return _BY_NAME.get(resource_type, {}).get(name)


def params_of(resource_type: str) -> tuple[SearchParam, ...]:
    return PARAMS.get(resource_type, ())


def normalise_string(text: str) -> str:
    """Case- and accent-insensitive form used by FHIR string search ("Rivéra" finds "rivera")."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold().strip()


def _walk(node: Any, parts: list[str]) -> Iterator[Any]:
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, parts)
        return
    if not parts:
        if node is not None:
            yield node
        return
    if isinstance(node, dict):
        yield from _walk(node.get(parts[0]), parts[1:])


def values_at(resource: dict[str, Any], path: str) -> Iterator[Any]:
    yield from _walk(resource, path.split("."))


def reference_key(reference: str, base_url: str) -> tuple[str | None, str | None, str]:
    """(type, id, comparable value) of a reference; local absolute URLs become ``Type/id``."""
    ref = reference.strip()
    if base_url and ref.startswith(base_url + "/"):
        ref = ref[len(base_url) + 1 :]
    if "://" in ref or ref.startswith(("urn:", "#")):
        return None, None, ref
    parts = ref.split("/")
    if len(parts) >= 2 and parts[0][:1].isupper():
        return parts[0], parts[1], f"{parts[0]}/{parts[1]}"
    return None, None, ref


def _tokens(value: Any) -> Iterator[tuple[str | None, str]]:
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, str):
        yield None, value
    elif isinstance(value, dict):
        if "coding" in value or ("text" in value and "code" not in value and "value" not in value):
            for coding in value.get("coding") or []:
                yield from _tokens(coding)
        elif "code" in value:
            code = value.get("code")
            if isinstance(code, str):
                yield value.get("system"), code
        elif isinstance(value.get("value"), str):  # Identifier
            yield value.get("system"), value["value"]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):  # HumanName, Address: every textual part
        for key in ("text", "family", "given", "prefix", "suffix"):
            item = value.get(key)
            if isinstance(item, str):
                yield item
            elif isinstance(item, list):
                yield from (part for part in item if isinstance(part, str))


def index_rows(resource: dict[str, Any], base_url: str) -> list[IndexRow]:
    """Every searchable value of ``resource``, one row each."""
    rows: list[IndexRow] = []
    for sp in params_of(str(resource.get("resourceType"))):
        for path in sp.paths:
            for value in values_at(resource, path):
                rows.extend(_rows_for(sp, value, base_url))
    return rows


def _rows_for(sp: SearchParam, value: Any, base_url: str) -> Iterator[IndexRow]:
    if sp.kind == "token":
        for system, code in _tokens(value):
            yield IndexRow(sp.name, system=system, code=code[:512])
    elif sp.kind == "reference":
        ref = value.get("reference") if isinstance(value, dict) else None
        if isinstance(ref, str):
            rtype, rid, key = reference_key(ref, base_url)
            if sp.targets and rtype not in sp.targets:
                return
            yield IndexRow(sp.name, system=rtype, code=rid, value=key[:1024])
    elif sp.kind == "date":
        try:
            if isinstance(value, str):
                lo, hi = parse_range(value)
                yield IndexRow(sp.name, lo=lo, hi=hi)
            elif isinstance(value, dict) and ("start" in value or "end" in value):
                lo = parse_range(value["start"])[0] if isinstance(value.get("start"), str) else MIN_US
                hi = parse_range(value["end"])[1] if isinstance(value.get("end"), str) else MAX_US
                yield IndexRow(sp.name, lo=lo, hi=hi)
        except DateFormatError:
            return  # validation has already refused malformed dates; nothing sensible to index
    elif sp.kind == "string":
        for text in _strings(value):
            yield IndexRow(sp.name, code=text[:512], value=normalise_string(text)[:1024])
    elif sp.kind == "uri" and isinstance(value, str):
        yield IndexRow(sp.name, value=value[:1024])
        if "|" in value:  # canonical with a version: also findable without it
            yield IndexRow(sp.name, value=value.split("|", 1)[0][:1024])
