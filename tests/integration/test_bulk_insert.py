"""BulkInsert (the push path's batch writer) stores exactly what the ORM stores, on SQLite and PostgreSQL:
the same raw column values (SQLite compares timestamps as text, so their format must not drift), the
same values read back, and a unique-key clash is SQLAlchemy's IntegrityError that rolls the whole
transaction back (the push's one retry depends on it)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from sqlalchemy import Table, select, text
from sqlalchemy.exc import IntegrityError

from fhir_bridge.storage import Database, migrate
from fhir_bridge.storage.bulk import BulkInsert
from fhir_bridge.storage.models import Measurement, OutboxItem, Tenant

OUTBOX = cast(Table, OutboxItem.__table__)
LEDGER = cast(Table, Measurement.__table__)
ITEMS = BulkInsert(
    OUTBOX,
    varying=("group_key", "resource_type", "ident_system", "ident_value", "body", "record_id"),
    constant=("tenant_id", "method", "priority", "status", "attempts", "next_attempt_at", "created_at"),
)
NOW = datetime(2026, 3, 1, 10, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))


@pytest.fixture
def db(database_url: str) -> Any:
    database = Database(database_url)
    migrate.upgrade(database)
    with database.transaction() as session:
        session.add(Tenant(id="t1", name="T1", fhir_base_url=f"https://ehr.example/{uuid.uuid4().hex}"))
    yield database
    database.dispose()


def _constants(**extra: Any) -> dict[str, Any]:
    return {
        "tenant_id": "t1",
        "method": "create",
        "priority": 1,
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": NOW,
        "created_at": NOW,
    } | extra


def test_rows_are_stored_as_the_orm_stores_them(db: Database) -> None:
    with db.transaction() as session:
        session.add(
            OutboxItem(
                tenant_id="t1",
                group_key="g-orm",
                resource_type="Observation",
                ident_system="sys",
                ident_value="orm",
                body=b'{"a":1}',
                priority=1,
                status="pending",
                attempts=0,
                next_attempt_at=NOW,
                created_at=NOW,
            )
        )
        session.flush()
        sent = ITEMS.execute(
            session.connection(),
            [("g-bulk", "Observation", "sys", f"bulk-{n}", b'{"a":1}', None) for n in range(3)],
            _constants(),
        )
    assert sent == 3
    columns = "tenant_id, group_key, resource_type, method, priority, status, attempts, next_attempt_at, "
    columns += "created_at, body, record_id, lease_until"
    with db.sessions() as session:
        raw = session.execute(text(f"SELECT {columns} FROM outbox ORDER BY id")).all()
        items = session.scalars(select(OutboxItem).order_by(OutboxItem.id)).all()
    assert len(raw) == 4
    orm_row, bulk_rows = raw[0], raw[1:]
    for row in bulk_rows:
        assert row[0] == orm_row[0] and tuple(row[2:]) == tuple(orm_row[2:])
    assert [i.ident_value for i in items] == ["orm", "bulk-0", "bulk-1", "bulk-2"]
    assert all(i.next_attempt_at == NOW and i.next_attempt_at.tzinfo is not None for i in items)
    assert all(i.body == b'{"a":1}' and i.record_id is None and i.id is not None for i in items)


def test_varying_uuids_and_aware_datetimes_are_converted_per_row(db: Database) -> None:
    from fhir_bridge.storage.models import Enrollment, Record, Submission, VendorClient

    with db.transaction() as session:
        vendor = VendorClient(client_id="v", name="V", scopes="records.write")
        session.add(vendor)
        session.flush()
        enrollment = Enrollment(tenant_id="t1", patient_id="p1", vendor_id=vendor.id, app_user_id="u1",
                                status="active", claimed_at=NOW)  # fmt: skip
        submission = Submission(vendor_id=vendor.id, received_at=NOW)
        session.add_all([enrollment, submission])
        session.flush()
        record_ids = [uuid.uuid4() for _ in range(2)]
        session.add_all(
            Record(
                id=rid,
                submission_id=submission.id,
                vendor_id=vendor.id,
                vendor_record_id=f"r{n}",
                measure="mood",
                enrollment_id=enrollment.id,
                status="queued",
                created_at=NOW,
                updated_at=NOW,
            )
            for n, rid in enumerate(record_ids)
        )
        session.flush()
        ledger = BulkInsert(
            LEDGER,
            varying=("record_id", "at", "value"),
            constant=("tenant_id", "patient_id", "enrollment_id", "code", "utc_offset_min"),
        )
        times = [NOW, NOW.astimezone(timezone(timedelta(hours=-5))) + timedelta(days=1)]
        ledger.execute(
            session.connection(),
            [(rid, at, float(n)) for n, (rid, at) in enumerate(zip(record_ids, times, strict=True))],
            {
                "tenant_id": "t1",
                "patient_id": "p1",
                "enrollment_id": enrollment.id,
                "code": "mood.rating",
                "utc_offset_min": 0,
            },
        )
    with db.sessions() as session:
        rows = session.scalars(select(Measurement).order_by(Measurement.value)).all()
        later = session.scalars(select(Measurement.value).where(Measurement.at > NOW)).all()
    assert [(m.record_id, m.at, m.value) for m in rows] == [
        (record_ids[0], NOW.astimezone(UTC), 0.0),
        (record_ids[1], times[1].astimezone(UTC), 1.0),
    ]
    assert later == [1.0]  # compared as the ORM's own queries compare them


def test_a_unique_clash_is_an_integrity_error_and_nothing_is_written(db: Database) -> None:
    rows = [("g", "Observation", "sys", "same", b"{}", None)]
    with db.transaction() as session:
        ITEMS.execute(session.connection(), rows, _constants())
    with pytest.raises(IntegrityError), db.transaction() as session:
        ITEMS.execute(
            session.connection(), [("g2", "Observation", "sys", "other", b"{}", None)], _constants()
        )
        ITEMS.execute(session.connection(), rows, _constants())
    with db.sessions() as session:
        assert session.scalars(select(OutboxItem.ident_value)).all() == ["same"]


def test_constants_must_match_the_declared_columns(db: Database) -> None:
    with pytest.raises(ValueError, match="constants must name exactly"), db.transaction() as session:
        ITEMS.execute(session.connection(), [], {"tenant_id": "t1"})
    with pytest.raises(ValueError, match="no column nope"):
        BulkInsert(OUTBOX, varying=("nope",), constant=())


def test_a_push_racing_another_with_the_same_records_retries_and_reports_duplicates(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: a second push looked up its record ids before the first committed them. Its batch
    insert (COPY on PostgreSQL) then meets the unique key; the push retries once, sees duplicates,
    and nothing is written twice. The lookup is made blind once to stand for the race's timing."""
    from fhir_bridge import push as push_module
    from fhir_bridge.settings import load_settings
    from fhir_bridge.storage.models import Enrollment, Record, VendorClient

    with db.transaction() as session:
        vendor = VendorClient(client_id="v", name="V", scopes="records.write")
        session.add(vendor)
        session.flush()
        session.add(Enrollment(tenant_id="t1", patient_id="p1", vendor_id=vendor.id, app_user_id="u1",
                               status="active", claimed_at=NOW))  # fmt: skip
        session.flush()
        session.expunge(vendor)
    mapper = push_module.Mapper(load_settings({"INSTANCE_PATH": str(tmp_path)}, environ={}))
    records = [
        {"record_id": f"r{n}", "app_user_id": "u1", "measure": "mood",
         "data": {"time": "2026-03-01T08:00:00+02:00", "rating": n}}
        for n in range(5)
    ]  # fmt: skip

    def run() -> dict[str, Any]:
        body = orjson.dumps({"records": records})
        outcome = push_module.push(
            db, mapper, vendor=vendor, records=records, body=body, idempotency_key=None
        )
        assert outcome.status == 200
        return dict(orjson.loads(outcome.body)["counts"])

    assert run() == {"accepted": 5, "duplicate": 0, "rejected": 0}
    real = push_module.existing_records
    calls: list[int] = []

    def blind_once(*args: Any) -> dict[str, uuid.UUID]:
        calls.append(1)
        return {} if len(calls) == 1 else real(*args)

    monkeypatch.setattr(push_module, "existing_records", blind_once)
    assert run() == {"accepted": 0, "duplicate": 5, "rejected": 0}
    assert len(calls) == 2  # the first run failed on the unique key and was retried
    with db.sessions() as session:
        assert len(session.scalars(select(Record.id)).all()) == 5
        assert len(session.scalars(select(OutboxItem.id)).all()) == 5
        assert len(session.scalars(select(Measurement.id)).all()) == 5
