"""The enrollment panel: "Prescribe app" (pairing code + QR code) and "End enrollment" for the patient.

The pairing itself is :mod:`fhir_bridge.enrollment` (codes, hashing, expiry, audit); this module
only lets a clinician call it for the patient of their own launch (checklist M7: no code without a
patient context), shows the code once with a QR code drawn on our own origin (segno, SVG), and
reports the enrollment's status so the page can show when the app has claimed it.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

import orjson
import segno
from flask import Response
from sqlalchemy import select

from fhir_bridge import enrollment, services
from fhir_bridge.errors import NotFound, Unprocessable
from fhir_bridge.storage.models import Enrollment, VendorClient
from smart_app import session as launch_session
from smart_app import web
from smart_app.session import LaunchContext

log = logging.getLogger(__name__)


def _ms(value: datetime | None) -> float | None:
    return value.timestamp() * 1000 if value is not None else None


def status(ctx: LaunchContext) -> dict[str, Any]:
    """Vendors a clinician can prescribe, and this patient's enrollments (newest first)."""
    with services.current().db.transaction() as session:
        vendors = session.scalars(
            select(VendorClient).where(VendorClient.status == "active").order_by(VendorClient.name)
        ).all()
        rows = session.execute(
            select(Enrollment, VendorClient)
            .join(VendorClient, Enrollment.vendor_id == VendorClient.id)
            .where(Enrollment.tenant_id == ctx.tenant_id, Enrollment.patient_id == ctx.patient_id)
            .order_by(Enrollment.created_at.desc())
            .limit(20)
        ).all()
        return {
            "vendors": [{"id": v.client_id, "name": v.name} for v in vendors],
            "enrollments": [
                {
                    "id": str(e.id),
                    "vendor": v.name,
                    "status": e.status,
                    "created_at": _ms(e.created_at),
                    "code_expires_at": _ms(e.code_expires_at) if e.status == "pending" else None,
                    "claimed_at": _ms(e.claimed_at),
                    "ended_at": _ms(e.ended_at),
                }
                for e, v in rows
            ],
        }


def qr_data_uri(code: str) -> str:
    """The pairing code as a QR code, an SVG data URI (rendered offline, printable, no third party)."""
    qr = segno.make(code, error="m", micro=False)
    return str(qr.svg_data_uri(scale=6, border=2, dark="#000000", light="#ffffff"))


def json_response(data: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(data), status=status_code, mimetype="application/json")


def get(launch_id: str) -> Response:
    ctx = launch_session.load(launch_id)
    return json_response(status(ctx))


def prescribe(launch_id: str, body: dict[str, Any]) -> Response:
    ctx = launch_session.load(launch_id)
    svc = services.current()
    web.check_csrf(svc.secret_key, ctx.launch_id, svc.settings.public_url)
    vendor = body.get("vendor")
    if not isinstance(vendor, str) or not 0 < len(vendor) <= 128:
        raise Unprocessable("Choose the app to prescribe.", code="invalid-vendor")
    created = enrollment.create(
        svc.db,
        secret=svc.secret_key,
        tenant_id=ctx.tenant_id,
        patient_id=ctx.patient_id,
        vendor_client_id=vendor,
        created_by=ctx.actor,
        ttl_seconds=svc.settings.pairing_code_ttl,
    )
    log.info("app prescribed", extra={"tenant": ctx.tenant_id, "vendor": vendor})
    shown = enrollment.display(created.code)
    return json_response(
        {
            "id": str(created.enrollment_id),
            "code": shown,
            "expires_at": _ms(created.expires_at),
            "qr": qr_data_uri(shown),
            "status": status(ctx),
        },
        201,
    )


def end(launch_id: str, enrollment_id: str) -> Response:
    ctx = launch_session.load(launch_id)
    svc = services.current()
    web.check_csrf(svc.secret_key, ctx.launch_id, svc.settings.public_url)
    try:
        wanted = uuid.UUID(enrollment_id)
    except ValueError:
        wanted = None
    with svc.db.transaction() as session:
        row = session.get(Enrollment, wanted) if wanted else None
        # Only this patient's enrollments, and "not found" for anyone else's (no oracle).
        if row is None or row.tenant_id != ctx.tenant_id or row.patient_id != ctx.patient_id:
            raise NotFound("This patient has no such enrollment.", code="enrollment-not-found")
    enrollment.end(svc.db, enrollment_id=enrollment_id, actor_type="user", actor_id=ctx.actor)
    log.info("enrollment ended", extra={"tenant": ctx.tenant_id})
    return json_response(status(ctx))
