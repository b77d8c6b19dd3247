"""Change events for vendors' webhooks: queued in the transaction that makes the change.

An event says only what changed for which of the vendor's app users (``goal``/``task``/``message``
and our id); the vendor fetches the content through the API, so no clinical text travels in a
webhook and a lost or repeated event costs nothing but one fetch. Only vendors that registered a
webhook URL get events, and only for active enrollments.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_bridge.storage.models import Enrollment, VendorClient, WebhookEvent


def changed(session: Session, tenant_id: str, patient_id: str, kind: str, item_id: str, now: datetime) -> int:
    """One event per vendor enrolled with this patient that has a webhook; how many were queued."""
    rows = session.execute(
        select(Enrollment.app_user_id, VendorClient.id)
        .join(VendorClient, VendorClient.id == Enrollment.vendor_id)
        .where(
            Enrollment.tenant_id == tenant_id,
            Enrollment.patient_id == patient_id,
            Enrollment.status == "active",
            VendorClient.status == "active",
            VendorClient.webhook_url.is_not(None),
        )
    ).all()
    for app_user_id, vendor_id in rows:
        session.add(
            WebhookEvent(
                vendor_id=vendor_id,
                kind=f"{kind}.changed",
                payload={"app_user_id": app_user_id, "type": kind, "id": item_id},
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    return len(rows)
