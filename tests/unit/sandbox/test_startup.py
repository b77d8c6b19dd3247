"""Starting the sandbox: the first start seeds and registers, a restart keeps all, stale files are refused."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from fhir_bridge.errors import BridgeError
from fhir_bridge.sandbox import SandboxConfig, create_sandbox_app
from fhir_bridge.sandbox.app import bridge_clients
from fhir_bridge.sandbox.scopes import narrow, split
from fhir_bridge.storage.models import DEFAULT_BACKEND_SCOPES
from tests.support.http import json_of
from tests.unit.sandbox.conftest import BASE, sandbox_of


def test_restart_keeps_data_and_bridge_url_registers_the_bridge(
    sandbox_template: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(sandbox_template, data)
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps([{"client_id": "extra", "redirect_uris": ["https://x.example/cb"]}]))
    app = create_sandbox_app(
        SandboxConfig(data_dir=data, public_url=BASE),
        bridge_url="http://127.0.0.1:8080/",
        clients_file=clients,
    )
    token = sandbox_of(app).admin_token
    listed = json_of(
        app.test_client().get("/api/admin/clients", headers={"Authorization": f"Bearer {token}"})
    )
    by_id = {c["client_id"]: c for c in listed}
    assert set(by_id) == {"extra", "fhir-bridge", "fhir-bridge-backend"}
    assert by_id["fhir-bridge"]["launch_url"] == "http://127.0.0.1:8080/launch"
    # The bridge's redirect URI names the tenant: <PUBLIC_URL>/callback/<tenant id>.
    assert by_id["fhir-bridge"]["redirect_uris"] == ["http://127.0.0.1:8080/callback/sandbox"]
    assert by_id["fhir-bridge"]["standalone_url"] == "http://127.0.0.1:8080/launch/standalone?tenant=sandbox"
    assert by_id["fhir-bridge-backend"]["jwks_url"] == "http://127.0.0.1:8080/.well-known/jwks.json"
    sandbox_of(app).db.dispose()

    again = create_sandbox_app(SandboxConfig(data_dir=data, public_url=BASE))
    sandbox = sandbox_of(again)
    assert sandbox.admin_token == token
    with sandbox.db.read() as session:
        patient = sandbox.store.get(session, "Patient", "sbx-patient-1")
        assert patient is not None
        assert len(patient["meta"]["tag"]) == 1
        assert patient["meta"]["versionId"] == "1"  # not re-seeded
    sandbox.db.dispose()
    assert oct((data / "admin_token").stat().st_mode & 0o777) == "0o600"
    assert oct((data / "id_token_key.json").stat().st_mode & 0o777) == "0o600"
    assert oct((data / "sandbox.db").stat().st_mode & 0o777) == "0o600"


def test_data_of_another_schema_version_is_refused_with_advice(
    sandbox_template: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(sandbox_template, data)
    with sqlite3.connect(data / "sandbox.db") as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="delete its data folder"):
        create_sandbox_app(SandboxConfig(data_dir=data, public_url=BASE))


def test_bad_clients_file_stops_start_up(sandbox_template: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(sandbox_template, data)
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps([{"client_id": "x", "redirect_uris": ["not a url"]}]))
    with pytest.raises(BridgeError, match=r"clients\.json: client 'x': redirect_uris"):
        create_sandbox_app(SandboxConfig(data_dir=data, public_url=BASE), clients_file=clients)


def test_sandbox_serve_reports_a_bad_clients_file_in_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fhir_bridge.cli import cli

    clients = tmp_path / "clients.json"
    clients.write_text("[{}]")
    result = CliRunner().invoke(
        cli, ["sandbox", "serve", "--data", str(tmp_path / "data"), "--clients", str(clients)], env={}
    )
    assert result.exit_code == 1
    assert "expected a JSON list of objects, each with a client_id" in result.output


def test_the_bridge_is_registered_with_one_redirect_uri_per_tenant_id() -> None:
    app, _ = bridge_clients("https://bridge.example/", ["ehr-a", "ehr-b"])
    assert app["redirect_uris"] == [
        "https://bridge.example/callback/ehr-a",
        "https://bridge.example/callback/ehr-b",
    ]
    assert app["standalone_url"] == "https://bridge.example/launch/standalone?tenant=ehr-a"
    with pytest.raises(BridgeError, match="tenant id"):
        bridge_clients("https://bridge.example", [])


def test_the_sandbox_grants_the_backend_writer_every_scope_a_tenant_asks_for_by_default() -> None:
    """Delivery writes Device, Provenance, Flag, Task, Consent, Goal, Communication and the records."""
    _, backend = bridge_clients("https://bridge.example")
    requested = split(DEFAULT_BACKEND_SCOPES)
    for resource_type in (
        "Observation",
        "QuestionnaireResponse",
        "Device",
        "Provenance",
        "Flag",
        "Task",
        "Consent",
        "Goal",
        "Communication",
    ):
        assert f"system/{resource_type}.c" in requested or any(
            s.startswith(f"system/{resource_type}.c") for s in requested
        ), resource_type
    assert narrow(requested, backend["scopes"], levels=["system"]) == requested
