"""Backfill: a vendor pushes a patient's history with ``mode=backfill``; live data still goes first,
history goes in large transaction Bundles at the EHR's backfill rate limit. Requests are counted at a
proxy in front of the third-party FHIR server (what the EHR sees), never timed in the test."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import orjson
import pytest
from flask import Flask
from sqlalchemy import select, update

from fhir_bridge import services
from fhir_bridge.delivery import Worker
from fhir_bridge.fhir_client import FhirClient
from fhir_bridge.storage.models import OutboxItem, Tenant
from tests.conftest import AppFactory
from tests.integration.delivery.conftest import CLIENT_ID, drain
from tests.support.fault_proxy import FaultProxy
from tests.support.outbox_seed import add_tenant, in_ehr
from tests.support.sekmet import SekmetServer
from tests.support.vendor import enroll, register

pytestmark = [pytest.mark.ehr]


@pytest.fixture
def proxy(smart_ehr: SekmetServer) -> Iterator[FaultProxy]:
    server = FaultProxy(smart_ehr.base_url).start()
    yield server
    server.stop()


def steps(prefix: str, days: int, start: date) -> list[dict[str, Any]]:
    return [
        {
            "record_id": f"{prefix}-{n}",
            "app_user_id": "user-1",
            "measure": "steps-daily",
            "data": {"date": (start + timedelta(days=n)).isoformat(), "steps": 1000 + n},
        }
        for n in range(days)
    ]


def enrolled_vendor(app: Flask, tenant: str, patient: str) -> Any:
    vendor = register(app, f"acme-{uuid.uuid4().hex[:6]}")
    enroll(app, vendor, tenant, patient)
    return vendor


def bundles(proxy: FaultProxy) -> list[dict[str, Any]]:
    """Transaction Bundles the EHR received, in arrival order."""
    out = []
    for _, method, path, body in proxy.requests:
        if method == "POST" and path.rstrip("/").endswith("/fhir") and body:
            out.append(orjson.loads(body))
    return out


def record_ids_in(bundle: dict[str, Any]) -> set[float]:
    """Steps values identify our records here (1000 + day for history, 50000 + n for live)."""
    values: set[float] = set()
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "Observation":
            values.add(resource["valueQuantity"]["value"])
    return values


def test_backfill_is_flagged_and_an_unknown_mode_is_refused(
    make_app: AppFactory, smart_ehr: SekmetServer
) -> None:
    app = make_app(ALLOW_INSECURE_LOOPBACK=True)
    svc = services.from_app(app)
    add_tenant(svc.db, "bf-api", smart_ehr.base_url, client_id=CLIENT_ID)
    vendor = enrolled_vendor(app, "bf-api", f"p{uuid.uuid4().hex[:10]}")
    refused = vendor.post("/api/v1/records?mode=later", json={"records": steps("x", 1, date(2025, 1, 1))})
    assert refused.status_code == 400
    assert refused.json["error"] == "invalid-mode"
    assert "mode=backfill" in str(refused.json)
    history = vendor.post("/api/v1/records?mode=backfill", json={"records": steps("h", 3, date(2025, 1, 1))})
    live = vendor.post("/api/v1/records", json={"records": steps("l", 2, date(2026, 11, 1))})
    assert history.status_code == live.status_code == 200
    with svc.db.sessions() as session:
        # Vendor data only (the claim also queued the patient's Consent, live).
        priorities = Counter(
            session.scalars(select(OutboxItem.priority).where(OutboxItem.record_id.is_not(None)))
        )
    assert priorities == Counter({1: 3, 0: 2})


def test_live_records_are_delivered_before_a_backlog_of_history_which_goes_in_large_bundles(
    make_app: AppFactory, proxy: FaultProxy, ehr_reader: FhirClient
) -> None:
    app = make_app(ALLOW_INSECURE_LOOPBACK=True, WORKER_BATCH_SIZE=20, WORKER_BACKFILL_BATCH_SIZE=400)
    svc = services.from_app(app)
    add_tenant(svc.db, "bf-order", proxy.base_url, client_id=CLIENT_ID)
    patient = f"p{uuid.uuid4().hex[:10]}"
    vendor = enrolled_vendor(app, "bf-order", patient)
    # Two years of daily steps pushed at enrollment, then today's records.
    history = steps("hist", 730, date(2024, 11, 1))
    for start in range(0, len(history), 365):
        pushed = vendor.post("/api/v1/records?mode=backfill", json={"records": history[start : start + 365]})
        assert pushed.json["counts"]["accepted"] == len(history[start : start + 365])
    live = [
        {"record_id": f"live-{n}", "app_user_id": "user-1", "measure": "steps-daily",
         "data": {"date": f"2026-11-{20 + n}", "steps": 50_000 + n}}
        for n in range(3)
    ]  # fmt: skip
    assert vendor.post("/api/v1/records", json={"records": live}).json["counts"]["accepted"] == 3

    worker = Worker(svc)
    drain(worker, "bf-order")

    received = [b for b in bundles(proxy) if b.get("type") == "transaction"]
    assert record_ids_in(received[0]) == {50_000, 50_001, 50_002}, "the live records went first, alone"
    history_bundles = [record_ids_in(b) for b in received[1:]]
    assert sum(len(b) for b in history_bundles) == 730
    assert len(history_bundles) == 2, "history went in large Bundles (400 + 330), not batches of 20"
    assert sum(in_ehr(ehr_reader, patient).values()) == 733
    assert set(in_ehr(ehr_reader, patient).values()) == {1}, "each record exactly once"


def test_the_backfill_rate_limit_is_honoured_at_the_ehr(
    make_app: AppFactory, proxy: FaultProxy, ehr_reader: FhirClient
) -> None:
    app = make_app(ALLOW_INSECURE_LOOPBACK=True, WORKER_BACKFILL_BATCH_SIZE=10, WORKER_POLL_SECONDS=0.05)
    svc = services.from_app(app)
    add_tenant(svc.db, "bf-rate", proxy.base_url, client_id=CLIENT_ID, max_concurrent=8)
    with svc.db.transaction() as session:
        session.execute(
            update(Tenant)
            .where(Tenant.id == "bf-rate")
            .values(backfill_requests_per_second=4.0, backfill_max_concurrent=1)
        )
    patient = f"p{uuid.uuid4().hex[:10]}"
    vendor = enrolled_vendor(app, "bf-rate", patient)
    worker = Worker(svc)
    while worker.run_once():  # the claim's Consent (live) first, so only backfill is measured below
        pass
    proxy.requests.clear()
    proxy.max_in_flight = 0
    history = steps("hist", 60, date(2025, 1, 1))
    assert vendor.post("/api/v1/records?mode=backfill", json={"records": history}).status_code == 200

    loops = threading.Thread(target=worker.run, kwargs={"threads": 4})
    loops.start()
    try:
        drain_wait(svc, "bf-rate")
    finally:
        worker.stop.set()
        loops.join(30)

    posts = [(t, body) for t, method, _, body in proxy.requests if method == "POST" and body]
    assert len(posts) >= 6, "60 records in Bundles of 10"
    assert proxy.max_in_flight == 1, "four delivery loops, yet one backfill request at a time"
    # At most 4 requests started per second: n requests span at least (n - 1) / 4 seconds at the EHR.
    span = posts[-1][0] - posts[0][0]
    assert len(posts) - 1 <= 4 * span + 1
    assert sum(in_ehr(ehr_reader, patient).values()) == 60


def drain_wait(svc: Any, tenant: str, timeout: float = 120) -> None:
    import time

    from tests.integration.delivery.conftest import pending

    deadline = time.monotonic() + timeout
    while pending(svc.db, tenant):
        assert time.monotonic() < deadline, "backlog not delivered in time"
        time.sleep(0.05)
