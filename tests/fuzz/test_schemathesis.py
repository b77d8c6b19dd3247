"""schemathesis against openapi.yaml: generated requests never cause a 5xx; every response matches the spec.

Bounded (a few examples per operation) so the whole file stays well under two minutes on two cores.
Requests carry a real vendor token with every scope, so generation reaches past authentication.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fhir_bridge import services
from tests.conftest import AppFactory
from tests.support.openapi import SPEC_PATH
from tests.support.vendor import Vendor, add_tenant, register

schema = schemathesis.openapi.from_path(SPEC_PATH)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory, session_keys: Any) -> tuple[Flask, Vendor]:
    from fhir_bridge import create_app
    from fhir_bridge.settings import load_settings
    from fhir_bridge.storage import Database, migrate

    folder = tmp_path_factory.mktemp("fuzz")
    config = {
        "TESTING": True,
        "INSTANCE_PATH": str(folder / "instance"),
        "KEYS_DIR": str(session_keys),
        "DATABASE_URL": f"sqlite:///{folder / 'fuzz.db'}",
        "MAX_BATCH_RECORDS": 50,
    }
    db = Database(load_settings(config, environ={}).effective_database_url)
    migrate.upgrade(db)
    db.dispose()
    app = create_app(config)
    add_tenant(services.from_app(app).db)
    return app, register(app, "fuzz-vendor")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_openapi(case: Any, fuzz_app: tuple[Flask, Vendor]) -> None:
    app, vendor = fuzz_app
    headers = {"Authorization": f"Bearer {vendor.token}"} if case.operation.path != "/oauth/token" else {}
    case.call_and_validate(app=app, headers=headers, checks=CHECKS)


_ = AppFactory  # the per-test app factory is not used: one app per module keeps generation fast
