"""Webhooks reach a real local receiver that verifies them the way a vendor would: a JWT signed by a key
of our published JWKS, for this vendor, with the event id as idempotency id, retried after a failure,
and never for an enrollment that has ended."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from fhir_bridge import enrollment, services
from fhir_bridge.delivery import Worker
from fhir_bridge.relationship import goals, messages, webhooks
from fhir_bridge.storage.models import WebhookEvent
from tests.conftest import AppFactory
from tests.support.vendor import Vendor, add_tenant, register
from tests.support.webhook_receiver import Receiver, verify_webhook


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([503])
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def _verify(app: Flask, vendor: Vendor, token: bytes) -> dict[str, Any]:
    return verify_webhook(app, vendor.client_id, token)


def _run_until(worker: Worker, done: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "webhook not delivered in time"
        if not worker.run_once():
            time.sleep(0.05)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_events_are_signed_retried_with_one_id_and_stop_when_the_enrollment_ends(
    database: str, request: pytest.FixtureRequest, make_app: AppFactory, receiver: Receiver
) -> None:
    overrides: dict[str, Any] = {}
    if database == "postgresql":
        overrides["DATABASE_URL"] = request.getfixturevalue("pg_server").create_database()
    app = make_app(
        ALLOW_INSECURE_LOOPBACK=True,
        WORKER_RETRY_BASE_SECONDS=0.05,
        WORKER_RETRY_MAX_SECONDS=0.2,
        **overrides,
    )
    svc = services.from_app(app)
    request.addfinalizer(svc.db.dispose)
    add_tenant(svc.db)
    vendor = register(app, "hooked-app")
    quiet = register(app, "quiet-app")  # no webhook: no events
    webhooks.set_url(
        svc.db, client_id="hooked-app", url=receiver.url, allow_insecure_loopback=True, actor="test"
    )
    ids = {}
    for v, user in ((vendor, "user-1"), (quiet, "user-q")):
        code = enrollment.create(
            svc.db, secret=svc.secret_key, tenant_id="general", patient_id="pat-1",
            vendor_client_id=v.client_id, created_by="dr", ttl_seconds=600,
        ).code  # fmt: skip
        claimed = v.claim(code, user)
        ids[user] = claimed.json["id"]
    with svc.db.transaction() as session:
        goal = goals.create(
            session, tenant_id="general", patient_id="pat-1", actor="dr", expressed_by=None,
            description="Walk more", target=goals.check_target("steps", ">=", 6000, None),
        )  # fmt: skip
        goal_id = str(goal.id)

    worker = Worker(svc)
    _run_until(worker, lambda: len(receiver.received) >= 2)
    (first_headers, _first), (second_headers, second) = receiver.received[:2]
    assert first_headers["content-type"] == "application/jwt"
    assert first_headers["webhook-id"] == second_headers["webhook-id"], "the retry carries the same id"
    claims = _verify(app, vendor, second)
    assert claims["jti"] == second_headers["webhook-id"]
    assert claims["event"] == "goal.changed"
    assert claims["data"] == {"app_user_id": "user-1", "type": "goal", "id": goal_id}
    assert "Walk more" not in second.decode(), "no clinical text travels in a webhook"
    with svc.db.sessions() as session:
        events = session.scalars(select(WebhookEvent)).all()
        assert [(e.status, e.attempts) for e in events] == [("delivered", 2)]

    # A tampered event does not verify.
    head, body, sig = second.decode().split(".")
    with pytest.raises(Exception):  # noqa: B017 - any verification failure will do
        _verify(app, vendor, f"{head}.{body}.{sig[:-4]}AAAA".encode())

    # The enrollment ends: an event queued before the end is dropped unsent, none are queued after.
    with svc.db.transaction() as session:
        messages.send_to_patient(
            session, tenant_id="general", patient_id="pat-1", actor="dr", sender=None, text="See you soon"
        )
    vendor.delete(f"/api/v1/enrollments/{ids['user-1']}")
    with svc.db.transaction() as session:
        messages.send_to_patient(
            session, tenant_id="general", patient_id="pat-1", actor="dr", sender=None, text="Hello?"
        )
    while worker.run_once():
        pass
    assert len(receiver.received) == 2
    with svc.db.sessions() as session:
        statuses = [e.status for e in session.scalars(select(WebhookEvent).order_by(WebhookEvent.id))]
    assert statuses == ["delivered", "dropped"]


def test_webhook_urls_must_be_https(make_app: AppFactory) -> None:
    app = make_app()
    svc = services.from_app(app)
    register(app, "hooked-app")
    from fhir_bridge.errors import BadRequest

    for url in ("http://127.0.0.1:9/x", "ftp://hooks.example/x", "https://user:pw@hooks.example/x"):
        with pytest.raises(BadRequest):
            webhooks.set_url(
                svc.db, client_id="hooked-app", url=url, allow_insecure_loopback=False, actor="t"
            )
    webhooks.set_url(
        svc.db,
        client_id="hooked-app",
        url="https://hooks.example/x",
        allow_insecure_loopback=False,
        actor="t",
    )


def test_a_webhook_pointing_into_a_private_network_is_never_called(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app()
    svc = services.from_app(app)
    add_tenant(svc.db)
    vendor = register(app, "hooked-app")
    private = "https://10.1.2.3/hooks"
    webhooks.set_url(svc.db, client_id="hooked-app", url=private, allow_insecure_loopback=False, actor="t")
    code = enrollment.create(
        svc.db, secret=svc.secret_key, tenant_id="general", patient_id="pat-1",
        vendor_client_id="hooked-app", created_by="dr", ttl_seconds=600,
    ).code  # fmt: skip
    assert vendor.claim(code, "user-1").status_code == 201
    with svc.db.transaction() as session:
        messages.send_to_patient(
            session, tenant_id="general", patient_id="pat-1", actor="dr", sender=None, text="hi"
        )

    class NoCalls:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("a private address was called")

    monkeypatch.setattr(webhooks, "PinnedConnection", NoCalls)  # the network boundary, spied on
    handled = webhooks.deliver_due(
        svc.db, svc.keyring, issuer="https://bridge.example", timeout=5, max_attempts=1,
        backoff=lambda n: 0.0,
    )  # fmt: skip
    assert handled == 1
    with svc.db.sessions() as session:
        (event,) = session.scalars(select(WebhookEvent)).all()
    assert (event.status, event.last_status) == ("dead", None)
    for url in (
        "https://127.0.0.1/x",
        "https://169.254.169.254/latest",
        "https://[::1]/x",
        "https://10.0.0.1/",
    ):
        assert not webhooks.public_host(url, allow_insecure_loopback=False), url
    assert webhooks.public_host("http://127.0.0.1:8080/x", allow_insecure_loopback=True)
    assert webhooks.public_host("https://93.184.215.14/x", allow_insecure_loopback=False)
