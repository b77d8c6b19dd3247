"""Queue work for the delivery worker the way the vendor API will: rows that follow the outbox contract.

Until the vendor API and the mapping engine land, tests write ``Submission``/``Record``/``OutboxItem``
rows directly, with hand-written resources that follow docs/architecture.md: one deterministic
identifier per resource (at most 64 characters of ``[a-z0-9]``, so it doubles as a FHIR id),
``urn:uuid:`` references between the resources of a record and to the app's Device.
"""

from __future__ import annotations

import functools
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import insert, select

from fhir_bridge.fhir_client import FhirClient
from fhir_bridge.storage import Database
from fhir_bridge.storage.models import (
    Enrollment,
    OutboxItem,
    Record,
    Submission,
    Tenant,
    VendorClient,
)
from mappings import Catalog, MappedResource, MappingContext, load_catalog
from mappings.identity import RECORD_IDENTIFIER_SYSTEM, device_full_url, full_url, identifier_value

IDENT_SYSTEM = RECORD_IDENTIFIER_SYSTEM
LOINC = "http://loinc.org"


def ident(vendor: str, record: str, measure: str, role: str = "main") -> str:
    return identifier_value(vendor, record, measure, role)


def add_tenant(
    db: Database,
    tenant_id: str,
    fhir_base: str,
    *,
    client_id: str | None = None,
    token_url: str | None = None,
    strategy: str = "transaction",
    quirks: dict[str, Any] | None = None,
    scopes: str = "system/*.c system/*.u system/*.rs",
    max_concurrent: int = 4,
) -> None:
    with db.transaction() as session:
        session.add(
            Tenant(
                id=tenant_id,
                name=tenant_id,
                fhir_base_url=fhir_base,
                backend_client_id=client_id,
                token_url=token_url,
                backend_scopes=scopes,
                write_strategy=strategy,
                quirks=quirks or {},
                max_concurrent_requests=max_concurrent,
            )
        )


def add_vendor(db: Database, client_id: str = "acme-mood", name: str = "Acme Mood") -> int:
    with db.transaction() as session:
        existing = session.scalar(select(VendorClient.id).where(VendorClient.client_id == client_id))
        if existing is not None:
            return existing
        vendor = VendorClient(client_id=client_id, name=name, scopes="system/*.c")
        session.add(vendor)
        session.flush()
        return vendor.id


def phq9_group(vendor: str, record: str, patient: str, score: int) -> list[tuple[str, str, dict[str, Any]]]:
    """A questionnaire record: the QuestionnaireResponse and a score Observation derived from it."""
    qr_value = ident(vendor, record, "phq9", "qr")
    obs_value = ident(vendor, record, "phq9", "total")
    device = device_full_url(vendor)
    qr = {
        "resourceType": "QuestionnaireResponse",
        "identifier": {"system": IDENT_SYSTEM, "value": qr_value},
        "questionnaire": "http://loinc.org/q/44249-1",
        "status": "completed",
        "subject": {"reference": f"Patient/{patient}"},
        "authored": "2024-03-01T09:30:00+01:00",
        "author": {"reference": device},
        "item": [{"linkId": "/44250-9", "answer": [{"valueInteger": min(score, 3)}]}],
    }
    obs = {
        "resourceType": "Observation",
        "identifier": [{"system": IDENT_SYSTEM, "value": obs_value}],
        "status": "final",
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "survey"}
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": "44261-6"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2024-03-01T09:30:00+01:00",
        "valueInteger": score,
        "derivedFrom": [{"reference": full_url(IDENT_SYSTEM, qr_value)}],
    }
    return [("QuestionnaireResponse", qr_value, qr), ("Observation", obs_value, obs)]


def steps_group(vendor: str, record: str, patient: str, steps: int) -> list[tuple[str, str, dict[str, Any]]]:
    """A single-resource record (a daily step count), referencing the app Device."""
    value = ident(vendor, record, "steps-daily")
    obs = {
        "resourceType": "Observation",
        "identifier": [{"system": IDENT_SYSTEM, "value": value}],
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "activity",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": "41950-7"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2024-03-02",
        "valueQuantity": {
            "value": steps,
            "unit": "steps/day",
            "system": "http://unitsofmeasure.org",
            "code": "/d",
        },
        "device": {"reference": device_full_url(vendor)},
    }
    return [("Observation", value, obs)]


@dataclass
class Seeded:
    tenant_id: str
    patient: str
    items: list[tuple[str, str]] = field(default_factory=list)  # (resource type, identifier value)
    records: list[uuid.UUID] = field(default_factory=list)


def seed(
    db: Database,
    tenant_id: str,
    *,
    patient: str,
    records: int,
    vendor: str = "acme-mood",
    priority: int = 0,
    kinds: Iterable[str] = ("phq9", "steps"),
    invalid: Iterable[int] = (),
) -> Seeded:
    """Queue ``records`` records for ``patient`` (alternating kinds); records listed in ``invalid`` get an
    Observation the EHR must refuse (no ``status``)."""
    vendor_pk = add_vendor(db, vendor)
    kinds = list(kinds)
    bad = set(invalid)
    seeded = Seeded(tenant_id, patient)
    with db.transaction() as session:
        enrollment = Enrollment(
            tenant_id=tenant_id,
            patient_id=patient,
            vendor_id=vendor_pk,
            app_user_id=f"u-{uuid.uuid4().hex[:12]}",
            status="active",
        )
        submission = Submission(vendor_id=vendor_pk, record_count=records, accepted_count=records)
        session.add_all([enrollment, submission])
        session.flush()
        record_rows: list[dict[str, Any]] = []
        item_rows: list[dict[str, Any]] = []
        for n in range(records):
            kind = kinds[n % len(kinds)]
            record_key = f"{patient}-{uuid.uuid4().hex[:8]}-r{n}"
            record_id = uuid.uuid4()
            group = (
                phq9_group(vendor, record_key, patient, n % 28)
                if kind == "phq9"
                else steps_group(vendor, record_key, patient, 1000 + n)
            )
            if n in bad:
                for _, _, resource in group:
                    if resource["resourceType"] == "Observation":
                        resource.pop("status")
            record_rows.append(
                {
                    "id": record_id,
                    "submission_id": submission.id,
                    "vendor_id": vendor_pk,
                    "vendor_record_id": record_key,
                    "measure": kind,
                    "enrollment_id": enrollment.id,
                    "status": "queued",
                }
            )
            for resource_type, value, resource in group:
                item_rows.append(
                    {
                        "tenant_id": tenant_id,
                        "record_id": record_id,
                        "group_key": str(record_id),
                        "resource_type": resource_type,
                        "ident_system": IDENT_SYSTEM,
                        "ident_value": value,
                        "body": orjson.dumps(resource),
                        "priority": priority,
                    }
                )
                seeded.items.append((resource_type, value))
            seeded.records.append(record_id)
        session.execute(insert(Record), record_rows)
        session.execute(insert(OutboxItem), item_rows)
    return seeded


def in_ehr(client: FhirClient, patient: str) -> Counter[tuple[str, str]]:
    """(type, identifier value) of every Observation and QuestionnaireResponse the EHR holds for
    ``patient``, counted, read back through its search API (sekmet ignores QuestionnaireResponse
    filters, so those are filtered here)."""
    found: Counter[tuple[str, str]] = Counter()
    observations = client.search(
        "Observation", [("subject", f"Patient/{patient}"), ("_count", "1000")], max_pages=1000
    )
    assert not observations.truncated
    for resource in observations.resources:
        for identifier in resource.get("identifier") or []:
            if identifier.get("system") == IDENT_SYSTEM:
                found[("Observation", identifier["value"])] += 1
    responses = client.search("QuestionnaireResponse", [("_count", "1000")], max_pages=1000)
    for resource in responses.resources:
        if (resource.get("subject") or {}).get("reference") != f"Patient/{patient}":
            continue
        identifier = resource.get("identifier") or {}
        if identifier.get("system") == IDENT_SYSTEM:
            found[("QuestionnaireResponse", identifier["value"])] += 1
    return found


def outbox_states(db: Database, tenant_id: str) -> Counter[str]:
    with db.sessions() as session:
        return Counter(session.scalars(select(OutboxItem.status).where(OutboxItem.tenant_id == tenant_id)))


@functools.cache
def _catalog() -> Catalog:
    return load_catalog()


def seed_mapped(
    db: Database,
    tenant_id: str,
    *,
    patient: str,
    records: list[tuple[str, dict[str, Any]]],
    vendor: str = "acme-mood",
) -> list[MappedResource]:
    """Queue records mapped by the real catalogue (what the vendor API will do): (measure, data) each."""
    vendor_pk = add_vendor(db, vendor)
    mapped: list[MappedResource] = []
    with db.transaction() as session:
        enrollment = Enrollment(
            tenant_id=tenant_id,
            patient_id=patient,
            vendor_id=vendor_pk,
            app_user_id=f"u-{uuid.uuid4().hex[:12]}",
            status="active",
        )
        submission = Submission(vendor_id=vendor_pk, record_count=len(records), accepted_count=len(records))
        session.add_all([enrollment, submission])
        session.flush()
        for n, (measure, data) in enumerate(records):
            record_key = f"{patient}-{measure}-{n}"
            result = _catalog().map(
                measure,
                data,
                MappingContext(
                    vendor_id=vendor,
                    record_id=record_key,
                    patient_reference=f"Patient/{patient}",
                    device_full_url=device_full_url(vendor),
                    received_at=datetime.now(UTC),
                ),
            )
            assert result.ok, result.rejections
            record = Record(
                submission_id=submission.id,
                vendor_id=vendor_pk,
                vendor_record_id=record_key,
                measure=measure,
                enrollment_id=enrollment.id,
            )
            session.add(record)
            session.flush()
            for resource in result.resources:
                session.add(
                    OutboxItem(
                        tenant_id=tenant_id,
                        record_id=record.id,
                        group_key=str(record.id),
                        resource_type=resource.resource_type,
                        ident_system=resource.identifier_system,
                        ident_value=resource.identifier_value,
                        body=orjson.dumps(resource.resource),
                    )
                )
                mapped.append(resource)
    return mapped
