"""Short messages between the care team and the patient, as FHIR ``Communication`` in the EHR.

Clinician -> patient: composed in the dashboard, delivered to the vendor (API and webhook).
Patient -> clinician: posted by the vendor for an app user with an active enrollment, shown in the
dashboard with an unread count. Both are written to the EHR (sender, recipient, payload text, sent,
``inResponseTo``). Messages are not for emergencies: the dashboard and the API carry the tenant's
crisis line with every thread.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from fhir_bridge import audit
from fhir_bridge.delivery import outbox
from fhir_bridge.errors import NotFound, Unprocessable
from fhir_bridge.relationship import events
from fhir_bridge.relationship.identity import MESSAGE_SYSTEM, ident
from fhir_bridge.storage.models import Enrollment, Message, Tenant, utcnow

MAX_TEXT = 2000
NOT_FOR_EMERGENCIES = (
    "Messages are not for emergencies and may not be read for several days. In an emergency call your "
    "local emergency number"
)
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/communication-category"


def crisis_notice(tenant: Tenant | None) -> str:
    line = tenant.crisis_line if tenant is not None and tenant.crisis_line else None
    return NOT_FOR_EMERGENCIES + (f" or the crisis line: {line}." if line else ".")


def check_text(text: object) -> str:
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        raise Unprocessable(
            f"The message must be text of 1 to {MAX_TEXT} characters.", code="invalid-message"
        )
    return text.strip()


def communication(message: Message, reply_to: Message | None) -> dict[str, Any]:
    """The FHIR R4 Communication: completed, sender and recipient, payload text, sent, inResponseTo."""
    patient = {"reference": f"Patient/{message.patient_id}"}
    clinician: dict[str, Any] = (
        {"reference": message.sender} if "/" in message.sender else {"display": "Care team"}
    )
    to_patient = message.direction == "to-patient"
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        "identifier": [{"system": MESSAGE_SYSTEM, "value": message.ident_value}],
        "status": "completed",
        "category": [{"coding": [{"system": CATEGORY_SYSTEM, "code": "notification"}]}],
        "subject": patient,
        "sent": message.sent_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "sender": clinician if to_patient else patient,
        "recipient": [patient if to_patient else clinician],
        "payload": [{"contentString": message.text}],
    }
    if not to_patient:
        resource["medium"] = [{"text": "patient app"}]
    if reply_to is not None:
        resource["inResponseTo"] = [{"identifier": {"system": MESSAGE_SYSTEM, "value": reply_to.ident_value}}]
    return resource


def _store(session: Session, message: Message, reply_to: Message | None, now: datetime) -> Message:
    session.add(message)
    session.flush()
    outbox.put(
        session,
        tenant_id=message.tenant_id,
        resource=communication(message, reply_to),
        ident_system=MESSAGE_SYSTEM,
        ident_value=message.ident_value,
        method="create",
        now=now,
    )
    return message


def _reply_target(session: Session, tenant_id: str, patient_id: str, reply_to: object) -> Message | None:
    if reply_to in (None, ""):
        return None
    try:
        key = uuid.UUID(str(reply_to))
    except ValueError:
        key = None
    found = session.get(Message, key) if key else None
    if found is None or found.tenant_id != tenant_id or found.patient_id != patient_id:
        raise NotFound("in_response_to names no message of this thread.", code="message-not-found")
    return found


def send_to_patient(
    session: Session,
    *,
    tenant_id: str,
    patient_id: str,
    actor: str,
    sender: str | None,
    text: object,
    in_response_to: object = None,
    now: datetime | None = None,
) -> Message:
    """A clinician's message; ``sender`` is the clinician's FHIR reference when the launch gave one."""
    now = now or utcnow()
    body = check_text(text)
    reply_to = _reply_target(session, tenant_id, patient_id, in_response_to)
    message_id = uuid.uuid4()
    message = Message(
        id=message_id,
        tenant_id=tenant_id,
        patient_id=patient_id,
        direction="to-patient",
        sender=(sender or "care-team")[:255],
        text=body,
        in_response_to=reply_to.id if reply_to else None,
        sent_at=now,
        ident_value=ident("message", tenant_id, str(message_id)),
    )
    _store(session, message, reply_to, now)
    events.changed(session, tenant_id, patient_id, "message", str(message.id), now)
    audit.record(
        session,
        actor_type="user",
        actor_id=actor[:255],
        action="message.send",
        tenant_id=tenant_id,
        patient_id=patient_id,
        target=f"message/{message.id}",
        now=now,
    )
    return message


def from_patient(
    session: Session,
    *,
    enrollment: Enrollment,
    vendor_client_id: str,
    text: object,
    client_message_id: str | None,
    in_response_to: object = None,
    now: datetime | None = None,
) -> tuple[Message, bool]:
    """A patient's message posted by their app; (message, created). The same client id is one message."""
    now = now or utcnow()
    if client_message_id is not None:
        existing = session.scalar(
            select(Message).where(
                Message.enrollment_id == enrollment.id, Message.client_message_id == client_message_id
            )
        )
        if existing is not None:
            return existing, False
    body = check_text(text)
    reply_to = _reply_target(session, enrollment.tenant_id, enrollment.patient_id, in_response_to)
    message_id = uuid.uuid4()
    message = Message(
        id=message_id,
        tenant_id=enrollment.tenant_id,
        patient_id=enrollment.patient_id,
        enrollment_id=enrollment.id,
        direction="to-clinician",
        sender=f"app:{vendor_client_id}"[:255],
        text=body,
        in_response_to=reply_to.id if reply_to else None,
        sent_at=now,
        client_message_id=client_message_id,
        ident_value=ident("message", enrollment.tenant_id, str(message_id)),
    )
    _store(session, message, reply_to, now)
    audit.record(
        session,
        actor_type="vendor",
        actor_id=vendor_client_id,
        action="message.receive",
        tenant_id=enrollment.tenant_id,
        patient_id=enrollment.patient_id,
        target=f"message/{message.id}",
        now=now,
    )
    return message, True


def thread(session: Session, tenant_id: str, patient_id: str) -> list[Message]:
    return list(
        session.scalars(
            select(Message)
            .where(Message.tenant_id == tenant_id, Message.patient_id == patient_id)
            .order_by(Message.sent_at, Message.id)
        )
    )


def unread(session: Session, tenant_id: str, patient_id: str) -> int:
    return int(
        session.scalar(
            select(func.count()).where(
                Message.tenant_id == tenant_id,
                Message.patient_id == patient_id,
                Message.direction == "to-clinician",
                Message.read_at.is_(None),
            )
        )
        or 0
    )


def mark_read(session: Session, tenant_id: str, patient_id: str, now: datetime | None = None) -> int:
    result = session.execute(
        update(Message)
        .where(
            Message.tenant_id == tenant_id,
            Message.patient_id == patient_id,
            Message.direction == "to-clinician",
            Message.read_at.is_(None),
        )
        .values(read_at=now or utcnow())
    )
    return int(getattr(result, "rowcount", 0) or 0)
