"""Which patients a vendor may see: those of its active enrollments, named by the vendor's app user id.

Every vendor write of the relationship, and every read for one app user, goes through
:func:`enrollment_for` (lists join on the vendor's active enrollments, fhir_bridge/api/relationship.py),
so another vendor's users and ended enrollments are out of reach: both answer 404 with the same
message (no oracle for which app users exist elsewhere).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_bridge.errors import NotFound
from fhir_bridge.storage.models import Enrollment, VendorClient

NOT_ENROLLED = (
    "No active enrollment of yours has this app user: claim a pairing code first, or the enrollment "
    "has ended (then nothing is shared any more in either direction)."
)


def enrollment_for(session: Session, vendor: VendorClient, app_user_id: str) -> Enrollment:
    found = session.execute(
        select(Enrollment).where(
            Enrollment.vendor_id == vendor.id,
            Enrollment.app_user_id == app_user_id,
            Enrollment.status == "active",
        )
    ).scalar_one_or_none()
    if found is None:
        raise NotFound(NOT_ENROLLED, code="not-enrolled")
    return found
