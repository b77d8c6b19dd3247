"""Queued records reach the third-party FHIR server with SMART Backend Services auth: right content,
references resolved, the app Device and a Provenance, each resource exactly once."""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from auth.backend import BackendTokenSource
from auth.keys import Keyring
from fhir_bridge import create_app
from fhir_bridge.delivery import Worker
from fhir_bridge.delivery.writers import walk_references
from fhir_bridge.fhir_client import FhirClient
from fhir_bridge.storage.models import OutboxItem, Record
from mappings.identity import DEVICE_IDENTIFIER_SYSTEM, device_resource, full_url
from tests.integration.delivery.conftest import CLIENT_ID, ServicesFactory, drain, pending
from tests.support.outbox_seed import IDENT_SYSTEM, add_tenant, in_ehr, seed, seed_mapped
from tests.support.sandbox import SandboxServer
from tests.support.sekmet import SekmetServer

pytestmark = [pytest.mark.ehr]

QR_PUT = {"no_conditional_create": ["QuestionnaireResponse"]}


@pytest.mark.parametrize("strategy", ["transaction", "batch", "single"])
def test_records_arrive_once_with_references_device_and_provenance(
    strategy: str,
    smart_ehr: SekmetServer,
    ehr_reader: FhirClient,
    make_services: ServicesFactory,
    sqlite_url: str,
) -> None:
    services = make_services(sqlite_url, worker_batch_size=7)
    tenant = f"t-{strategy}"
    add_tenant(services.db, tenant, smart_ehr.base_url, client_id=CLIENT_ID, strategy=strategy, quirks=QR_PUT)
    patient = f"p{uuid.uuid4().hex[:12]}"
    seeded = seed(services.db, tenant, patient=patient, records=12)

    drain(Worker(services), tenant)

    assert in_ehr(ehr_reader, patient) == Counter(seeded.items)
    with services.db.sessions() as session:
        items = list(session.scalars(select(OutboxItem).where(OutboxItem.tenant_id == tenant)))
        statuses = set(session.scalars(select(Record.status).where(Record.id.in_(seeded.records))))
    assert {i.status for i in items} == {"delivered"}
    assert statuses == {"delivered"}
    ehr_ids = {(i.resource_type, i.ident_value): (i.ehr_id, i.ehr_version) for i in items}

    # What the EHR holds is what was queued, with every urn:uuid: reference resolved to its resource.
    device = device_resource("acme-mood", "Acme Mood")
    devices = ehr_reader.search(
        "Device", [("identifier", f"{DEVICE_IDENTIFIER_SYSTEM}|{device.identifier_value}")]
    )
    assert len(devices.resources) == 1, "the app Device is created once, however many batches"
    device_ref = f"Device/{devices.resources[0]['id']}"
    observations = ehr_reader.search("Observation", [("subject", f"Patient/{patient}"), ("_count", "100")])
    for obs in observations.resources:
        value = obs["identifier"][0]["value"]
        assert ehr_ids[("Observation", value)] == (obs["id"], obs["meta"]["versionId"])
        assert obs["subject"] == {"reference": f"Patient/{patient}"}
        if obs["code"]["coding"][0]["code"] == "44261-6":
            (derived,) = obs["derivedFrom"]
            qr = ehr_reader.read_reference(derived["reference"])
            assert qr["resourceType"] == "QuestionnaireResponse"
            assert qr["author"] == {"reference": device_ref}
            assert qr["identifier"]["system"] == IDENT_SYSTEM
            assert qr["id"] == qr["identifier"]["value"], "written with PUT to its identifier (quirk)"
        else:
            assert obs["device"] == {"reference": device_ref}
            assert obs["valueQuantity"]["code"] == "/d"

    # Every delivered resource is covered by a Provenance whose author is the app Device.
    covered: set[str] = set()
    for ident_pair, (ehr_id, _) in ehr_ids.items():
        provenances = ehr_reader.search("Provenance", [("target", f"{ident_pair[0]}/{ehr_id}")])
        for prov in provenances.resources:
            assert prov["agent"][0]["who"] == {"reference": device_ref}
            assert prov["agent"][0]["type"]["coding"][0]["code"] == "author"
            covered.add(f"{ident_pair[0]}/{ehr_id}")
    assert covered == {f"{t}/{i}" for (t, _), (i, _) in ehr_ids.items()}


def test_running_again_writes_nothing_twice(
    smart_ehr: SekmetServer, ehr_reader: FhirClient, make_services: ServicesFactory, database_url: str
) -> None:
    """Re-queueing delivered resources (a replay) finds them already in the EHR: still one copy each,
    and with conditional Provenance (this server searches ``_tag``) not even a second Provenance."""
    services = make_services(database_url)
    tenant = f"t-replay-{services.db.dialect}"
    quirks = {**QR_PUT, "provenance": "conditional"}
    add_tenant(services.db, tenant, smart_ehr.base_url, client_id=CLIENT_ID, quirks=quirks)
    patient = f"p{uuid.uuid4().hex[:12]}"
    seeded = seed(services.db, tenant, patient=patient, records=6)
    worker = Worker(services)
    drain(worker, tenant)
    with services.db.transaction() as session:
        first = {i.id: i.ehr_id for i in session.scalars(select(OutboxItem))}
        for item in session.scalars(select(OutboxItem)):
            item.status = "pending"
    drain(worker, tenant)
    with services.db.sessions() as session:
        second = {i.id: i.ehr_id for i in session.scalars(select(OutboxItem))}
    assert second == first
    assert in_ehr(ehr_reader, patient) == Counter(seeded.items)
    for resource_type, ehr_id in {(i.resource_type, i.ehr_id) for i in items_of(services, tenant)}:
        provenances = ehr_reader.search("Provenance", [("target", f"{resource_type}/{ehr_id}")])
        assert len(provenances.resources) == 1


def items_of(services: Any, tenant: str) -> list[OutboxItem]:
    with services.db.sessions() as session:
        return list(session.scalars(select(OutboxItem).where(OutboxItem.tenant_id == tenant)))


def test_the_embedded_worker_delivers_and_metrics_say_so(
    smart_ehr: SekmetServer,
    ehr_reader: FhirClient,
    make_services: ServicesFactory,
    sqlite_url: str,
    session_keys: Path,
    tmp_path: Path,
) -> None:
    services = make_services(sqlite_url)
    add_tenant(services.db, "t-embedded", smart_ehr.base_url, client_id=CLIENT_ID, quirks=QR_PUT)
    patient = f"p{uuid.uuid4().hex[:12]}"
    seeded = seed(services.db, "t-embedded", patient=patient, records=8)
    app = create_app(
        {
            "TESTING": True,
            "INSTANCE_PATH": str(tmp_path / "web"),
            "KEYS_DIR": str(session_keys),
            "DATABASE_URL": sqlite_url,
            "ALLOW_INSECURE_LOOPBACK": True,
            "WORKER_EMBEDDED": True,
            "WORKER_POLL_SECONDS": 0.05,
        }
    )
    background = app.extensions["fhir_bridge.worker"]
    try:
        deadline = time.monotonic() + 60
        while pending(services.db, "t-embedded"):
            assert time.monotonic() < deadline, "the embedded worker did not deliver"
            time.sleep(0.1)
    finally:
        background.shutdown()
    assert not background.thread.is_alive(), "it stops when the service stops"
    assert in_ehr(ehr_reader, patient) == Counter(seeded.items)

    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    delivered = re.search(r'^fhir_bridge_delivered_total\{tenant="t-embedded"\} (\S+)$', metrics, re.M)
    assert delivered is not None and float(delivered.group(1)) == len(seeded.items)
    assert re.search(r'^fhir_bridge_ehr_request_seconds_count\{tenant="t-embedded"\} [1-9]', metrics, re.M)
    assert re.search(
        rf'^fhir_bridge_outbox_items\{{status="delivered",tenant="t-embedded"\}} {len(seeded.items)}\.0$',
        metrics,
        re.M,
    )


def test_records_mapped_by_the_catalogue_arrive_as_mapped(
    smart_ehr: SekmetServer, ehr_reader: FhirClient, make_services: ServicesFactory, sqlite_url: str
) -> None:
    """The real mapping output (PHQ-9: QuestionnaireResponse, total and item 9; steps) is what the EHR
    holds afterwards: same codes, values, subject and identifier, references resolved to EHR ids."""
    services = make_services(sqlite_url)
    add_tenant(services.db, "t-mapped", smart_ehr.base_url, client_id=CLIENT_ID, quirks=QR_PUT)
    patient = f"p{uuid.uuid4().hex[:12]}"
    examples = Path(__file__).parents[3] / "mappings" / "examples"
    phq9 = orjson.loads((examples / "phq9" / "moderate.input.json").read_bytes())
    steps = orjson.loads((examples / "steps-daily" / "day.input.json").read_bytes())
    mapped = seed_mapped(
        services.db, "t-mapped", patient=patient, records=[("phq9", phq9), ("steps-daily", steps)] * 3
    )
    assert {m.resource_type for m in mapped} == {"QuestionnaireResponse", "Observation"}
    drain(Worker(services), "t-mapped")

    with services.db.sessions() as session:
        ehr_id = {
            full_url(i.ident_system, i.ident_value): f"{i.resource_type}/{i.ehr_id}"
            for i in session.scalars(select(OutboxItem).where(OutboxItem.tenant_id == "t-mapped"))
        }
    device = device_resource("acme-mood", "acme-mood")
    devices = ehr_reader.search(
        "Device", [("identifier", f"{DEVICE_IDENTIFIER_SYSTEM}|{device.identifier_value}")]
    )
    ehr_id[device.full_url] = f"Device/{devices.resources[0]['id']}"
    for resource in mapped:
        stored = ehr_reader.read_reference(ehr_id[resource.full_url])
        expected = orjson.loads(orjson.dumps(resource.resource))
        for ref in walk_references(expected):
            ref["reference"] = ehr_id.get(ref["reference"], ref["reference"])
        got = {k: v for k, v in stored.items() if k not in {"id", "meta"}}
        assert got == {k: v for k, v in expected.items() if k not in {"id", "meta"}}, resource.resource_type
        assert stored["meta"].get("tag") == expected.get("meta", {}).get("tag"), (
            "tags kept (patient-supplied)"
        )
    assert in_ehr(ehr_reader, patient) == Counter((m.resource_type, m.identifier_value) for m in mapped)


def test_the_sandbox_ehr_takes_the_same_deliveries_without_quirks(
    sandbox_server: SandboxServer, session_keys: Path, make_services: ServicesFactory, sqlite_url: str
) -> None:
    """Our own sandbox (the demo's EHR) behaves like a correct server: no quirks needed there. It also
    checks that the patient exists, so the records are for one of its seeded patients."""
    client_id = f"bridge-{uuid.uuid4().hex[:8]}"
    sandbox_server.register(
        client_id, auth_method="private_key_jwt", jwks=Keyring(session_keys).jwks(), scopes=["system/*.cruds"]
    )
    services = make_services(sqlite_url)
    add_tenant(services.db, "sandbox", sandbox_server.fhir_base, client_id=client_id, scopes="system/*.cruds")
    patient = "sbx-patient-6"
    seeded = seed(services.db, "sandbox", patient=patient, records=10)
    drain(Worker(services), "sandbox")
    reader = FhirClient(
        sandbox_server.fhir_base,
        auth=BackendTokenSource(
            client_id=client_id,
            scopes="system/*.rs",
            token_url=sandbox_server.token_url,
            keyring=Keyring(session_keys),
        ),
    )
    ours = set(seeded.items)  # other tests may write for the same seeded patient
    assert Counter({k: n for k, n in in_ehr(reader, patient).items() if k in ours}) == Counter(seeded.items)
    with services.db.sessions() as session:
        assert {i.status for i in session.scalars(select(OutboxItem))} == {"delivered"}
