"""Pairing: codes hospital IT or a clinician create, vendors claim once, either side ends (M1-M10)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import func, select

from fhir_bridge import audit, enrollment, services
from fhir_bridge.cli import cli
from fhir_bridge.errors import NotFound
from fhir_bridge.storage.models import AuditEvent, Enrollment, PairingAttempt
from tests.conftest import AppFactory
from tests.support.openapi import assert_matches_spec
from tests.support.vendor import Vendor, add_tenant, register


@pytest.fixture
def app(make_app: AppFactory) -> Flask:
    app = make_app(PAIRING_MAX_ATTEMPTS=5)
    add_tenant(services.from_app(app).db, "general")
    return app


@pytest.fixture
def acme(app: Flask) -> Vendor:
    return register(app, "acme-mood")


@pytest.fixture
def rival(app: Flask) -> Vendor:
    return register(app, "rival-app")


def new_code(app: Flask, vendor: str = "acme-mood", patient: str = "pat-1") -> enrollment.Created:
    svc = services.from_app(app)
    return enrollment.create(
        svc.db,
        secret=svc.secret_key,
        tenant_id="general",
        patient_id=patient,
        vendor_client_id=vendor,
        created_by="dr-who",
        ttl_seconds=svc.settings.pairing_code_ttl,
    )


def _count(app: Flask, model: Any) -> int:
    with services.from_app(app).db.sessions() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


def _uniform(response: Any) -> None:
    assert response.status_code == 422, response.json
    assert_matches_spec(response, "POST", "/api/v1/enrollments/claim")
    assert response.json["error"] == "invalid-pairing-code"
    assert response.json["message"] == enrollment.INVALID_CODE_MESSAGE


def test_code_is_short_typable_and_strong() -> None:
    codes = {enrollment.new_code() for _ in range(2000)}
    assert len(codes) == 2000
    assert all(len(c) == 10 and set(c) <= set(enrollment.ALPHABET) for c in codes)
    assert not set("01OILU") & set(enrollment.ALPHABET)
    bits = enrollment.CODE_LENGTH * (len(enrollment.ALPHABET)).bit_length()
    assert bits >= 40
    assert enrollment.normalise(" abcde-fghjk ") == "ABCDEFGHJK"
    assert enrollment.normalise("ABCDE-FGHJ0") is None


def test_claim_binds_the_app_user_once_and_stores_no_code(app: Flask, acme: Vendor) -> None:
    created = new_code(app)
    typed = enrollment.display(created.code).lower()  # people type lower case and keep the dash
    response = acme.claim(typed, "user-42")
    assert response.status_code == 201, response.json
    assert_matches_spec(response, "POST", "/api/v1/enrollments/claim")
    body = response.json
    assert body["status"] == "active"
    assert body["app_user_id"] == "user-42"
    assert "patient" not in str(body).lower()  # vendors never learn the EHR patient id
    assert response.headers["Location"] == f"/api/v1/enrollments/{body['id']}"
    assert acme.get(f"/api/v1/enrollments/{body['id']}").json == body
    with services.from_app(app).db.sessions() as session:
        row = session.get(Enrollment, created.enrollment_id)
        assert row is not None and row.code_hash is None  # single use: the hash is gone too
        assert created.code not in str(session.execute(select(Enrollment.__table__)).all())
    # M2: reusing the consumed code
    _uniform(acme.claim(created.code, "user-43"))


def test_m3_expired_code(app: Flask, acme: Vendor) -> None:
    created = new_code(app)
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=86_401), tick=False):
        acme._token = None
        _uniform(acme.claim(created.code, "user-1"))


def test_m4_code_for_another_vendor_and_m9_uniform_answers(app: Flask, acme: Vendor, rival: Vendor) -> None:
    created = new_code(app, vendor="acme-mood")
    answers = [
        rival.claim(created.code, "u1"),  # another vendor's code
        rival.claim("ABCDE-FGHJK", "u1"),  # unknown
        rival.claim("not a code at all", "u1"),  # impossible
    ]
    for answer in answers:
        _uniform(answer)
    assert len({a.get_data() for a in answers}) == 1
    assert acme.claim(created.code, "u1").status_code == 201  # still usable by its vendor


def test_m1_failed_claims_are_rate_limited_per_vendor(app: Flask, acme: Vendor, rival: Vendor) -> None:
    created = new_code(app, vendor="rival-app")
    for _ in range(5):
        _uniform(acme.claim("ABCDE-FGHJK", "u1"))
    limited = acme.claim("ABCDE-FGHJK", "u1")
    assert limited.status_code == 429
    assert limited.json["error"] == "pairing-rate-limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 3601
    # another vendor is not affected, and successful claims do not count
    assert rival.claim(created.code, "u9").status_code == 201
    assert _count(app, PairingAttempt) == 5
    with time_machine.travel(datetime.now(UTC) + timedelta(hours=1, seconds=5), tick=False):
        acme._token = None  # the old token expired meanwhile
        _uniform(acme.claim("ABCDE-FGHJK", "u1"))


@pytest.mark.parametrize(
    "body",
    [
        {"code": "X", "app_user_id": "u", "tenant_id": "general"},
        {"code": "X", "app_user_id": "u", "ehr_patient_id": "pat-2"},
        {"code": "X", "app_user_id": "u", "status": "active"},
        {"code": "X"},
        {"code": 12345, "app_user_id": "u"},
    ],
    ids=["tenant", "patient", "status", "missing-user", "numeric-code"],
)
def test_m5_claim_body_is_strict(app: Flask, acme: Vendor, body: dict[str, Any]) -> None:
    response = acme.post("/api/v1/enrollments/claim", json=body)
    assert response.status_code == 422
    assert response.json["error"] == "invalid-request"
    assert _count(app, PairingAttempt) == 0
    assert _count(app, Enrollment) == 0


@pytest.mark.parametrize("user", ["u\u200b42", "\uff55ser", "a b", "", "x" * 129, "../admin", "1' OR '1'='1"])
def test_p17_app_user_ids_are_plain_ascii(app: Flask, acme: Vendor, user: str) -> None:
    created = new_code(app)
    response = acme.claim(created.code, user)
    assert response.status_code == 422
    assert response.json["error"] in ("invalid-app-user-id", "invalid-request")
    with services.from_app(app).db.sessions() as session:
        enrollment = session.get(Enrollment, created.enrollment_id)
        assert enrollment is not None and enrollment.status == "pending"


def test_m6_an_app_user_cannot_hold_two_live_enrollments(app: Flask, acme: Vendor) -> None:
    first, second = new_code(app, patient="pat-1"), new_code(app, patient="pat-2")
    enrolled = acme.claim(first.code, "user-1").json
    response = acme.claim(second.code, "user-1")
    assert response.status_code == 409
    assert response.json["error"] == "app-user-already-enrolled"
    assert acme.delete(f"/api/v1/enrollments/{enrolled['id']}").json["status"] == "ended"
    assert acme.claim(second.code, "user-1").status_code == 201


def test_m8_vendors_see_only_their_own_enrollments(app: Flask, acme: Vendor, rival: Vendor) -> None:
    mine = acme.claim(new_code(app).code, "user-1").json
    theirs = rival.claim(new_code(app, vendor="rival-app", patient="pat-2").code, "user-1").json
    assert [e["id"] for e in acme.get("/api/v1/enrollments").json["enrollments"]] == [mine["id"]]
    for response in (
        acme.get(f"/api/v1/enrollments/{theirs['id']}"),
        acme.delete(f"/api/v1/enrollments/{theirs['id']}"),
        acme.get("/api/v1/enrollments/not-a-uuid"),
        acme.get("/api/v1/enrollments/..%2F..%2Fadmin"),
    ):
        assert response.status_code == 404
    assert rival.get(f"/api/v1/enrollments/{theirs['id']}").json["status"] == "active"
    # pending enrollments (codes not yet claimed) are invisible to vendors
    new_code(app, patient="pat-3")
    assert len(acme.get("/api/v1/enrollments").json["enrollments"]) == 1


def test_listing_filters_and_pages(app: Flask, acme: Vendor) -> None:
    ids = [acme.claim(new_code(app, patient=f"p{i}").code, f"user-{i}").json["id"] for i in range(3)]
    acme.delete(f"/api/v1/enrollments/{ids[0]}")
    active = acme.get("/api/v1/enrollments?status=active").json["enrollments"]
    assert sorted(e["id"] for e in active) == sorted(ids[1:])
    assert_matches_spec(acme.get("/api/v1/enrollments?limit=2"), "GET", "/api/v1/enrollments")
    page = acme.get("/api/v1/enrollments?limit=2").json
    assert len(page["enrollments"]) == 2 and page["next"]
    rest = acme.get(f"/api/v1/enrollments?limit=2&after={page['next']}").json
    assert len(rest["enrollments"]) == 1 and rest["next"] is None
    assert acme.get("/api/v1/enrollments?status=bogus").status_code == 400
    assert acme.get("/api/v1/enrollments?app_user_id=user-2").json["enrollments"][0]["id"] == ids[2]


def test_every_create_claim_end_is_audited_in_an_intact_chain(app: Flask, acme: Vendor) -> None:
    created = new_code(app)
    enrolled = acme.claim(created.code, "user-1").json
    acme.claim("ABCDE-FGHJK", "user-1")
    acme.delete(f"/api/v1/enrollments/{enrolled['id']}")
    with services.from_app(app).db.sessions() as session:
        events = session.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars().all()
        actions = [(e.action, e.outcome, e.actor_id) for e in events]
        assert actions[-4:] == [
            ("enrollment.create", "success", "dr-who"),
            ("enrollment.claim", "success", "acme-mood"),
            ("enrollment.claim", "failure", "acme-mood"),
            ("enrollment.end", "success", "acme-mood"),
        ]
        assert audit.verify_chain(session) is None
        assert all(created.code not in str(e.detail) for e in events)


def test_audit_chain_detects_tampering(app: Flask, acme: Vendor) -> None:
    new_code(app)
    new_code(app, patient="pat-2")
    db = services.from_app(app).db
    with db.transaction() as session:
        # The table refuses UPDATE; simulate an attacker who dropped the trigger first.
        session.execute(select(1))
        session.connection().exec_driver_sql("DROP TRIGGER IF EXISTS audit_log_no_update")
        first = session.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars().first()
        assert first is not None
        first.patient_id = "pat-999"
    with db.sessions() as session:
        assert audit.verify_chain(session) == first.id


def test_ending_stops_the_flow_and_is_idempotent(app: Flask, acme: Vendor) -> None:
    enrolled = acme.claim(new_code(app).code, "user-1").json
    assert acme.delete(f"/api/v1/enrollments/{enrolled['id']}").json["status"] == "ended"
    again = acme.delete(f"/api/v1/enrollments/{enrolled['id']}")
    assert again.status_code == 200 and again.json["status"] == "ended"


def test_create_refuses_unknown_tenant_vendor_and_bad_patient_ids(app: Flask, acme: Vendor) -> None:
    svc = services.from_app(app)
    kwargs: dict[str, Any] = {"secret": svc.secret_key, "created_by": "x", "ttl_seconds": 60}
    with pytest.raises(NotFound):
        enrollment.create(svc.db, tenant_id="nowhere", patient_id="p", vendor_client_id="acme-mood", **kwargs)
    with pytest.raises(NotFound):
        enrollment.create(svc.db, tenant_id="general", patient_id="p", vendor_client_id="ghost", **kwargs)
    with pytest.raises(Exception, match="FHIR id"):
        enrollment.create(
            svc.db, tenant_id="general", patient_id="../Patient/1", vendor_client_id="acme-mood", **kwargs
        )


def test_cli_creates_codes_and_lists_enrollments(app: Flask, acme: Vendor, tmp_path: Any) -> None:
    svc = services.from_app(app)
    env = {
        "FHIR_BRIDGE_INSTANCE_PATH": str(svc.settings.instance_path),
        "FHIR_BRIDGE_DATABASE_URL": svc.settings.database_url,
        "FHIR_BRIDGE_KEYS_DIR": str(svc.settings.keys_path),
    }
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["enrollment", "create", "--tenant", "general", "--patient", "pat-7", "--vendor", "acme-mood"],
        env=env,
    )
    assert result.exit_code == 0, result.output
    code = result.output.split("pairing code: ")[1].split()[0]
    assert acme.claim(code, "user-7").status_code == 201
    listed = runner.invoke(cli, ["enrollment", "list"], env=env)
    assert (
        "active" in listed.output and "patient=pat-7" in listed.output and "app_user=user-7" in listed.output
    )
    bad = runner.invoke(
        cli,
        ["enrollment", "create", "--tenant", "nowhere", "--patient", "p", "--vendor", "acme-mood"],
        env=env,
    )
    assert bad.exit_code != 0 and "no active EHR" in bad.output
