"""Delivery status as vendors see it: per submission and per record, only ever their own.

A record is ``queued`` until all of its resources are written, ``delivered`` when they are (with
each resource's type, id and version in the EHR), ``failed`` while its last attempt was refused and
a retry is pending (with the EHR's OperationOutcome), and ``dead`` once delivery gave up.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

from sqlalchemy import select

from fhir_bridge.errors import NotFound
from fhir_bridge.storage import Database
from fhir_bridge.storage.models import OutboxItem, Record, Submission, VendorClient


def _iso(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _resource(item: OutboxItem) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resource_type": item.resource_type,
        "status": item.status,
        "attempts": item.attempts,
    }
    if item.ehr_id:
        out["ehr"] = {"resource_type": item.resource_type, "id": item.ehr_id, "version": item.ehr_version}
    if item.outcome is not None and item.status != "delivered":
        out["outcome"] = item.outcome
    return out


def _record_status(record: Record, items: list[OutboxItem]) -> str:
    if record.status in ("delivered", "dead"):
        return record.status
    if any(i.status == "dead" for i in items):
        return "dead"
    if items and all(i.status == "delivered" for i in items):
        return "delivered"
    if any(i.outcome is not None and i.status == "pending" for i in items):
        return "failed"
    return "queued"


def _record_json(record: Record, items: list[OutboxItem]) -> dict[str, Any]:
    return {
        "id": str(record.id),
        "record_id": record.vendor_record_id,
        "measure": record.measure,
        "submission_id": str(record.submission_id),
        "status": _record_status(record, items),
        "received_at": _iso(record.created_at),
        "resources": [_resource(i) for i in items],
    }


def record(db: Database, *, vendor: VendorClient, record_id: str) -> dict[str, Any]:
    pk = _uuid(record_id)
    with db.sessions() as session:
        found = session.get(Record, pk) if pk else None
        if found is None or found.vendor_id != vendor.id:
            raise NotFound("No record of yours has this id.", code="record-not-found")
        items = list(
            session.execute(
                select(OutboxItem).where(OutboxItem.record_id == found.id).order_by(OutboxItem.id)
            ).scalars()
        )
        return _record_json(found, items)


def submission(db: Database, *, vendor: VendorClient, submission_id: str) -> dict[str, Any]:
    pk = _uuid(submission_id)
    with db.sessions() as session:
        found = session.get(Submission, pk) if pk else None
        if found is None or found.vendor_id != vendor.id:
            raise NotFound("No submission of yours has this id.", code="submission-not-found")
        records = list(
            session.execute(
                select(Record).where(Record.submission_id == found.id).order_by(Record.created_at, Record.id)
            ).scalars()
        )
        by_record: dict[uuid.UUID, list[OutboxItem]] = defaultdict(list)
        if records:
            items = session.execute(
                select(OutboxItem)
                .join(Record, OutboxItem.record_id == Record.id)
                .where(Record.submission_id == found.id)
                .order_by(OutboxItem.id)
            ).scalars()
            for item in items:
                if item.record_id is not None:
                    by_record[item.record_id].append(item)
        summary: dict[str, int] = defaultdict(int)
        listed = []
        for rec in records:
            state = _record_status(rec, by_record[rec.id])
            summary[state] += 1
            listed.append({"id": str(rec.id), "record_id": rec.vendor_record_id, "status": state})
        return {
            "id": str(found.id),
            "kind": found.kind,
            "received_at": _iso(found.received_at),
            "counts": {
                "received": found.record_count,
                "accepted": found.accepted_count,
                "duplicate": found.duplicate_count,
                "rejected": found.rejected_count,
            },
            "delivery": {s: summary.get(s, 0) for s in ("queued", "delivered", "failed", "dead")},
            "records": listed,
        }
