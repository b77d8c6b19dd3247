"""The patient's consent to share app data with the care team, as a FHIR ``Consent`` in the EHR.

Queued in the transaction that claims the pairing code (the claim is the patient's act of consent:
they typed the code their clinician gave them into the app) and set ``inactive`` in the transaction
that ends the enrollment. Its identifier is derived from the enrollment, so the same enrollment always
has the same Consent and the end updates it (an outbox upsert) rather than adding a second one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from fhir_bridge.delivery import outbox
from fhir_bridge.relationship.identity import CONSENT_SYSTEM, ident
from fhir_bridge.storage.models import Enrollment, VendorClient

CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
CONSENT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
LOINC = "http://loinc.org"


def _instant(value: datetime) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def consent_identifier(enrollment: Enrollment) -> str:
    return ident("consent", enrollment.tenant_id, str(enrollment.id))


def consent_resource(
    enrollment: Enrollment, vendor_name: str, *, status: str, granted_at: datetime, ended_at: datetime | None
) -> dict[str, Any]:
    """The Consent (R4): opt-in to disclose the app's data to the care team for treatment."""
    assert enrollment.consent_identifier is not None
    period: dict[str, str] = {"start": _instant(granted_at)}
    if ended_at is not None:
        period["end"] = _instant(ended_at)
    patient = {"reference": f"Patient/{enrollment.patient_id}"}
    return {
        "resourceType": "Consent",
        "identifier": [{"system": CONSENT_SYSTEM, "value": enrollment.consent_identifier}],
        "status": status,
        "scope": {
            "coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy", "display": "Privacy Consent"}]
        },
        "category": [
            {"coding": [{"system": LOINC, "code": "59284-0", "display": "Patient Consent"}]},
            {"coding": [{"system": ACT_CODE, "code": "INFA", "display": "information access"}]},
        ],
        "patient": patient,
        "dateTime": _instant(granted_at),
        "performer": [patient],
        "policyRule": {
            "coding": [{"system": ACT_CODE, "code": "OPTIN", "display": "opt-in"}],
            "text": f"The patient shares the data of the app {vendor_name[:100]} with their care team, "
            "and receives the care team's goals, tasks and messages in the app, until the app is "
            "unlinked.",
        },
        "provision": {
            "type": "permit",
            "period": period,
            "action": [{"coding": [{"system": CONSENT_ACTION, "code": "disclose", "display": "Disclose"}]}],
            "purpose": [{"system": ACT_REASON, "code": "TREAT", "display": "treatment"}],
        },
    }


def on_claim(session: Session, enrollment: Enrollment, vendor: VendorClient, now: datetime) -> None:
    """Queue the active Consent (the caller's transaction claims the enrollment)."""
    enrollment.consent_identifier = consent_identifier(enrollment)
    resource = consent_resource(enrollment, vendor.name, status="active", granted_at=now, ended_at=None)
    outbox.put(
        session,
        tenant_id=enrollment.tenant_id,
        resource=resource,
        ident_system=CONSENT_SYSTEM,
        ident_value=enrollment.consent_identifier,
        now=now,
    )


def on_end(session: Session, enrollment: Enrollment, now: datetime) -> None:
    """Queue the Consent's update to ``inactive``; nothing when the enrollment was never claimed."""
    if enrollment.consent_identifier is None or enrollment.claimed_at is None:
        return
    resource = consent_resource(
        enrollment, enrollment.vendor.name, status="inactive", granted_at=enrollment.claimed_at, ended_at=now
    )
    outbox.put(
        session,
        tenant_id=enrollment.tenant_id,
        resource=resource,
        ident_system=CONSENT_SYSTEM,
        ident_value=enrollment.consent_identifier,
        now=now,
    )
