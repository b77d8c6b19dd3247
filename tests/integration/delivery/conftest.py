"""Fixtures for delivery tests: the third-party FHIR server with SMART Backend Services on, and workers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from auth.backend import BackendTokenSource
from auth.keys import Keyring
from fhir_bridge.delivery import Worker
from fhir_bridge.fhir_client import FhirClient
from fhir_bridge.services import Services, build_services
from fhir_bridge.settings import load_settings
from fhir_bridge.storage import Database, migrate
from fhir_bridge.storage.models import OutboxItem
from tests.support.procs import missing
from tests.support.sekmet import SekmetServer, sekmet_executable

CLIENT_ID = "fhir-bridge-test"
SCOPES = "system/*.c system/*.u system/*.rs"


def smart_clients(keys: Path) -> list[dict[str, Any]]:
    return [{"client_id": CLIENT_ID, "scopes": SCOPES, "jwks": Keyring(keys).jwks()}]


def start_sekmet(keys: Path, **kwargs: Any) -> SekmetServer:
    if sekmet_executable() is None:
        missing("the sekmet FHIR server", "pip install 'sekmet-fhir==0.1.1' (part of the dev extra)")
    server = SekmetServer(smart_clients=smart_clients(keys), **kwargs)
    server.start()
    return server


@pytest.fixture(scope="session")
def smart_ehr(session_keys: Path) -> Iterator[SekmetServer]:
    """sekmet with SMART Backend Services on, trusting our session signing key (inline JWKS)."""
    server = start_sekmet(session_keys)
    yield server
    server.cleanup()


def reader_for(server: SekmetServer, keys: Path) -> FhirClient:
    """A client that reads the EHR back the way an independent checker would (its own token)."""
    source = BackendTokenSource(
        client_id=CLIENT_ID, scopes="system/*.rs", token_url=server.token_url, keyring=Keyring(keys)
    )
    return FhirClient(server.base_url, auth=source)


@pytest.fixture(scope="session")
def ehr_reader(smart_ehr: SekmetServer, session_keys: Path) -> FhirClient:
    return reader_for(smart_ehr, session_keys)


ServicesFactory = Callable[..., Services]


@pytest.fixture
def make_services(tmp_path: Path, session_keys: Path) -> Iterator[ServicesFactory]:
    """Services (settings, database, keyring) for a worker; keyword arguments override settings."""
    built: list[Services] = []

    def build(database_url: str, **overrides: Any) -> Services:
        config: dict[str, Any] = {
            "INSTANCE_PATH": str(tmp_path / "instance"),
            "KEYS_DIR": str(session_keys),
            "DATABASE_URL": database_url,
            "ALLOW_INSECURE_LOOPBACK": True,
            "WORKER_POLL_SECONDS": 0.05,
            "WORKER_RETRY_BASE_SECONDS": 0.05,
            "WORKER_RETRY_MAX_SECONDS": 1.0,
            "WORKER_LEASE_SECONDS": 30,
            "HTTP_TIMEOUT_SECONDS": 10,
        }
        config.update({k.upper(): v for k, v in overrides.items()})
        services = build_services(load_settings(config, environ={}))
        migrate.upgrade(services.db)
        built.append(services)
        return services

    yield build
    for services in built:
        services.db.dispose()


def pending(db: Database, tenant_id: str) -> int:
    with db.sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(OutboxItem)
                .where(OutboxItem.tenant_id == tenant_id, OutboxItem.status == "pending")
            )
            or 0
        )


def drain(worker: Worker, tenant_id: str, *, timeout: float = 60.0) -> None:
    """Run the worker until nothing is pending for ``tenant_id`` (retries included)."""
    deadline = time.monotonic() + timeout
    while pending(worker.db, tenant_id):
        if time.monotonic() > deadline:
            raise AssertionError(f"outbox of {tenant_id} not drained after {timeout} s")
        if not worker.run_once():
            time.sleep(0.05)
