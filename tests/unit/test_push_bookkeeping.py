"""Submissions, Idempotency-Key and status routes: what a vendor can rely on when it retries or asks."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from fhir_bridge import services
from tests.conftest import AppFactory
from tests.support.http import json_of
from tests.support.openapi import assert_matches_spec
from tests.support.vendor import Vendor, add_tenant, register
from tests.unit.test_push_payloads import stored

# No one enrolled "nobody": every record is rejected, so these tests need no mapping catalogue.
BATCH = {"records": [{"record_id": "r-1", "app_user_id": "nobody", "measure": "phq9", "data": {}}]}


@pytest.fixture
def app(make_app: AppFactory) -> Flask:
    app = make_app()
    add_tenant(services.from_app(app).db)
    return app


@pytest.fixture
def vendor(app: Flask) -> Vendor:
    return register(app, "acme-mood")


def test_every_push_gets_a_submission_the_vendor_can_read(app: Flask, vendor: Vendor) -> None:
    response = vendor.post("/api/v1/records", json=BATCH)
    assert response.status_code == 200
    assert_matches_spec(response, "POST", "/api/v1/records")
    body = response.json
    assert body["counts"] == {"accepted": 0, "duplicate": 0, "rejected": 1}
    submission = vendor.get(f"/api/v1/submissions/{body['submission_id']}")
    assert submission.status_code == 200
    assert_matches_spec(submission, "GET", "/api/v1/submissions/{submission_id}")
    assert submission.json["counts"] == {"received": 1, "accepted": 0, "duplicate": 0, "rejected": 1}
    assert submission.json["records"] == []


def test_idempotency_key_replays_conflicts_and_never_duplicates(app: Flask, vendor: Vendor) -> None:
    first = vendor.post("/api/v1/records", json=BATCH, headers={"Idempotency-Key": "k-1"})
    again = vendor.post("/api/v1/records", json=BATCH, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == first.status_code == 200
    assert again.get_data() == first.get_data()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    changed = {"records": [{**BATCH["records"][0], "record_id": "r-2"}]}
    conflict = vendor.post("/api/v1/records", json=changed, headers={"Idempotency-Key": "k-1"})
    assert conflict.status_code == 409
    assert conflict.json["error"] == "idempotency-key-reused"
    assert_matches_spec(conflict, "POST", "/api/v1/records")
    assert stored(app) == (1, 0, 0)
    # keys are per vendor: another vendor's identical key is a new request
    rival = register(app, "rival-app")
    assert (
        "Idempotent-Replayed"
        not in rival.post("/api/v1/records", json=BATCH, headers={"Idempotency-Key": "k-1"}).headers
    )
    assert stored(app) == (2, 0, 0)


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "a\tb"])
def test_bad_idempotency_keys_are_refused(app: Flask, vendor: Vendor, key: str) -> None:
    response = vendor.client.post(
        "/api/v1/records",
        json=BATCH,
        headers={"Authorization": f"Bearer {vendor.token}", "Idempotency-Key": key},
    )
    assert response.status_code == 400
    assert json_of(response)["error"] == "invalid-idempotency-key"
    assert stored(app) == (0, 0, 0)


def test_status_of_other_vendors_submissions_is_not_found(app: Flask, vendor: Vendor) -> None:
    submission_id = vendor.post("/api/v1/records", json=BATCH).json["submission_id"]
    rival = register(app, "rival-app")
    for path in (f"/api/v1/submissions/{submission_id}", "/api/v1/submissions/nope", "/api/v1/records/nope"):
        response: Any = rival.get(path)
        assert response.status_code == 404
        assert response.json["error"] in ("submission-not-found", "record-not-found")
