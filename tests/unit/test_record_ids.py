"""Record ids are time-ordered UUIDs (version 7): what a vendor receives, and what the indexes see.

Why it matters: the id keys ``records`` and is indexed again by ``outbox`` and ``measurements``; ids
that grow with time keep a push's inserts on the last pages of those B-trees instead of one random
page per record (see :func:`fhir_bridge.push.new_ids`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from flask import Flask

from fhir_bridge import services
from fhir_bridge.push import new_ids
from tests.conftest import AppFactory
from tests.support.vendor import Vendor, add_tenant, enroll, register


def unix_ms(value: uuid.UUID) -> int:
    return value.int >> 80


def test_ids_are_version_7_in_order_unique_and_stamped_with_the_time() -> None:
    before = time.time_ns() // 1_000_000
    ids = new_ids(65_535)
    after = time.time_ns() // 1_000_000
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {unix_ms(i) for i in ids} <= set(range(before, after + 1))
    # 58 random bits per id: two calls in the same millisecond still give different ids.
    assert not set(new_ids(1_000)) & set(new_ids(1_000))


def test_more_ids_than_the_counter_holds_stay_in_order_and_unique() -> None:
    """MAX_BATCH_RECORDS may be set to 100,000: past 65,536 the millisecond field moves on by one."""
    assert new_ids(0) == []
    before = time.time_ns() // 1_000_000
    ids = new_ids(100_000)
    after = time.time_ns() // 1_000_000
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert unix_ms(ids[65_536]) == unix_ms(ids[65_535]) + 1
    assert {unix_ms(i) for i in ids} <= set(range(before, after + 2))


@pytest.fixture
def vendor(make_app: AppFactory) -> Vendor:
    app: Flask = make_app()
    add_tenant(services.from_app(app).db)
    vendor = register(app, "acme-steps")
    enroll(app, vendor, "general", "pat-1", "user-1")
    return vendor


def record(n: int) -> dict[str, Any]:
    return {
        "record_id": f"r-{n}",
        "app_user_id": "user-1",
        "measure": "steps-daily",
        "data": {"date": f"2025-03-{1 + n:02d}", "steps": 1000 + n},
    }


def test_a_push_returns_time_ordered_ids_in_record_order(vendor: Vendor) -> None:
    response = vendor.post("/api/v1/records", json={"records": [record(n) for n in range(20)]})
    assert response.status_code == 200
    ids = [uuid.UUID(r["id"]) for r in response.json["results"]]
    assert [r["status"] for r in response.json["results"]] == ["accepted"] * 20
    assert all(i.version == 7 for i in ids)
    assert ids == sorted(ids)
    # A re-send answers with the ids first given, not new ones.
    again = vendor.post("/api/v1/records", json={"records": [record(n) for n in range(20)]})
    assert [uuid.UUID(r["id"]) for r in again.json["results"]] == ids
    assert {r["status"] for r in again.json["results"]} == {"duplicate"}
