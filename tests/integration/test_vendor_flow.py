"""The issue's "done when", on SQLite and PostgreSQL: a vendor registered with the CLI gets a token with a
signed assertion, claims a pairing code made with the CLI, pushes a mixed batch and gets exactly the
right result per record; the outbox then holds exactly the accepted records' resources.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask
from sqlalchemy import select, text

from fhir_bridge import services
from fhir_bridge.storage.models import OutboxItem, Record, Submission
from tests.conftest import AppFactory
from tests.support.openapi import assert_matches_spec, example
from tests.support.postgres import PostgresServer
from tests.support.vendor import Vendor, add_tenant, public_jwks, vendor_key


def run_cli(app: Flask, *args: str) -> str:
    """Our real command, as hospital IT runs it, against the app's database and instance folder."""
    settings = services.from_app(app).settings
    env = {
        "FHIR_BRIDGE_INSTANCE_PATH": str(settings.instance_path),
        "FHIR_BRIDGE_DATABASE_URL": settings.database_url,
        "FHIR_BRIDGE_KEYS_DIR": str(settings.keys_path),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-m", "fhir_bridge", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


@pytest.fixture
def app(make_app: AppFactory, database_url: str) -> Iterator[Flask]:
    app = make_app(DATABASE_URL=database_url)
    add_tenant(services.from_app(app).db, "general")
    yield app
    services.from_app(app).db.dispose()  # PostgreSQL: close pooled connections with the test


def _enrolled_vendor(
    app: Flask, tmp_path: Path, client_id: str = "acme-mood", user: str = "user-42"
) -> Vendor:
    key = vendor_key("ES384", client_id)
    jwks_file = tmp_path / f"{client_id}-jwks.json"
    jwks_file.write_text(json.dumps(public_jwks(key)))
    out = run_cli(app, "vendor", "add", client_id, "--name", "Acme Mood", "--jwks", str(jwks_file))
    assert f"registered vendor {client_id}" in out
    settings = services.from_app(app).settings
    vendor = Vendor(app.test_client(), client_id, key, "ES384", token_url=settings.url("/oauth/token"))
    code_out = run_cli(
        app, "enrollment", "create", "--tenant", "general", "--patient", "pat-7", "--vendor", client_id
    )
    code = code_out.split("pairing code: ")[1].split()[0]
    claimed = vendor.claim(code, user)
    assert claimed.status_code == 201, claimed.json
    return vendor


def test_done_when_mixed_batch(app: Flask, tmp_path: Path) -> None:
    vendor = _enrolled_vendor(app, tmp_path)
    first = vendor.post(
        "/api/v1/records",
        json={
            "records": [
                {
                    "record_id": "r-0",
                    "app_user_id": "user-42",
                    "measure": "steps-daily",
                    "data": {"date": "2026-11-19", "steps": 5000},
                }
            ]
        },
    )
    assert first.status_code == 200 and first.json["results"][0]["status"] == "accepted"
    earlier_id = first.json["results"][0]["id"]

    batch: dict[str, Any] = {
        "records": [
            {
                "record_id": "r-1",
                "app_user_id": "user-42",
                "measure": "steps-daily",
                "data": {"date": "2026-11-20", "steps": 8042},
            },
            {
                "record_id": "r-0",
                "app_user_id": "user-42",
                "measure": "steps-daily",
                "data": {"date": "2026-11-19", "steps": 5000},
            },
            {
                "record_id": "r-2",
                "app_user_id": "user-42",
                "measure": "steps-daily",
                "data": {"date": "2026-11-20", "steps": -5},
            },
            {
                "record_id": "r-3",
                "app_user_id": "stranger",
                "measure": "steps-daily",
                "data": {"date": "2026-11-20", "steps": 10},
            },
            {
                "record_id": "r-4",
                "app_user_id": "user-42",
                "measure": "phq9",
                "data": {
                    "authored": "2026-11-20T08:30:00Z",
                    "answers": {
                        "item1": 1,
                        "item2": 2,
                        "item3": "LA6571-9",
                        "item4": 2,
                        "item5": 0,
                        "item6": 1,
                        "item7": 3,
                        "item8": 0,
                        "item9": 0,
                        "difficulty": "LA6573-5",
                    },
                },
            },
            {
                "record_id": "r-1",
                "app_user_id": "user-42",
                "measure": "steps-daily",
                "data": {"date": "2026-11-20", "steps": 8042},
            },
            {"record_id": "r-5", "app_user_id": "user-42", "measure": "no-such-measure", "data": {}},
        ]
    }
    response = vendor.post("/api/v1/records", json=batch)
    assert response.status_code == 200, response.json
    assert_matches_spec(response, "POST", "/api/v1/records")
    results = response.json["results"]
    assert [r["status"] for r in results] == [
        "accepted",
        "duplicate",
        "rejected",
        "rejected",
        "accepted",
        "duplicate",
        "rejected",
    ]
    assert results[1]["id"] == earlier_id
    assert results[5]["id"] == results[0]["id"]
    assert results[2]["errors"][0]["field"] == "data.steps"
    assert results[3]["errors"] == [
        {"code": "not-enrolled", "field": "app_user_id", "message": results[3]["errors"][0]["message"]}
    ]
    assert results[6]["errors"][0]["field"] == "measure"
    assert response.json["counts"] == {"accepted": 2, "duplicate": 2, "rejected": 3}

    # The outbox holds exactly the accepted records' resources, byte for byte what the mapping makes.
    from fhir_bridge.api.records import mapper

    with app.app_context():
        catalog = mapper()
    db = services.from_app(app).db
    with db.sessions() as session:
        items = (
            session.execute(
                select(OutboxItem).where(OutboxItem.record_id.is_not(None)).order_by(OutboxItem.id)
            )
            .scalars()
            .all()
        )
        records = {str(r.id): r for r in session.execute(select(Record)).scalars()}
    accepted = {earlier_id, results[0]["id"], results[4]["id"]}
    assert set(records) == accepted
    assert {str(i.record_id) for i in items} == accepted
    assert all(i.tenant_id == "general" and i.status == "pending" for i in items)
    for record_uuid in accepted:
        rec = records[record_uuid]
        sent = {r["record_id"]: r for r in batch["records"]}[rec.vendor_record_id]
        expected, problems = catalog.map(
            vendor=_vendor(app, "acme-mood"),
            record_id=rec.vendor_record_id,
            measure=rec.measure,
            data=sent["data"],
            patient_id="pat-7",
            now=_received(app, rec),
        )
        assert problems == []
        queued = [i for i in items if str(i.record_id) == record_uuid]
        assert [(i.resource_type, i.ident_value, i.body) for i in queued] == [
            (m.resource_type, m.identifier_value, orjson.dumps(m.resource)) for m in expected
        ]
        assert all(
            orjson.loads(i.body)["subject"] == {"reference": "Patient/pat-7"}
            for i in queued
            if i.resource_type != "Device"
        )
        assert {i.group_key for i in queued} == {record_uuid}

    status = vendor.get(f"/api/v1/records/{results[4]['id']}")
    assert status.status_code == 200 and status.json["status"] == "queued"
    assert_matches_spec(status, "GET", "/api/v1/records/{record_id}")
    submission = vendor.get(f"/api/v1/submissions/{response.json['submission_id']}")
    assert_matches_spec(submission, "GET", "/api/v1/submissions/{submission_id}")
    assert submission.json["delivery"]["queued"] == 2


def _vendor(app: Flask, client_id: str) -> Any:
    from tests.support.vendor import vendor_row

    return vendor_row(services.from_app(app).db, client_id)


def _received(app: Flask, record: Record) -> Any:
    with services.from_app(app).db.sessions() as session:
        submission = session.get(Submission, record.submission_id)
        assert submission is not None
        return submission.received_at


def test_openapi_examples_are_real_requests(app: Flask, tmp_path: Path) -> None:
    vendor = _enrolled_vendor(app, tmp_path)
    push = vendor.post("/api/v1/records", json=example("/api/v1/records", "post"))
    assert_matches_spec(push, "POST", "/api/v1/records")
    assert [r["status"] for r in push.json["results"]] == ["accepted", "rejected", "rejected"]
    for path in ("/fhir/Observation", "/fhir/QuestionnaireResponse", "/fhir"):
        body = json.loads(json.dumps(example(path, "post", "application/fhir+json")))
        response = vendor.client.post(
            path, data=json.dumps(body), headers=vendor.headers(**{"Content-Type": "application/fhir+json"})
        )
        assert_matches_spec(response, "POST", path)
        assert response.status_code in (200, 201, 422), response.json


def test_ended_enrollment_refuses_new_data_at_once(app: Flask, tmp_path: Path) -> None:
    vendor = _enrolled_vendor(app, tmp_path)
    (enrolled,) = vendor.get("/api/v1/enrollments").json["enrollments"]
    record = {
        "record_id": "after-end",
        "app_user_id": "user-42",
        "measure": "steps-daily",
        "data": {"date": "2026-11-20", "steps": 1},
    }
    assert vendor.delete(f"/api/v1/enrollments/{enrolled['id']}").status_code == 200
    result = vendor.post("/api/v1/records", json={"records": [record]}).json["results"][0]
    assert result["status"] == "rejected" and result["errors"][0]["code"] == "not-enrolled"


def test_tenant_isolation_between_vendors(app: Flask, tmp_path: Path) -> None:
    acme = _enrolled_vendor(app, tmp_path, "acme-mood", "user-42")
    rival = _enrolled_vendor(app, tmp_path, "rival-app", "user-42")  # same app user id, other vendor
    pushed = acme.post(
        "/api/v1/records",
        json={
            "records": [
                {
                    "record_id": "r-1",
                    "app_user_id": "user-42",
                    "measure": "steps-daily",
                    "data": {"date": "2026-11-20", "steps": 10},
                }
            ]
        },
    ).json
    record_id = pushed["results"][0]["id"]
    (acme_enrollment,) = acme.get("/api/v1/enrollments").json["enrollments"]
    # rival cannot read, end, or learn of acme's enrollment, records or submissions
    assert rival.get(f"/api/v1/enrollments/{acme_enrollment['id']}").status_code == 404
    assert rival.delete(f"/api/v1/enrollments/{acme_enrollment['id']}").status_code == 404
    assert rival.get(f"/api/v1/records/{record_id}").status_code == 404
    assert rival.get(f"/api/v1/submissions/{pushed['submission_id']}").status_code == 404
    assert acme_enrollment["id"] not in json.dumps(rival.get("/api/v1/enrollments").json)
    # rival's "user-42" is its own user: the same record id is a new record for rival, for its own patient
    mine = rival.post(
        "/api/v1/records",
        json={
            "records": [
                {
                    "record_id": "r-1",
                    "app_user_id": "user-42",
                    "measure": "steps-daily",
                    "data": {"date": "2026-11-20", "steps": 10},
                }
            ]
        },
    ).json["results"][0]
    assert mine["status"] == "accepted" and mine["id"] != record_id


def test_concurrent_request_with_the_same_idempotency_key_is_409(
    make_app: AppFactory, pg_server: PostgresServer, tmp_path: Path
) -> None:
    """PostgreSQL only: SQLite serialises writers, so there a concurrent duplicate waits and then replays."""
    app = make_app(DATABASE_URL=pg_server.create_database())
    add_tenant(services.from_app(app).db, "general")
    vendor = _enrolled_vendor(app, tmp_path)
    db = services.from_app(app).db
    batch = {
        "records": [
            {
                "record_id": "c-1",
                "app_user_id": "user-42",
                "measure": "steps-daily",
                "data": {"date": "2026-11-20", "steps": 3},
            }
        ]
    }
    import hashlib

    vendor_id = _vendor(app, "acme-mood").id
    lock_id = int.from_bytes(hashlib.sha256(f"{vendor_id}\x1fk-9".encode()).digest()[:8], "big", signed=True)
    holding = threading.Event()
    release = threading.Event()

    def first_request_in_flight() -> None:
        with db.engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_id})
            holding.set()
            release.wait(30)

    worker = threading.Thread(target=first_request_in_flight)
    worker.start()
    try:
        assert holding.wait(30)
        response = vendor.post("/api/v1/records", json=batch, headers={"Idempotency-Key": "k-9"})
        assert response.status_code == 409
        assert response.json["error"] == "idempotency-key-in-progress"
    finally:
        release.set()
        worker.join()
    try:
        _check_nothing_stored_then_retry(app, vendor, batch)
    finally:
        db.dispose()


def _check_nothing_stored_then_retry(app: Flask, vendor: Vendor, batch: dict[str, Any]) -> None:
    db = services.from_app(app).db
    with db.sessions() as session:
        assert session.execute(select(Submission).where(Submission.idempotency_key == "k-9")).first() is None
    assert vendor.post("/api/v1/records", json=batch, headers={"Idempotency-Key": "k-9"}).status_code == 200
