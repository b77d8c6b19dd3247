"""FHIR push: Observations and QuestionnaireResponses from vendors that already speak FHIR.

A vendor resource is never trusted as sent (security checklist P7-P10, T15). Each one:

* must be an ``Observation`` or ``QuestionnaireResponse`` (anything else: 422);
* loses what only the server may set (``id``, ``meta``, ``text``); ``contained``,
  ``implicitRules`` and ``modifierExtension`` are refused, because we could not vouch for them;
* names its patient only as the vendor's app user: ``subject.identifier`` with the vendor's
  app-user system, or ``subject.reference = "Patient?identifier=<system>|<app user id>"``. That
  is resolved to the enrolled EHR patient; any other subject is refused (a vendor never names an
  EHR patient);
* carries the vendor's own business ``identifier`` (the first one is the record id, for
  de-duplication); it is replaced by our deterministic identifier, as on every resource we emit;
* is validated as an R4 resource, and timestamps more than 5 minutes in the future are refused.

Errors are OperationOutcomes whose ``expression`` is the failing element's FHIRPath. A
``transaction`` Bundle is all or nothing; a ``batch`` Bundle gets one response entry per entry.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from fhir_bridge.enrollment import APP_USER_ID, active_by_app_user
from fhir_bridge.errors import BridgeError, operation_outcome
from fhir_bridge.push import Prepared, Result, Work, existing_records, new_ids
from fhir_bridge.rules.fhir_measurements import measurements_of
from fhir_bridge.storage.models import Enrollment, VendorClient
from mappings import MappedResource
from mappings.fhir_models import ValidationError, validate_resource
from mappings.identity import CANONICAL, RECORD_IDENTIFIER_SYSTEM, device_full_url, full_url, identifier_value

SCOPE_FOR = {
    "Observation": "system/Observation.c",
    "QuestionnaireResponse": "system/QuestionnaireResponse.c",
}
STRIPPED = ("id", "meta", "text")
# Required bindings (R4): fhir.resources checks structure, not these value sets.
STATUS_CODES = {
    "Observation": frozenset(
        {
            "registered",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    "QuestionnaireResponse": frozenset(
        {"in-progress", "completed", "amended", "entered-in-error", "stopped"}
    ),
}
REFUSED = ("contained", "implicitRules", "modifierExtension")
FUTURE_TOLERANCE = timedelta(minutes=5)
MAX_RECORD_ID = 200


def canonical() -> str:
    return CANONICAL


def app_user_system(client_id: str) -> str:
    """The identifier system a vendor names its app users with (in ``subject.identifier``)."""
    return f"{canonical()}/sid/app-user/{client_id}"


class FhirProblem(BridgeError):
    """A refused resource: rendered by ``errors.py`` as an OperationOutcome pointing at ``path``."""

    def __init__(self, status: int, code: str, message: str, path: str) -> None:
        super().__init__(message, code=code, status=status, fhir_path=path)
        self.path = path

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.status, self.message, code=self.code, fhir_path=self.path)


@dataclass
class Checked:
    resource_type: str
    record_id: str
    app_user_id: str
    resource: dict[str, Any]
    full_url: str | None


def _app_user(resource: dict[str, Any], vendor: VendorClient, path: str) -> str:
    subject = resource.get("subject")
    system = app_user_system(vendor.client_id)
    hint = (
        f'Name the patient as your app user: "subject": {{"identifier": {{"system": "{system}", '
        f'"value": "<app user id>"}}}} (or reference "Patient?identifier={system}|<app user id>").'
    )
    value: Any = None
    if isinstance(subject, dict) and set(subject) <= {"identifier", "display", "type"}:
        identifier = subject.get("identifier")
        if isinstance(identifier, dict) and identifier.get("system") == system:
            value = identifier.get("value")
    elif isinstance(subject, dict) and set(subject) <= {"reference", "display", "type"}:
        reference = subject.get("reference")
        prefix = f"Patient?identifier={system}|"
        if isinstance(reference, str) and reference.startswith(prefix):
            value = reference[len(prefix) :]
    if value is None:
        raise FhirProblem(
            422,
            "subject-not-allowed",
            "The subject must be one of your app users. " + hint,
            f"{path}.subject",
        )
    if not isinstance(value, str) or not APP_USER_ID.fullmatch(value):
        raise FhirProblem(
            422,
            "invalid-app-user-id",
            "The app user id must be 1-128 ASCII letters, digits and . _ : @ -",
            f"{path}.subject",
        )
    return value


def _record_id(resource: dict[str, Any], path: str) -> str:
    identifiers = resource.get("identifier")
    # Observation.identifier is a list; QuestionnaireResponse.identifier a single Identifier (R4).
    first = identifiers[0] if isinstance(identifiers, list) and identifiers else identifiers
    if not isinstance(first, dict) or not isinstance(first.get("value"), str) or not first["value"]:
        raise FhirProblem(
            422,
            "identifier-required",
            "Give the resource your own business identifier (identifier[0].system and .value): it is how a "
            "re-sent resource is recognised as a duplicate.",
            f"{path}.identifier",
        )
    system = first.get("system")
    record_id = f"{system}|{first['value']}" if isinstance(system, str) else first["value"]
    if len(record_id) > MAX_RECORD_ID:
        raise FhirProblem(
            422,
            "identifier-too-long",
            f"identifier[0] system|value is at most {MAX_RECORD_ID} characters",
            f"{path}.identifier[0]",
        )
    return record_id


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _check_times(resource: dict[str, Any], path: str, now: datetime) -> None:
    candidates = {
        "effectiveDateTime": resource.get("effectiveDateTime"),
        "effectiveInstant": resource.get("effectiveInstant"),
        "effectivePeriod.start": (resource.get("effectivePeriod") or {}).get("start"),
        "effectivePeriod.end": (resource.get("effectivePeriod") or {}).get("end"),
        "issued": resource.get("issued"),
        "authored": resource.get("authored"),
    }
    for name, value in candidates.items():
        when = _parse_time(value)
        if when is not None and when > now + FUTURE_TOLERANCE:
            raise FhirProblem(422, "timestamp-in-future", f"{name} is in the future.", f"{path}.{name}")


def _fhir_path(root: str, loc: tuple[Any, ...]) -> str:
    out = root
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("__root__", "root"):
            out += f".{part}"
    return out


def check_resource(
    resource: Any, *, vendor: VendorClient, path: str, expected_type: str | None, now: datetime
) -> Checked:
    """Everything about one resource that does not need the database (see the module docstring)."""
    if not isinstance(resource, dict):
        raise FhirProblem(400, "invalid-resource", "Expected a FHIR resource (a JSON object).", path)
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or resource_type not in SCOPE_FOR:
        raise FhirProblem(
            422,
            "resource-type-not-accepted",
            f"Only {' and '.join(SCOPE_FOR)} can be pushed (got {str(resource_type)[:40]!r}).",
            f"{path}.resourceType" if path != "Bundle" else path,
        )
    if expected_type is not None and resource_type != expected_type:
        raise FhirProblem(
            400, "resource-type-mismatch", f"This endpoint takes {expected_type}, not {resource_type}.", path
        )
    path = path if path.startswith("Bundle") else resource_type
    for member in REFUSED:
        if member in resource:
            raise FhirProblem(
                422,
                "element-not-accepted",
                f"{member} is not accepted on pushed resources.",
                f"{path}.{member}",
            )
    record_id = _record_id(resource, path)
    app_user = _app_user(resource, vendor, path)
    if resource.get("status") not in STATUS_CODES[resource_type]:
        raise FhirProblem(
            422,
            "invalid-resource",
            f"status must be one of {', '.join(sorted(STATUS_CODES[resource_type]))}.",
            f"{path}.status",
        )
    _check_times(resource, path, now)
    cleaned = {k: copy.deepcopy(v) for k, v in resource.items() if k not in STRIPPED}
    return Checked(resource_type, record_id, app_user, cleaned, None)


def stamp(
    checked: Checked, *, vendor: VendorClient, enrollment: Enrollment, path: str
) -> tuple[str, str, str, dict[str, Any]]:
    """The resource as we will write it: our identifier, the enrolled patient, the app as device."""
    measure = f"fhir:{checked.resource_type}"
    value = identifier_value(vendor.client_id, checked.record_id, measure, "main")
    resource = dict(checked.resource)
    ours = {"system": RECORD_IDENTIFIER_SYSTEM, "value": value}
    # Observation.identifier is a list, QuestionnaireResponse.identifier a single Identifier (R4).
    resource["identifier"] = [ours] if checked.resource_type == "Observation" else ours
    resource["subject"] = {"reference": f"Patient/{enrollment.patient_id}"}
    device = {"reference": device_full_url(vendor.client_id)}
    if checked.resource_type == "Observation":
        resource.setdefault("device", device)
    else:
        resource.setdefault("author", device)
    try:
        validate_resource(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise FhirProblem(
            422,
            "invalid-resource",
            f"Not a valid R4 {checked.resource_type}: {first.get('msg', 'invalid')}.",
            _fhir_path(path, tuple(first.get("loc", ()))),
        ) from None
    return RECORD_IDENTIFIER_SYSTEM, value, full_url(RECORD_IDENTIFIER_SYSTEM, value), resource


@dataclass
class EntryResult:
    status: int
    record_uuid: str | None = None
    resource: dict[str, Any] | None = None
    problem: FhirProblem | None = None

    @property
    def label(self) -> str:
        return {200: "200 OK", 201: "201 Created"}.get(self.status, f"{self.status}")


def _resolve(
    session: Session, vendor: VendorClient, checked: list[tuple[int, Checked | FhirProblem]]
) -> tuple[dict[str, Enrollment], dict[str, uuid.UUID]]:
    good = [c for _, c in checked if isinstance(c, Checked)]
    enrollments = active_by_app_user(session, vendor.id, {c.app_user_id for c in good})
    existing = existing_records(session, vendor, {c.record_id for c in good})
    return enrollments, existing


def process(
    session: Session,
    *,
    vendor: VendorClient,
    entries: list[tuple[str, Any, str | None, str | None]],
    scopes: frozenset[str],
    now: datetime,
    all_or_nothing: bool,
) -> tuple[list[EntryResult], list[Prepared], str | None]:
    """Check, resolve, de-duplicate and stamp each (path, resource, expected type, fullUrl) entry."""
    checked: list[tuple[int, Checked | FhirProblem]] = []
    for index, (path, resource, expected, entry_full_url) in enumerate(entries):
        if isinstance(resource, FhirProblem):
            checked.append((index, resource))
            continue
        try:
            item = check_resource(resource, vendor=vendor, path=path, expected_type=expected, now=now)
            if SCOPE_FOR[item.resource_type] not in scopes:
                raise FhirProblem(
                    403,
                    "insufficient_scope",
                    f"Your token lacks the scope {SCOPE_FOR[item.resource_type]}.",
                    path,
                )
            item.full_url = entry_full_url
            checked.append((index, item))
        except FhirProblem as problem:
            checked.append((index, problem))
    enrollments, existing = _resolve(session, vendor, checked)

    results: list[EntryResult] = []
    prepared: list[Prepared] = []
    seen: dict[str, str] = {}
    rewrites: dict[str, str] = {}
    for index, outcome in checked:
        path = entries[index][0]
        if isinstance(outcome, FhirProblem):
            results.append(EntryResult(outcome.status, problem=outcome))
            continue
        item = outcome
        if item.record_id in existing or item.record_id in seen:
            known = str(existing[item.record_id]) if item.record_id in existing else seen[item.record_id]
            results.append(EntryResult(200, record_uuid=known))
            continue
        enrollment = enrollments.get(item.app_user_id)
        if enrollment is None:
            not_enrolled = FhirProblem(
                422,
                "not-enrolled",
                "This app user has no active enrollment with your app: claim a pairing code first.",
                f"{path if path.startswith('Bundle') else item.resource_type}.subject",
            )
            results.append(EntryResult(422, problem=not_enrolled))
            continue
        try:
            system, value, our_url, resource = stamp(item, vendor=vendor, enrollment=enrollment, path=path)
        except FhirProblem as invalid:
            results.append(EntryResult(invalid.status, problem=invalid))
            continue
        if item.full_url:
            rewrites[item.full_url] = our_url
        record_uuid = str(new_ids(1)[0])  # time-ordered, as native records' (see new_ids)
        seen[item.record_id] = record_uuid
        results.append(EntryResult(201, record_uuid=record_uuid, resource=resource))
        result = Result(index=index, record_id=item.record_id, status="accepted", id=record_uuid)
        mapped = MappedResource(item.resource_type, system, value, our_url, resource)
        prepared.append(
            Prepared(
                result,
                item.record_id,
                f"fhir:{item.resource_type}",
                enrollment,
                [mapped],
                measurements_of(resource),  # the rules' ledger (fhir_bridge.rules)
            )
        )

    if all_or_nothing and any(r.problem is not None for r in results):
        return results, [], None
    if rewrites:
        # References between entries of one Bundle (e.g. derivedFrom -> the QuestionnaireResponse)
        # follow the resources to their new urn:uuid full URLs.
        for p in prepared:
            for mapped in p.resources:
                _rewrite(mapped.resource, rewrites)
    group_key = prepared[0].result.id if all_or_nothing and prepared else None
    return results, prepared, group_key


def _rewrite(node: Any, rewrites: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in rewrites:
                node[key] = rewrites[value]
            else:
                _rewrite(value, rewrites)
    elif isinstance(node, list):
        for value in node:
            _rewrite(value, rewrites)


def single(
    session: Session,
    submission_id: uuid.UUID,
    now: datetime,
    *,
    vendor: VendorClient,
    resource: Any,
    expected_type: str,
    scopes: frozenset[str],
    location: str,
) -> Work:
    """``POST /fhir/{type}``: 201 with the resource as it will be written, 200 for a duplicate."""
    results, prepared, _ = process(
        session,
        vendor=vendor,
        entries=[(expected_type, resource, expected_type, None)],
        scopes=scopes,
        now=now,
        all_or_nothing=True,
    )
    (result,) = results
    if result.problem is not None:
        raise result.problem
    counts = {"accepted": len(prepared), "duplicate": 0 if prepared else 1, "rejected": 0}
    headers = {"Location": location.format(id=result.record_uuid), "X-Submission-Id": str(submission_id)}
    if result.status == 201:
        assert result.resource is not None
        return Work(201, result.resource, counts, prepared, extra_headers=headers)
    outcome = operation_outcome(
        200, "Already received: this resource's identifier was pushed before.", code="duplicate"
    )
    outcome["issue"][0]["severity"] = "information"
    outcome["issue"][0]["code"] = "duplicate"
    return Work(200, outcome, counts, prepared, extra_headers=headers)


def bundle(
    session: Session,
    submission_id: uuid.UUID,
    now: datetime,
    *,
    vendor: VendorClient,
    body: Any,
    scopes: frozenset[str],
    max_entries: int,
    location: str,
) -> Work:
    """``POST /fhir`` with a batch or transaction Bundle of POSTs of the accepted types."""
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise FhirProblem(
            400, "invalid-resource", "POST /fhir takes a Bundle of type batch or transaction.", "Bundle"
        )
    kind = body.get("type")
    if kind not in ("batch", "transaction"):
        raise FhirProblem(
            422, "bundle-type-not-accepted", "Bundle.type must be batch or transaction.", "Bundle.type"
        )
    entries_in = body.get("entry")
    if not isinstance(entries_in, list) or not entries_in:
        raise FhirProblem(400, "empty-batch", "The Bundle has no entries.", "Bundle.entry")
    if len(entries_in) > max_entries:
        raise FhirProblem(
            400,
            "batch-too-large",
            f"The Bundle has {len(entries_in)} entries; at most {max_entries} are accepted.",
            "Bundle.entry",
        )
    entries: list[tuple[str, Any, str | None, str | None]] = []
    for index, entry in enumerate(entries_in):
        path = f"Bundle.entry[{index}]"
        request = entry.get("request") if isinstance(entry, dict) else None
        resource = entry.get("resource") if isinstance(entry, dict) else None
        method = request.get("method") if isinstance(request, dict) else None
        url = request.get("url") if isinstance(request, dict) else None
        if method != "POST":
            problem = FhirProblem(
                422,
                "method-not-accepted",
                "Only POST (create) entries are accepted.",
                path + ".request.method",
            )
            entries.append((path + ".request.method", problem, None, None))
            continue
        full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        entries.append((path + ".resource", resource, url if isinstance(url, str) else None, full_url))
    results, prepared, group_key = process(
        session, vendor=vendor, entries=entries, scopes=scopes, now=now, all_or_nothing=kind == "transaction"
    )
    failed = [r for r in results if r.problem is not None]
    if kind == "transaction" and failed:
        first_problem = failed[0].problem
        assert first_problem is not None
        raise first_problem
    counts = {
        "accepted": sum(1 for r in results if r.status == 201),
        "duplicate": sum(1 for r in results if r.status == 200),
        "rejected": len(failed),
    }
    response_entries = []
    for result in results:
        response: dict[str, Any] = {"status": result.label}
        if result.record_uuid:
            response["location"] = location.format(id=result.record_uuid)
        if result.problem is not None:
            response["outcome"] = result.problem.outcome()
        response_entries.append({"response": response})
    out = {"resourceType": "Bundle", "type": f"{kind}-response", "entry": response_entries}
    return Work(
        200, out, counts, prepared, group_key=group_key, extra_headers={"X-Submission-Id": str(submission_id)}
    )
