"""`fhir-bridge webhooks status|retry`: hospital IT sees events a vendor's endpoint never took, and sends
them again once it is back, with the same event id."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from fhir_bridge import enrollment, services
from fhir_bridge.cli import cli
from fhir_bridge.relationship import messages, webhooks
from fhir_bridge.storage.models import AuditEvent
from tests.conftest import AppFactory
from tests.support.vendor import add_tenant, register
from tests.support.webhook_receiver import Receiver


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_dead_events_are_listed_and_sent_again_with_the_same_id(
    database: str, request: pytest.FixtureRequest, make_app: AppFactory
) -> None:
    overrides: dict[str, Any] = {}
    if database == "postgresql":
        overrides["DATABASE_URL"] = request.getfixturevalue("pg_server").create_database()
    app = make_app(ALLOW_INSECURE_LOOPBACK=True, **overrides)
    svc = services.from_app(app)
    add_tenant(svc.db)
    receiver = Receiver([503]).start()
    request.addfinalizer(receiver.stop)
    vendor = register(app, "hooked-app")
    webhooks.set_url(
        svc.db, client_id="hooked-app", url=receiver.url, allow_insecure_loopback=True, actor="t"
    )
    code = enrollment.create(
        svc.db, secret=svc.secret_key, tenant_id="general", patient_id="pat-1",
        vendor_client_id="hooked-app", created_by="dr", ttl_seconds=600,
    ).code  # fmt: skip
    assert vendor.claim(code, "user-1").status_code == 201
    with svc.db.transaction() as session:
        messages.send_to_patient(
            session, tenant_id="general", patient_id="pat-1", actor="dr", sender=None, text="hi"
        )

    def send() -> int:
        return webhooks.deliver_due(
            svc.db, svc.keyring, issuer="https://bridge.example", timeout=5, max_attempts=1,
            backoff=lambda n: 0.0, allow_insecure_loopback=True,
        )  # fmt: skip

    runner = CliRunner()
    env = {"FHIR_BRIDGE_DATABASE_URL": svc.settings.database_url}

    def counts() -> list[str]:
        shown = runner.invoke(cli, ["webhooks", "status"], env=env)
        assert shown.exit_code == 0, shown.output
        row = next(line.split() for line in shown.output.splitlines() if line.startswith("hooked-app"))
        return row[1:5]  # pending delivered dead dropped

    assert counts() == ["1", "0", "0", "0"]
    assert send() == 1  # the endpoint answers 503, and the budget is one attempt: dead
    assert counts() == ["0", "0", "1", "0"]
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'fhir_bridge_webhook_events{status="dead",vendor="hooked-app"} 1.0' in metrics
    shown = runner.invoke(cli, ["webhooks", "status", "--vendor", "hooked-app"], env=env).output
    assert "hooked-app message.changed after 1 attempt(s): HTTP 503" in shown, shown

    other = runner.invoke(cli, ["webhooks", "retry", "--vendor", "another-app"], env=env)
    assert other.output.strip() == "requeued 0 event(s)"
    retried = runner.invoke(cli, ["webhooks", "retry", "--vendor", "hooked-app"], env=env)
    assert retried.exit_code == 0 and retried.output.strip() == "requeued 1 event(s)", retried.output
    assert send() == 1  # the endpoint is back (200)
    first, second = receiver.received
    assert first[0]["webhook-id"] == second[0]["webhook-id"], "the same event id: the vendor can dedupe"
    assert counts() == ["0", "1", "0", "0"]
    with svc.db.sessions() as session:
        assert session.scalar(select(AuditEvent.action).where(AuditEvent.action == "webhooks.retry"))
