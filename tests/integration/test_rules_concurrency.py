"""Two pushes for one patient at the same moment, on PostgreSQL: the rule fires once, and neither push
fails (the per-patient advisory lock serialises the evaluations; the open-alert unique index and the
push's one retry would catch a second firing anyway)."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import select

from fhir_bridge.push import Mapper, Outcome, push
from fhir_bridge.settings import load_settings
from fhir_bridge.storage import Database, migrate
from fhir_bridge.storage.models import Alert, Enrollment, Measurement, OutboxItem, Tenant, VendorClient
from tests.support.postgres import PostgresServer


def _phq9(record_id: str, at: datetime, item9: int) -> dict[str, Any]:
    answers: dict[str, Any] = {f"item{i}": 1 for i in range(1, 9)} | {
        "item9": item9,
        "difficulty": "LA6573-5",
    }
    return {
        "record_id": record_id,
        "app_user_id": "u1",
        "measure": "phq9",
        "data": {"authored": at.isoformat(), "answers": answers},
    }


def test_concurrent_pushes_for_one_patient_fire_a_rule_once(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    settings = load_settings(
        {"INSTANCE_PATH": str(tmp_path / "inst"), "DATABASE_URL": pg_server.create_database()}, environ={}
    )
    db = Database(settings.effective_database_url)
    migrate.upgrade(db)
    with db.transaction() as session:
        session.add(Tenant(id="t1", name="T1", fhir_base_url=f"https://ehr.example/{uuid.uuid4().hex}/fhir"))
        vendor = VendorClient(client_id="acme", name="Acme", scopes="records.write")
        session.add(vendor)
        session.flush()
        session.add(Enrollment(tenant_id="t1", patient_id="p1", vendor_id=vendor.id, app_user_id="u1",
                               status="active", claimed_at=datetime.now(UTC)))  # fmt: skip
        session.flush()
        session.expunge(vendor)
    mapper = Mapper(settings)
    start = datetime.now(UTC) - timedelta(days=3)
    batches = [
        [_phq9(f"a{i}", start + timedelta(hours=i), 1) for i in range(5)],
        [_phq9(f"b{i}", start + timedelta(hours=i, minutes=30), 1) for i in range(5)],
    ]
    barrier = threading.Barrier(2)
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []

    def run(records: list[dict[str, Any]]) -> None:
        try:
            barrier.wait()
            outcomes.append(
                push(
                    db,
                    mapper,
                    vendor=vendor,
                    records=records,
                    body=orjson.dumps(records),
                    idempotency_key=None,
                )
            )
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert errors == []
        assert sorted(o.status for o in outcomes) == [200, 200]
        assert all(orjson.loads(o.body)["counts"]["accepted"] == 5 for o in outcomes)
        with db.sessions() as session:
            alerts = session.scalars(select(Alert).where(Alert.rule_id == "safety-item9")).all()
            assert len(alerts) == 1 and alerts[0].status == "open"
            assert (
                len(session.scalars(select(Measurement).where(Measurement.code == "phq9.item9")).all()) == 10
            )
            flags = session.scalars(select(OutboxItem).where(OutboxItem.resource_type == "Flag")).all()
            assert len(flags) == 1
    finally:
        db.dispose()
