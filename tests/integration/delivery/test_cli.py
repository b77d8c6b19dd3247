"""What hospital IT runs: `fhir-bridge ehr ...`, `fhir-bridge worker`, `fhir-bridge outbox ...`."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from fhir_bridge.cli import cli
from fhir_bridge.services import Services
from tests.integration.delivery.conftest import CLIENT_ID, ServicesFactory
from tests.support.outbox_seed import add_tenant, outbox_states, seed
from tests.support.sekmet import SekmetServer


def run(services: Services, *args: str, **env: Any) -> Result:
    settings = services.settings
    environ = {
        "FHIR_BRIDGE_INSTANCE_PATH": str(settings.instance_path),
        "FHIR_BRIDGE_DATABASE_URL": settings.database_url,
        "FHIR_BRIDGE_KEYS_DIR": str(settings.keys_path),
        "FHIR_BRIDGE_ALLOW_INSECURE_LOOPBACK": "true",
    }
    environ.update({f"FHIR_BRIDGE_{k.upper()}": str(v) for k, v in env.items()})
    return CliRunner().invoke(cli, list(args), env=environ, catch_exceptions=False)


def test_ehr_add_list_update_remove(make_services: ServicesFactory, sqlite_url: str) -> None:
    services = make_services(sqlite_url)
    added = run(
        services,
        "ehr", "add", "general", "--fhir-base", "https://ehr.example.org/fhir/r4/",
        "--client-id", "bridge-prod", "--write-strategy", "batch",
        "--no-conditional-create", "QuestionnaireResponse", "--max-rps", "20",
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    listed = run(services, "ehr", "list").output
    assert "https://ehr.example.org/fhir/r4\n" in listed, "trailing slash normalised"
    assert "bridge-prod" in listed and "(discovered)" in listed
    assert '{"no_conditional_create":["QuestionnaireResponse"]}' in listed
    assert "batch" in listed and "20.0 rps" in listed

    updated = run(services, "ehr", "update", "general", "--write-strategy", "transaction", "--token-url",
                  "https://auth.example.org/token", "--provenance", "conditional")  # fmt: skip
    assert updated.exit_code == 0, updated.output
    listed = run(services, "ehr", "list").output
    assert "https://auth.example.org/token" in listed and "transaction" in listed
    assert '{"no_conditional_create":["QuestionnaireResponse"],"provenance":"conditional"}' in listed

    seed(services.db, "general", patient="p1", records=1)
    refused = CliRunner().invoke(cli, ["ehr", "remove", "general"], env=_env(services))
    assert refused.exit_code != 0
    assert "outbox items" in refused.output and "--status paused" in refused.output

    assert (
        run(services, "ehr", "add", "empty", "--fhir-base", "https://other.example.org/fhir").exit_code == 0
    )
    assert run(services, "ehr", "remove", "empty").exit_code == 0
    assert "empty" not in run(services, "ehr", "list").output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ehr", "add", "x", "--fhir-base", "http://ehr.example.org/fhir"], "https"),
        (["ehr", "add", "Bad Id", "--fhir-base", "https://ehr.example.org/fhir"], "lower-case"),
        (["ehr", "add", "x", "--fhir-base", "https://e.example/fhir", "--token-url", "ftp://e/t"], "https"),
        (
            ["ehr", "add", "x", "--fhir-base", "https://e.example/fhir", "--no-conditional-create", "qr"],
            "type",
        ),
        (["ehr", "update", "nobody", "--max-rps", "3"], "no EHR"),
        (["ehr", "update", "nobody"], "nothing to change"),
        (["outbox", "purge", "--older-than", "1"], "--delivered"),
    ],
)
def test_bad_input_is_refused_with_a_reason(
    make_services: ServicesFactory, sqlite_url: str, args: list[str], message: str
) -> None:
    services = make_services(sqlite_url)
    result = CliRunner().invoke(cli, args, env=_env(services, allow_insecure_loopback="false"))
    assert result.exit_code != 0
    assert message in result.output


def test_ehr_add_refuses_a_second_tenant_on_the_same_base(
    make_services: ServicesFactory, sqlite_url: str
) -> None:
    services = make_services(sqlite_url)
    assert run(services, "ehr", "add", "a", "--fhir-base", "https://ehr.example.org/fhir").exit_code == 0
    again = CliRunner().invoke(
        cli, ["ehr", "add", "b", "--fhir-base", "https://ehr.example.org/fhir"], env=_env(services)
    )
    assert again.exit_code != 0 and "already has FHIR base" in again.output


@pytest.mark.ehr
def test_ehr_check_gets_a_token_and_reads_metadata(
    smart_ehr: SekmetServer, make_services: ServicesFactory, sqlite_url: str
) -> None:
    services = make_services(sqlite_url)
    assert run(services, "ehr", "add", "real", "--fhir-base", smart_ehr.base_url, "--client-id", CLIENT_ID,
               "--scopes", "system/*.rs").exit_code == 0  # fmt: skip
    checked = run(services, "ehr", "check", "real")
    assert checked.exit_code == 0, checked.output
    assert f"token endpoint  {smart_ehr.token_url}" in checked.output, "found by discovery"
    assert "access token    ok" in checked.output
    assert "FHIR server     ok (4.0.1" in checked.output

    assert run(services, "ehr", "add", "stranger", "--fhir-base", smart_ehr.base_url + "/",
               "--client-id", "nobody-registered-this").exit_code != 0  # same base: refused  # fmt: skip
    run(services, "ehr", "update", "real", "--client-id", "nobody-registered-this")
    failed = CliRunner().invoke(cli, ["ehr", "check", "real"], env=_env(services))
    assert failed.exit_code != 0
    assert "invalid_client" in failed.output


@pytest.mark.ehr
def test_worker_once_then_outbox_status_retry_and_purge(
    smart_ehr: SekmetServer, make_services: ServicesFactory, tmp_path: Path
) -> None:
    services = make_services(f"sqlite:///{tmp_path / 'cli.db'}")
    add_tenant(services.db, "cli", smart_ehr.base_url, client_id=CLIENT_ID,
               quirks={"no_conditional_create": ["QuestionnaireResponse"]})  # fmt: skip
    seeded = seed(services.db, "cli", patient=f"p{uuid.uuid4().hex[:10]}", records=10, invalid=[1])
    done = subprocess.run(
        [sys.executable, "-m", "fhir_bridge", "worker", "--once"],
        env={k: v for k, v in os.environ.items() if not k.startswith("FHIR_BRIDGE_")}
        | _env(services, log_level="WARNING"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert outbox_states(services.db, "cli") == {"delivered": len(seeded.items) - 1, "dead": 1}

    status = run(services, "outbox", "status")
    assert status.exit_code == 0
    row = next(line for line in status.output.splitlines() if line.startswith("cli "))
    assert row.split()[1:6] == ["0", "0", "0", str(len(seeded.items) - 1), "1"]
    assert "newest dead letters" in status.output
    assert "HTTP 400" in status.output and "status" in status.output, "the EHR's reason is shown"

    retried = run(services, "outbox", "retry", "--tenant", "cli")
    assert retried.output.strip() == "requeued 1 item(s)"
    assert outbox_states(services.db, "cli")["pending"] == 1

    purged = run(services, "outbox", "purge", "--older-than", "0", "--delivered", "--yes")
    assert purged.output.strip() == f"purged {len(seeded.items) - 1} item(s)"
    assert outbox_states(services.db, "cli") == {"pending": 1}


def test_the_worker_refuses_a_database_behind_the_code(tmp_path: Path) -> None:
    env = {"FHIR_BRIDGE_INSTANCE_PATH": str(tmp_path / "inst")}
    result = CliRunner().invoke(cli, ["worker", "--once"], env=env)
    assert result.exit_code != 0
    assert "fhir-bridge db upgrade" in result.output


def _env(services: Services, **extra: Any) -> dict[str, str]:
    settings = services.settings
    env = {
        "FHIR_BRIDGE_INSTANCE_PATH": str(settings.instance_path),
        "FHIR_BRIDGE_DATABASE_URL": settings.database_url,
        "FHIR_BRIDGE_KEYS_DIR": str(settings.keys_path),
        "FHIR_BRIDGE_ALLOW_INSECURE_LOOPBACK": "true",
    }
    env.update({f"FHIR_BRIDGE_{k.upper()}": str(v) for k, v in extra.items()})
    return env
