"""Hostile and malformed pushes (P1-P19): each gets a specific error, and nothing of it is stored."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from fhir_bridge import services
from fhir_bridge.storage.models import OutboxItem, Record, Submission
from tests.conftest import AppFactory
from tests.support.vendor import Vendor, add_tenant, register

RECORD = {"record_id": "r-1", "app_user_id": "user-1", "measure": "phq9", "data": {"answers": {}}}


@pytest.fixture
def app(make_app: AppFactory) -> Flask:
    app = make_app(MAX_BODY_BYTES=64 * 1024, MAX_BATCH_RECORDS=50)
    add_tenant(services.from_app(app).db)
    return app


@pytest.fixture
def vendor(app: Flask) -> Vendor:
    return register(app, "acme-mood")


def stored(app: Flask) -> tuple[int, int, int]:
    """Submissions, records and their outbox items (not the Consent a claim queues)."""
    with services.from_app(app).db.sessions() as session:
        submissions, records, items = (
            int(session.execute(select(func.count()).select_from(m).where(*where)).scalar_one())
            for m, where in (
                (Submission, ()),
                (Record, ()),
                (OutboxItem, (OutboxItem.record_id.is_not(None),)),
            )
        )
        return submissions, records, items


def raw_push(vendor: Vendor, body: bytes, content_type: str = "application/json", **headers: str) -> Any:
    return vendor.client.post(
        "/api/v1/records", data=body, headers=vendor.headers(**headers) | {"Content-Type": content_type}
    )


def _refused(app: Flask, response: Any, status: int, code: str, fragment: str = "") -> None:
    assert response.status_code == status, response.json
    assert response.json["error"] == code, response.json
    assert fragment in response.json["message"], response.json
    assert stored(app) == (0, 0, 0)


def test_p1_body_over_the_limit_is_refused_before_reading(app: Flask, vendor: Vendor) -> None:
    response = raw_push(vendor, b"{" + b" " * (65 * 1024) + b"}")
    _refused(app, response, 413, "payload-too-large", "65536")


def test_p2_deep_nesting_and_huge_arrays(app: Flask, vendor: Vendor) -> None:
    _refused(app, raw_push(vendor, b"[" * 10_000 + b"]" * 10_000), 400, "json-too-deep")
    deep = b'{"records": [{"data": ' + b'{"a":' * 40 + b"1" + b"}" * 40 + b"}]}"
    _refused(app, raw_push(vendor, deep), 400, "json-too-deep", "32 levels")
    many = b'{"records": [' + b",".join([b"{}"] * 51) + b"]}"
    _refused(app, raw_push(vendor, many), 400, "batch-too-large", "at most 50")


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
def test_p3_wrong_content_type(app: Flask, vendor: Vendor, content_type: str) -> None:
    _refused(app, raw_push(vendor, b'{"records": []}', content_type), 415, "unsupported-media-type")


def test_p3_non_utf8_charset(app: Flask, vendor: Vendor) -> None:
    response = raw_push(vendor, b'{"records": []}', "application/json; charset=latin-1")
    _refused(app, response, 415, "unsupported-media-type", "UTF-8")


def test_p4_duplicate_keys(app: Flask, vendor: Vendor) -> None:
    body = (
        b'{"records": [{"record_id": "a", "record_id": "b", "app_user_id": "u", "measure": "m", "data": {}}]}'
    )
    _refused(app, raw_push(vendor, body), 400, "duplicate-json-key", "'record_id'")


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"1" * 5000])
def test_p5_non_finite_numbers(app: Flask, vendor: Vendor, number: bytes) -> None:
    body = (
        b'{"records": [{"record_id": "a", "app_user_id": "u", "measure": "m", "data": {"v": '
        + number
        + b"}}]}"
    )
    _refused(app, raw_push(vendor, body), 400, "invalid-json-number")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"records": [{"record_id": "\xff"}]}', "invalid-utf8"),
        (b'{"records": [{"record_id": "\xc0\xaf"}]}', "invalid-utf8"),  # overlong "/"
        (b'\xef\xbb\xbf{"records": []}', "invalid-json"),
        (b'{"records": [{"record_id": "a\\u0000"}]}', "invalid-json"),
        (b'{"records": [{"record_id": "a\x00"}]}', "invalid-json"),
        (b'{"records": [', "invalid-json"),
        (b"", "empty-body"),
    ],
    ids=["invalid-byte", "overlong", "bom", "escaped-nul", "raw-nul", "truncated", "empty"],
)
def test_p6_encoding_problems(app: Flask, vendor: Vendor, body: bytes, code: str) -> None:
    _refused(app, raw_push(vendor, body), 400, code)


@pytest.mark.parametrize(
    "body",
    [
        {"records": []},
        {"records": {}},
        {"record": [RECORD]},
        {"records": [RECORD], "tenant_id": "general"},
        [RECORD],
    ],
    ids=["empty", "not-a-list", "misspelt", "extra-member", "bare-array"],
)
def test_batch_envelope_must_be_exactly_records(app: Flask, vendor: Vendor, body: Any) -> None:
    response = vendor.post("/api/v1/records", json=body)
    assert response.status_code == 400
    assert response.json["error"] in ("empty-batch", "invalid-batch")
    assert stored(app) == (0, 0, 0)


def test_records_without_scope_or_token_are_refused(app: Flask) -> None:
    reader = register(app, "reader", scopes=["records.read"])
    response = reader.post("/api/v1/records", json={"records": [RECORD]})
    assert response.status_code == 403
    assert reader.client.post("/api/v1/records", json={"records": [RECORD]}).status_code == 401
    assert stored(app) == (0, 0, 0)


@pytest.mark.parametrize(
    ("record", "code", "field"),
    [
        ({**RECORD, "record_id": ""}, "invalid-field", "record_id"),
        ({**RECORD, "record_id": "has space"}, "invalid-field", "record_id"),
        ({**RECORD, "app_user_id": "1' OR '1'='1"}, "invalid-field", "app_user_id"),  # P18
        ({**RECORD, "app_user_id": {"$gt": ""}}, "invalid-field", "app_user_id"),  # P18
        ({**RECORD, "app_user_id": "u\u200b1"}, "invalid-field", "app_user_id"),  # P17
        ({k: v for k, v in RECORD.items() if k != "measure"}, "missing-field", "measure"),
        ({**RECORD, "subject": "Patient/123"}, "unknown-field", "subject"),  # P8/P9: mass assignment
        ({**RECORD, "data": "not an object"}, "invalid-field", "data"),
    ],
    ids=["empty-id", "space-id", "sql", "nosql", "zero-width", "no-measure", "subject", "data-type"],
)
def test_invalid_envelopes_are_rejected_per_record_naming_the_field(
    app: Flask, vendor: Vendor, record: dict[str, Any], code: str, field: str
) -> None:
    response = vendor.post("/api/v1/records", json={"records": [record]})
    assert response.status_code == 200
    (result,) = response.json["results"]
    assert result["status"] == "rejected"
    assert result["errors"][0]["code"] == code and result["errors"][0]["field"] == field
    assert stored(app)[1:] == (0, 0)


def test_p15_p16_not_enrolled_and_other_vendors_users_are_rejected_uniformly(
    app: Flask, vendor: Vendor
) -> None:
    from fhir_bridge import enrollment

    rival = register(app, "rival-app")
    svc = services.from_app(app)
    created = enrollment.create(
        svc.db,
        secret=svc.secret_key,
        tenant_id="general",
        patient_id="pat-1",
        vendor_client_id="rival-app",
        created_by="dr",
        ttl_seconds=60,
    )
    assert rival.claim(created.code, "user-1").status_code == 201
    # acme pushes for "user-1", which is rival's user: same answer as a user nobody enrolled
    response = vendor.post(
        "/api/v1/records", json={"records": [RECORD, {**RECORD, "record_id": "r-2", "app_user_id": "ghost"}]}
    )
    assert response.status_code == 200
    first, second = response.json["results"]
    assert first["status"] == second["status"] == "rejected"
    assert first["errors"] == second["errors"]
    assert first["errors"][0]["code"] == "not-enrolled" and first["errors"][0]["field"] == "app_user_id"
    assert stored(app)[1:] == (0, 0)


def test_p19_path_tricks_get_404(vendor: Vendor) -> None:
    for path in (
        "/api/v1/records/..%2F..%2Fadmin",
        "/api/v1/submissions/%2e%2e",
        "/api/v1/users/..%2F..%2Fadmin",
    ):
        assert vendor.get(path).status_code == 404
