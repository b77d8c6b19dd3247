"""``fhir-bridge rules test`` and ``rules list``: what a history would fire, and bad files named."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

from click.testing import CliRunner

from fhir_bridge.cli import cli
from fhir_bridge.sandbox import synthetic

END = datetime(2026, 12, 7, 12, tzinfo=UTC)


def run(tmp_path: Path, *args: str) -> tuple[int, str]:
    env = {"FHIR_BRIDGE_INSTANCE_PATH": str(tmp_path / "inst")}
    result = CliRunner().invoke(cli, list(args), env=env)
    return result.exit_code, result.output


def test_rules_test_prints_what_a_story_would_fire(tmp_path: Path) -> None:
    path = tmp_path / "silent.json"
    path.write_text(json.dumps(synthetic.generate("silent", app_user_id="u1", end=END)))
    code, out = run(tmp_path, "rules", "test", str(path), "--now", END.isoformat())
    assert code == 0, out
    assert re.search(r"disengagement +routine +No app data for 1[45] days \(the latest is from ", out), out
    code, out = run(tmp_path, "rules", "test", str(path), "--now", END.isoformat(), "--json")
    assert [f["rule"] for f in json.loads(out)] == ["disengagement"]


def test_rules_test_takes_measurements_and_a_rules_folder(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    path.write_text(
        json.dumps(
            [
                {"code": "dwai.total", "time": "2026-11-01T10:00:00-05:00", "value": 26},
                {"code": "dwai.total", "time": "2026-11-15T10:00:00-05:00", "value": 22},
            ]
        )
    )
    code, out = run(tmp_path, "rules", "test", str(path), "--now", END.isoformat())
    assert code == 0 and "alliance-drop" not in out  # a drop of 4: below the default 6
    assert "disengagement" in out and "No app data for 22 days" in out
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "alliance.yaml").write_text(
        "apiVersion: fhir-bridge/rules/v1\nrules:\n"
        "  - id: alliance-drop\n    params: {drop: 4, days: 28}\n    let:\n"
        '      fall: max("dwai.total", days) - latest("dwai.total")\n'
        "    when: fall >= drop\n    reason: 'D-WAI down {fall}'\n    task: {text: Talk}\n"
    )
    code, out = run(tmp_path, "rules", "test", str(path), "--rules", str(rules), "--now", END.isoformat())
    assert code == 0 and "2026-11-15  alliance-drop" in out and "D-WAI down 4" in out


def test_bad_rule_files_and_histories_are_named(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "bad.yaml").write_text(
        "apiVersion: fhir-bridge/rules/v1\nrules:\n  - id: x\n    when: nope(1)\n"
    )
    code, out = run(tmp_path, "rules", "list", "--rules", str(rules))
    assert code == 1 and "bad.yaml: rules[0] (x).when: unknown function 'nope'" in out
    path = tmp_path / "h.json"
    path.write_text(json.dumps([{"code": "phq9.total", "time": "2026-11-01T10:00:00", "value": 3}]))
    code, out = run(tmp_path, "rules", "test", str(path))
    assert code == 1 and "records[0].time: needs a UTC offset" in out


def test_ehr_add_registers_the_cds_hooks_client(tmp_path: Path) -> None:
    from fhir_bridge.settings import load_settings
    from fhir_bridge.storage import Database
    from fhir_bridge.storage.models import Tenant
    from tests.support.vendor import public_jwks, vendor_key

    jwks = tmp_path / "cds.json"
    jwks.write_text(json.dumps(public_jwks(vendor_key("ES384", "cds-cli"))))
    assert run(tmp_path, "db", "upgrade")[0] == 0
    code, out = run(
        tmp_path, "ehr", "add", "t1", "--fhir-base", "https://ehr.example.org/fhir",
        "--cds-iss", "https://ehr.example.org/cds", "--cds-jwks", str(jwks),
    )  # fmt: skip
    assert code == 0, out
    bad = tmp_path / "bad.json"
    bad.write_text('{"keys": [{"kty": "oct", "kid": "x"}]}')
    code, out = run(tmp_path, "ehr", "update", "t1", "--cds-jwks", str(bad))
    assert code == 2 and "not a usable public JWKS" in out
    settings = load_settings({"INSTANCE_PATH": str(tmp_path / "inst")}, environ={})
    db = Database(settings.effective_database_url)
    with db.sessions() as session:
        tenant = session.get(Tenant, "t1")
        assert tenant is not None and tenant.cds_client_iss == "https://ehr.example.org/cds"
        assert tenant.cds_client_jwks is not None and tenant.cds_client_jwks["keys"][0]["kty"] == "EC"
    db.dispose()
