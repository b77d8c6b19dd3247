"""Enrollment ("prescribing the app"): a one-time pairing code binds an EHR patient to a vendor's app user.

A clinician (through the SMART app) or hospital IT (``fhir-bridge enrollment create``) creates an
enrollment for (tenant, patient, vendor) and hands the patient a pairing code; the vendor's app
claims it with its own user id; either side can end it, which stops the flow at once. Vendors
never name EHR patients: data reaches a patient only through an active enrollment.

Pairing codes (security checklist M1-M10, T16):

* 10 characters from a 30-letter alphabet without look-alikes (no 0/O, 1/I/L, U): about 49 bits,
  shown as ``ABCDE-FGHJK``; typed codes are upper-cased and separators ignored;
* stored only as an HMAC-SHA256 under the service secret (a plain hash of 49 bits could be
  reversed from a database copy in hours), unique, expiring after ``PAIRING_CODE_TTL``, cleared on
  claim (single use);
* a failed claim is recorded per vendor; after ``PAIRING_MAX_ATTEMPTS`` failures in an hour the
  vendor gets 429 with ``Retry-After`` until the oldest failure leaves the window;
* unknown, mistyped, expired, used and other-vendor codes all get the same answer, so the response
  says nothing about which codes exist.

Every create, claim and end is written to the audit log in the same transaction. A claim queues the
patient's FHIR ``Consent`` and an end its update to ``inactive`` (:mod:`fhir_bridge.relationship.consent`),
in that same transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Table, bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached

from fhir_bridge import audit
from fhir_bridge.errors import BadRequest, Conflict, NotFound, TooManyRequests, Unprocessable
from fhir_bridge.relationship import consent
from fhir_bridge.storage import Database
from fhir_bridge.storage.models import Enrollment, PairingAttempt, Tenant, VendorClient

ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"
CODE_LENGTH = 10
ATTEMPT_WINDOW = timedelta(hours=1)
PATIENT_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# ASCII only: homoglyph and zero-width variants of a user id must not become a second user (P17).
APP_USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
INVALID_CODE_MESSAGE = (
    "This pairing code cannot be used: it may be mistyped, expired, already used, or issued for "
    "another app. Check it, or ask the clinician for a new code."
)


def new_code() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))


def display(code: str) -> str:
    half = CODE_LENGTH // 2
    return f"{code[:half]}-{code[half:]}"


def normalise(typed: str) -> str | None:
    """The canonical code for what a person typed, or None if it cannot be one of ours."""
    code = re.sub(r"[\s\-]", "", typed).upper()
    if len(code) != CODE_LENGTH or any(ch not in ALPHABET for ch in code):
        return None
    return code


def code_hash(secret: str, code: str) -> str:
    return hmac.new(secret.encode(), code.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Created:
    enrollment_id: uuid.UUID
    code: str
    expires_at: datetime


def create(
    db: Database,
    *,
    secret: str,
    tenant_id: str,
    patient_id: str,
    vendor_client_id: str,
    created_by: str,
    ttl_seconds: int,
    now: datetime | None = None,
) -> Created:
    """A pending enrollment and its pairing code (returned once, never stored in clear)."""
    now = now or datetime.now(UTC)
    if not PATIENT_ID.fullmatch(patient_id):
        raise BadRequest(
            "the patient id must be a FHIR id (1-64 of A-Z a-z 0-9 - .)", code="invalid-patient-id"
        )
    with db.transaction() as session:
        tenant = session.get(Tenant, tenant_id)
        if tenant is None or tenant.status != "active":
            raise NotFound(f"no active EHR (tenant) {tenant_id!r}", code="tenant-not-found")
        vendor = _vendor_by_client_id(session, vendor_client_id)
        if vendor is None or vendor.status != "active":
            raise NotFound(f"no active vendor {vendor_client_id!r}", code="vendor-not-found")
        code = new_code()
        enrollment = Enrollment(
            tenant_id=tenant_id,
            patient_id=patient_id,
            vendor_id=vendor.id,
            status="pending",
            code_hash=code_hash(secret, code),
            code_expires_at=now + timedelta(seconds=ttl_seconds),
            created_by=created_by,
            created_at=now,
        )
        session.add(enrollment)
        session.flush()
        audit.record(
            session,
            actor_type="user",
            actor_id=created_by,
            action="enrollment.create",
            tenant_id=tenant_id,
            patient_id=patient_id,
            target=f"enrollment/{enrollment.id}",
            detail={"vendor": vendor.client_id},
            now=now,
        )
        assert enrollment.code_expires_at is not None
        return Created(enrollment.id, code, enrollment.code_expires_at)


def _vendor_by_client_id(session: Session, client_id: str) -> VendorClient | None:
    return session.execute(
        select(VendorClient).where(VendorClient.client_id == client_id)
    ).scalar_one_or_none()


def check_app_user_id(app_user_id: object, *, field: str = "app_user_id") -> str:
    if not isinstance(app_user_id, str) or not APP_USER_ID.fullmatch(app_user_id):
        raise Unprocessable(
            f"{field} must be 1-128 ASCII characters: letters, digits and . _ : @ - (starting with a letter "
            "or digit)",
            code="invalid-app-user-id",
            details={"field": field},
        )
    return app_user_id


def _throttle(session: Session, vendor: VendorClient, max_attempts: int, now: datetime) -> None:
    since = now - ATTEMPT_WINDOW
    count, oldest = session.execute(
        select(func.count(), func.min(PairingAttempt.at)).where(
            PairingAttempt.vendor_id == vendor.id, PairingAttempt.at > since
        )
    ).one()
    if count >= max_attempts:
        oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)
        retry = max(1, int((oldest + ATTEMPT_WINDOW - now).total_seconds()) + 1)
        raise TooManyRequests(
            f"Too many failed pairing attempts ({count} in the last hour). Try again in {retry} seconds.",
            retry_after=retry,
            code="pairing-rate-limited",
        )


def claim(
    db: Database,
    *,
    secret: str,
    vendor: VendorClient,
    code: object,
    app_user_id: object,
    max_attempts: int,
    now: datetime | None = None,
) -> Enrollment:
    """Bind the app user to the code's patient. Failures are counted and answered uniformly."""
    now = now or datetime.now(UTC)
    user = check_app_user_id(app_user_id)
    if not isinstance(code, str) or len(code) > 64:
        raise Unprocessable(
            "code must be the pairing code as a string", code="invalid-request", details={"field": "code"}
        )
    canonical = normalise(code)
    failed = False
    with db.transaction() as session:
        _throttle(session, vendor, max_attempts, now)
        enrollment = None
        if canonical is not None:
            enrollment = session.execute(
                select(Enrollment)
                .where(Enrollment.code_hash == code_hash(secret, canonical))
                .with_for_update()
            ).scalar_one_or_none()
        expires = enrollment.code_expires_at if enrollment is not None else None
        usable = (
            enrollment is not None
            and enrollment.status == "pending"
            and enrollment.vendor_id == vendor.id
            and expires is not None
            and now < expires
        )
        if not usable:
            # Committed with the transaction, then answered with the one uniform error below.
            session.add(PairingAttempt(vendor_id=vendor.id, at=now))
            audit.record(
                session,
                actor_type="vendor",
                actor_id=vendor.client_id,
                action="enrollment.claim",
                outcome="failure",
                now=now,
            )
            failed = True
        else:
            assert enrollment is not None
            live = session.execute(
                select(Enrollment.id).where(
                    Enrollment.vendor_id == vendor.id,
                    Enrollment.app_user_id == user,
                    Enrollment.status == "active",
                )
            ).scalar()
            if live is not None:
                raise Conflict(
                    "This app user is already enrolled. End that enrollment first (DELETE "
                    "/api/v1/enrollments/{id}), then claim the new code.",
                    code="app-user-already-enrolled",
                )
            enrollment.status = "active"
            enrollment.app_user_id = user
            enrollment.claimed_at = now
            enrollment.code_hash = None
            enrollment.code_expires_at = None
            consent.on_claim(session, enrollment, vendor, now)
            audit.record(
                session,
                actor_type="vendor",
                actor_id=vendor.client_id,
                action="enrollment.claim",
                tenant_id=enrollment.tenant_id,
                patient_id=enrollment.patient_id,
                target=f"enrollment/{enrollment.id}",
                now=now,
            )
            try:
                session.flush()
            except IntegrityError:
                raise Conflict(
                    "This app user is already enrolled.", code="app-user-already-enrolled"
                ) from None
    if failed:
        raise Unprocessable(INVALID_CODE_MESSAGE, code="invalid-pairing-code", details={"field": "code"})
    assert enrollment is not None
    return enrollment


def get_for_vendor(db: Database, *, vendor: VendorClient, enrollment_id: str) -> Enrollment:
    """A claimed enrollment of this vendor; anything else (other vendor, pending, bad id) is 404 (M8)."""
    enrollment_uuid = _parse_uuid(enrollment_id)
    with db.sessions() as session:
        enrollment = session.get(Enrollment, enrollment_uuid) if enrollment_uuid else None
        if enrollment is None or enrollment.vendor_id != vendor.id or enrollment.status == "pending":
            raise NotFound("No enrollment of yours has this id.", code="enrollment-not-found")
        return enrollment


def list_for_vendor(
    db: Database,
    *,
    vendor: VendorClient,
    status: str | None,
    app_user_id: str | None,
    limit: int,
    after: str | None,
) -> list[Enrollment]:
    with db.sessions() as session:
        query = select(Enrollment).where(Enrollment.vendor_id == vendor.id, Enrollment.status != "pending")
        if status:
            query = query.where(Enrollment.status == status)
        if app_user_id:
            query = query.where(Enrollment.app_user_id == app_user_id)
        if after:
            cursor = _parse_uuid(after)
            if cursor is None:
                raise BadRequest(
                    "'after' must be an enrollment id from a previous page", code="invalid-cursor"
                )
            query = query.where(Enrollment.id > cursor)
        return list(session.execute(query.order_by(Enrollment.id).limit(limit)).scalars())


def end(
    db: Database,
    *,
    enrollment_id: str,
    actor_type: str,
    actor_id: str,
    vendor: VendorClient | None = None,
    now: datetime | None = None,
) -> Enrollment:
    """End an enrollment now: pushes for its app user are refused from this moment (M10).

    Records accepted before the end stay queued for delivery: they were collected while the patient
    was enrolled, and the EHR is the record of care.
    """
    now = now or datetime.now(UTC)
    enrollment_uuid = _parse_uuid(enrollment_id)
    with db.transaction() as session:
        enrollment = (
            session.execute(
                select(Enrollment).where(Enrollment.id == enrollment_uuid).with_for_update()
            ).scalar()
            if enrollment_uuid
            else None
        )
        if enrollment is None or (
            vendor is not None and (enrollment.vendor_id != vendor.id or enrollment.status == "pending")
        ):
            raise NotFound("No enrollment of yours has this id.", code="enrollment-not-found")
        if enrollment.status in ("pending", "active"):
            consent.on_end(session, enrollment, now)
            enrollment.status = "ended"
            enrollment.ended_at = now
            enrollment.ended_by = f"{actor_type}:{actor_id}"[:255]
            enrollment.code_hash = None
            enrollment.code_expires_at = None
            audit.record(
                session,
                actor_type=actor_type,
                actor_id=actor_id,
                action="enrollment.end",
                tenant_id=enrollment.tenant_id,
                patient_id=enrollment.patient_id,
                target=f"enrollment/{enrollment.id}",
                now=now,
            )
        return enrollment


# Built once (it runs on every push): the same statement, with the values as parameters.
_ENROLLMENTS: Table = Enrollment.__table__  # type: ignore[assignment]
_ACTIVE_BY_APP_USER = select(_ENROLLMENTS).where(
    _ENROLLMENTS.c.vendor_id == bindparam("vendor_id"),
    _ENROLLMENTS.c.status == "active",
    _ENROLLMENTS.c.app_user_id.in_(bindparam("app_user_ids", expanding=True)),
)


def active_by_app_user(session: Session, vendor_id: int, app_user_ids: set[str]) -> dict[str, Enrollment]:
    """Active enrollments of this vendor for these app users, keyed by app user id.

    Read as Core rows and returned as detached, read-only ``Enrollment`` objects (the push path
    reads their ids, tenant and patient and never changes them): the ORM query was the largest
    single statement of a single-record push. Not in the session's identity map, so a caller that
    wants to change an enrollment loads it with ``session.get``.
    """
    if not app_user_ids:
        return {}
    params = {"vendor_id": vendor_id, "app_user_ids": list(app_user_ids)}
    found: dict[str, Enrollment] = {}
    for row in session.connection().execute(_ACTIVE_BY_APP_USER, params):
        if row.app_user_id is None:
            continue
        enrollment = Enrollment(**row._asdict())
        make_transient_to_detached(enrollment)
        found[row.app_user_id] = enrollment
    return found


@dataclass(frozen=True)
class EnrollmentRow:
    id: uuid.UUID
    tenant_id: str
    patient_id: str
    vendor: str
    app_user_id: str | None
    status: str
    created_at: datetime
    code_expires_at: datetime | None


def list_all(db: Database, *, tenant_id: str | None = None, vendor: str | None = None) -> list[EnrollmentRow]:
    """Every enrollment, for hospital IT (the CLI)."""
    with db.sessions() as session:
        query = select(Enrollment, VendorClient.client_id).join(
            VendorClient, Enrollment.vendor_id == VendorClient.id
        )
        if tenant_id:
            query = query.where(Enrollment.tenant_id == tenant_id)
        if vendor:
            query = query.where(VendorClient.client_id == vendor)
        rows = session.execute(query.order_by(Enrollment.created_at)).all()
        return [
            EnrollmentRow(
                id=e.id,
                tenant_id=e.tenant_id,
                patient_id=e.patient_id,
                vendor=client_id,
                app_user_id=e.app_user_id,
                status=e.status,
                created_at=e.created_at,
                code_expires_at=e.code_expires_at,
            )
            for e, client_id in rows
        ]


def _parse_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return None
