"""The audit trail: who did what to which enrollment or vendor, append-only and hash-chained.

HIPAA 164.312(b) wants activity on systems holding PHI recorded and reviewable; the security
checklist (section 4) asks for pairing create/consume/revoke, vendor changes and auth failures to
be audited in an integrity-protected, append-only store. The table refuses UPDATE and DELETE at the
database level (migration 0001); here each row's ``hash`` covers its content and the previous
row's hash, so removing or altering a row breaks the chain where :func:`verify_chain` finds it.

Writers must not interleave while reading the chain head, so :func:`record` serialises them: on
PostgreSQL with a transaction-scoped advisory lock, on SQLite by the write lock every transaction
already takes (``BEGIN IMMEDIATE``, see :mod:`fhir_bridge.storage.database`). The row is written in
the caller's transaction, so an action and its audit row commit or roll back together.

Rows name actors and targets by reference (ids, never names) and carry no clinical values: the
``detail`` members are restricted to short scalars.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from fhir_bridge.storage.models import AuditEvent

GENESIS = "0" * 64
# Any constant works; it only has to be the same in every process (pg_advisory_xact_lock(bigint)).
_PG_LOCK_KEY = 0x6668_6972_6175_6474  # "fhiraudt"
_MAX_DETAIL_TEXT = 200


def _digest(prev_hash: str, fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256((prev_hash + "\n" + canonical).encode()).hexdigest()


def _fields(event: AuditEvent) -> dict[str, Any]:
    return {
        "at": event.at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor_type": event.actor_type,
        "actor_id": event.actor_id,
        "action": event.action,
        "tenant_id": event.tenant_id,
        "patient_id": event.patient_id,
        "target": event.target,
        "outcome": event.outcome,
        "detail": event.detail,
    }


def _check_detail(detail: dict[str, Any]) -> dict[str, Any]:
    for key, value in detail.items():
        if not isinstance(value, str | int | bool | None) or (
            isinstance(value, str) and len(value) > _MAX_DETAIL_TEXT
        ):
            raise ValueError(f"audit detail {key!r} must be a short scalar (ids and codes, never payloads)")
    return detail


def record(
    session: Session,
    *,
    actor_type: str,
    actor_id: str,
    action: str,
    tenant_id: str | None = None,
    patient_id: str | None = None,
    target: str | None = None,
    outcome: str = "success",
    detail: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> AuditEvent:
    """Append one event to the chain inside the caller's transaction."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    prev = session.execute(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)).scalar()
    at = (now or datetime.now(UTC)).astimezone(UTC)
    event = AuditEvent(
        at=at,
        actor_type=actor_type,
        actor_id=actor_id,
        action=action,
        tenant_id=tenant_id,
        patient_id=patient_id,
        target=target,
        outcome=outcome,
        detail=_check_detail(dict(detail or {})),
        prev_hash=prev or GENESIS,
    )
    event.hash = _digest(event.prev_hash, _fields(event))
    session.add(event)
    session.flush()
    return event


def verify_chain(session: Session) -> int | None:
    """The id of the first row whose hash or link is wrong, or None when the whole chain holds."""
    prev = GENESIS
    for event in session.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars():
        if event.prev_hash != prev or event.hash != _digest(prev, _fields(event)):
            return event.id
        prev = event.hash
    return None
