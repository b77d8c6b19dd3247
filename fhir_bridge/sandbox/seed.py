"""Demo data for an empty sandbox: synthetic patients, a clinician, and an open encounter per patient.

Every resource is tagged ``HTEST`` (HL7 "test health data") and every name is invented. Ids are
fixed (``sbx-patient-1`` ...) so tests, demos and documentation can name them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fhir_bridge.sandbox.models import StoredResource
from fhir_bridge.sandbox.store import FhirStore, FullAccess

TEST_TAG = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
    "code": "HTEST",
    "display": "test health data",
}
MRN_SYSTEM = "https://sandbox-ehr.fhir-bridge.org/mrn"

# (given, family, gender, birth date): invented people for the demo.
PATIENTS: tuple[tuple[str, str, str, str], ...] = (
    ("Alex", "Rivera", "female", "1988-03-14"),
    ("Jordan", "Blake", "male", "1975-11-02"),
    ("Sam", "Okafor", "male", "1992-07-21"),
    ("Riley", "Chen", "female", "2001-01-30"),
    ("Casey", "Nguyen", "female", "1966-09-09"),
    ("Morgan", "Ellis", "male", "1983-05-17"),
)
PRACTITIONERS: tuple[tuple[str, str], ...] = (("Taylor", "Brooks"), ("Priya", "Shah"))


def patient_id(n: int) -> str:
    return f"sbx-patient-{n}"


def practitioner_id(n: int) -> str:
    return f"sbx-practitioner-{n}"


def encounter_id(n: int) -> str:
    return f"sbx-encounter-{n}"


def is_empty(session: Session) -> bool:
    return (session.scalar(select(func.count()).select_from(StoredResource)) or 0) == 0


def seed(session: Session, store: FhirStore, *, now: datetime | None = None) -> int:
    """Write the demo resources (update-as-create, so running it twice changes nothing but versions)."""
    now = now or datetime.now(UTC)
    access = FullAccess()
    written = 0
    for n, (given, family) in enumerate(PRACTITIONERS, start=1):
        store.update(session, "Practitioner", practitioner_id(n), _practitioner(n, given, family), access)
        written += 1
    for n, (given, family, gender, born) in enumerate(PATIENTS, start=1):
        store.update(session, "Patient", patient_id(n), _patient(n, given, family, gender, born), access)
        start = (now - timedelta(days=n)).replace(hour=9, minute=0, second=0, microsecond=0)
        store.update(session, "Encounter", encounter_id(n), _encounter(n, start), access)
        written += 2
    return written


def _meta() -> dict[str, Any]:
    return {"tag": [dict(TEST_TAG)]}


def _practitioner(n: int, given: str, family: str) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "id": practitioner_id(n),
        "meta": _meta(),
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": f"99999990{n:02d}"}],
        "active": True,
        "name": [{"use": "official", "family": family, "given": [given], "prefix": ["Dr."]}],
    }


def _patient(n: int, given: str, family: str, gender: str, born: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": patient_id(n),
        "meta": _meta(),
        "identifier": [
            {
                "use": "usual",
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]
                },
                "system": MRN_SYSTEM,
                "value": f"MRN-{100000 + n}",
            }
        ],
        "active": True,
        "name": [{"use": "official", "family": family, "given": [given]}],
        "gender": gender,
        "birthDate": born,
        "generalPractitioner": [{"reference": f"Practitioner/{practitioner_id(1)}"}],
    }


def _encounter(n: int, start: datetime) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": encounter_id(n),
        "meta": _meta(),
        "status": "in-progress",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "AMB",
            "display": "ambulatory",
        },
        "type": [{"text": "Outpatient mental health follow-up"}],
        "subject": {"reference": f"Patient/{patient_id(n)}"},
        "participant": [{"individual": {"reference": f"Practitioner/{practitioner_id(1)}"}}],
        "period": {"start": start.isoformat().replace("+00:00", "Z")},
    }
