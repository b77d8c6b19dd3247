"""Outbox upserts (resources the bridge changes later): every write strategy leaves exactly one resource
in the EHR holding the latest version, and a change queued while a worker sends the previous version
is not lost (it lands last)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from fhir_bridge.delivery import Worker, outbox
from fhir_bridge.fhir_client import FhirClient
from fhir_bridge.storage.models import OutboxItem, utcnow
from tests.integration.delivery.conftest import CLIENT_ID, ServicesFactory, drain
from tests.support.outbox_seed import add_tenant
from tests.support.sekmet import SekmetServer

pytestmark = [pytest.mark.ehr]
SYSTEM = "https://fhir-bridge.org/fhir/sid/consent"
SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"


def consent(patient: str, value: str, status: str) -> dict[str, object]:
    return {
        "resourceType": "Consent",
        "identifier": [{"system": SYSTEM, "value": value}],
        "status": status,
        "scope": {"coding": [{"system": SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient}"},
        "policyRule": {"text": "test"},
    }  # fmt: skip


@pytest.mark.parametrize("strategy", ["transaction", "batch", "single"])
def test_an_upsert_leaves_one_resource_with_the_latest_version(
    strategy: str,
    smart_ehr: SekmetServer,
    ehr_reader: FhirClient,
    make_services: ServicesFactory,
    sqlite_url: str,
) -> None:
    services = make_services(sqlite_url)
    tenant = f"up-{strategy}"
    add_tenant(services.db, tenant, smart_ehr.base_url, client_id=CLIENT_ID, strategy=strategy)
    patient, value = f"p{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    with services.db.transaction() as session:
        outbox.put(session, tenant_id=tenant, resource=consent(patient, value, "active"),
                   ident_system=SYSTEM, ident_value=value)  # fmt: skip
    drain(Worker(services), tenant)
    (first,) = ehr_reader.search("Consent", [("identifier", f"{SYSTEM}|{value}")]).resources
    assert first["status"] == "active"
    with services.db.transaction() as session:
        outbox.put(session, tenant_id=tenant, resource=consent(patient, value, "inactive"),
                   ident_system=SYSTEM, ident_value=value)  # fmt: skip
    drain(Worker(services), tenant)
    (after,) = ehr_reader.search("Consent", [("identifier", f"{SYSTEM}|{value}")]).resources
    assert after["status"] == "inactive" and after["id"] == first["id"]
    with services.db.sessions() as session:
        (row,) = session.scalars(select(OutboxItem).where(OutboxItem.tenant_id == tenant))
        assert (row.status, row.method, row.ehr_id) == ("delivered", "upsert", first["id"])


def test_a_change_queued_during_a_send_waits_for_that_lease_and_lands_last(
    smart_ehr: SekmetServer, ehr_reader: FhirClient, make_services: ServicesFactory, sqlite_url: str
) -> None:
    services = make_services(sqlite_url)
    tenant = "up-lease"
    add_tenant(services.db, tenant, smart_ehr.base_url, client_id=CLIENT_ID)
    patient, value = f"p{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    with services.db.transaction() as session:
        outbox.put(session, tenant_id=tenant, resource=consent(patient, value, "active"),
                   ident_system=SYSTEM, ident_value=value)  # fmt: skip
    claim = outbox.claim(services.db, worker="slow", limit=10, lease_seconds=60, tenants=[tenant])
    (item,) = claim.items
    with services.db.transaction() as session:  # the enrollment ends while "slow" is sending
        outbox.put(session, tenant_id=tenant, resource=consent(patient, value, "inactive"),
                   ident_system=SYSTEM, ident_value=value)  # fmt: skip
    # Nobody else may take the row while the slow worker's lease runs ...
    assert outbox.claim(services.db, worker="other", limit=10, lease_seconds=60, tenants=[tenant]).items == []
    # ... and the slow worker's "delivered" (of the old version) is not recorded.
    done = outbox.Result(item.id, "delivered", ehr_id="x", ehr_version="1")
    assert outbox.record(services.db, "slow", [done]) == 0
    later = utcnow() + timedelta(seconds=61)
    (again,) = outbox.claim(
        services.db, worker="other", limit=10, lease_seconds=60, tenants=[tenant], now=later
    ).items
    assert again.method == "upsert" and b'"inactive"' in again.body
