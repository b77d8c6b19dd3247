"""The single-record push's shortcuts keep every refusal immediate (issue 9).

The push path reads the vendor once, inside the push's own transaction, remembers verified access
tokens until they expire and reuses the vendor object while its row is unchanged. None of that may
let a disabled vendor, a removed signing key or an expired token through for even one request.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from auth.keys import Keyring
from fhir_bridge import services, vendors
from tests.conftest import AppFactory
from tests.support.vendor import Vendor, add_tenant, enroll, register
from tests.unit.test_push_payloads import stored


@pytest.fixture
def app(make_app: AppFactory) -> Flask:
    app = make_app()
    add_tenant(services.from_app(app).db)
    return app


@pytest.fixture
def vendor(app: Flask) -> Vendor:
    vendor = register(app, "acme-steps")
    enroll(app, vendor, "general", "pat-1", "user-1")
    return vendor


def steps(record_id: str) -> dict[str, Any]:
    return {
        "records": [
            {
                "record_id": record_id,
                "app_user_id": "user-1",
                "measure": "steps-daily",
                "data": {"date": "2025-03-04", "steps": 4321},
            }
        ]
    }


OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "55423-8"}]},
    "effectiveDateTime": "2025-03-04",
    "valueQuantity": {"value": 4321, "unit": "steps"},
}


def test_a_disabled_vendor_is_refused_on_its_next_push_and_nothing_is_stored(
    app: Flask, vendor: Vendor
) -> None:
    first = vendor.post("/api/v1/records", json=steps("r-1"))
    assert first.status_code == 200 and first.json["counts"]["accepted"] == 1
    before = stored(app)
    vendors.disable(services.from_app(app).db, client_id=vendor.client_id, actor="test")
    for path, body in (("/api/v1/records", steps("r-2")), ("/fhir/Observation", OBSERVATION)):
        refused = vendor.post(path, json=body)
        assert refused.status_code == 401, (path, refused.json)
        assert "disabled" in refused.get_data(as_text=True)
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    # the same with an Idempotency-Key the vendor used before: no replay for a disabled vendor
    replay = vendor.post("/api/v1/records", json=steps("r-1"), headers={"Idempotency-Key": "k"})
    assert replay.status_code == 401
    assert stored(app) == before


def test_a_token_stops_working_when_its_signing_key_leaves_the_keyring(app: Flask, vendor: Vendor) -> None:
    assert vendor.post("/api/v1/records", json=steps("r-1")).status_code == 200
    assert vendor.post("/api/v1/records", json=steps("r-2")).status_code == 200  # remembered now
    folder = Path(services.from_app(app).settings.keys_path)
    for path in folder.glob("*.json"):
        path.unlink()
    Keyring(folder).ensure()  # a new key: the token's kid is no longer there
    refused = vendor.post("/api/v1/records", json=steps("r-3"))
    assert refused.status_code == 401
    assert refused.json["error"] == "invalid_token"


def test_a_remembered_token_still_expires(app: Flask, vendor: Vendor) -> None:
    import time_machine

    assert vendor.post("/api/v1/records", json=steps("r-1")).status_code == 200
    with time_machine.travel(time.time() + 301, tick=False):
        refused = vendor.post("/api/v1/records", json=steps("r-2"))
    assert refused.status_code == 401
    assert "expired" in refused.json["message"]


def test_the_vendor_object_is_rebuilt_when_its_row_changes_and_gone_when_disabled(
    app: Flask, vendor: Vendor
) -> None:
    db = services.from_app(app).db
    active = vendors.ActiveVendors(db)
    first = active.get(vendor.client_id)
    assert first is not None and active.get(vendor.client_id) is first
    assert active.snapshot(vendor.client_id) is first
    vendors.set_scopes(db, client_id=vendor.client_id, scopes=["records.write"], actor="test")
    second = active.get(vendor.client_id)
    assert second is not None and second is not first and second.scopes == "records.write"
    vendors.disable(db, client_id=vendor.client_id, actor="test")
    assert active.get(vendor.client_id) is None
    assert active.snapshot(vendor.client_id) is None
    assert active.get("no-such-vendor") is None


def test_a_snapshot_is_read_again_after_its_time(app: Flask, vendor: Vendor) -> None:
    db = services.from_app(app).db
    now = [1000.0]
    active = vendors.ActiveVendors(db, clock=lambda: now[0])
    first = active.snapshot(vendor.client_id)
    vendors.set_scopes(db, client_id=vendor.client_id, scopes=["records.write"], actor="test")
    assert active.snapshot(vendor.client_id) is first  # within SNAPSHOT_SECONDS: not read
    now[0] += active.SNAPSHOT_SECONDS
    refreshed = active.snapshot(vendor.client_id)
    assert refreshed is not None and refreshed.scopes == "records.write"


def test_new_data_still_ends_an_ongoing_absence_episode(app: Flask, vendor: Vendor) -> None:
    """Pushes of data only schedule rules read skip the rules' lock only when no episode is ongoing."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import select

    from fhir_bridge.rules import engine
    from fhir_bridge.storage.models import Alert

    db = services.from_app(app).db
    old = (datetime.now(UTC) - timedelta(days=30)).date().isoformat()
    older = {"records": [{**steps("r-old")["records"][0], "data": {"date": old, "steps": 100}}]}
    first = vendor.post("/api/v1/records", json=older)
    assert first.json["counts"]["accepted"] == 1
    assert vendor.post("/api/v1/records", json=steps("r-quiet")).status_code == 200  # nothing ongoing
    # 30 days of silence as of the schedule run: the disengagement episode starts
    with db.transaction() as session:
        fired = engine.run_scheduled_rules(session, datetime.now(UTC) + timedelta(days=60))
        assert [a.rule_id for a in fired] == ["disengagement"]
    with db.sessions() as session:
        alert = session.execute(select(Alert)).scalar_one()
        assert alert.episode_ended_at is None
    today = datetime.now(UTC).date().isoformat()
    late = {"records": [{**steps("r-new")["records"][0], "data": {"date": today, "steps": 5}}]}
    assert vendor.post("/api/v1/records", json=late).json["counts"]["accepted"] == 1
    with db.sessions() as session:
        assert session.execute(select(Alert)).scalar_one().episode_ended_at is not None
