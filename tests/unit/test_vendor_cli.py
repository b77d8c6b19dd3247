"""`fhir-bridge vendor add|list|disable`: what hospital IT types to onboard and stop an app vendor."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from flask import Flask

from fhir_bridge import services
from fhir_bridge.cli import cli
from tests.support.vendor import Vendor, public_jwks, vendor_key


def _env(app: Flask) -> dict[str, str]:
    settings = services.from_app(app).settings
    return {
        "FHIR_BRIDGE_INSTANCE_PATH": str(settings.instance_path),
        "FHIR_BRIDGE_DATABASE_URL": settings.database_url,
        "FHIR_BRIDGE_KEYS_DIR": str(settings.keys_path),
        "FHIR_BRIDGE_JWKS_FETCH_ALLOWED_HOSTS": "keys.acme.example",
    }


def test_add_list_disable(app: Flask, tmp_path: Path) -> None:
    key = vendor_key("RS384", "cli")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(public_jwks(key)))
    runner = CliRunner()
    added = runner.invoke(
        cli,
        [
            "vendor",
            "add",
            "acme-mood",
            "--name",
            "Acme Mood",
            "--jwks",
            str(jwks),
            "--scope",
            "records.write",
        ],
        env=_env(app),
    )
    assert added.exit_code == 0, added.output
    assert "registered vendor acme-mood" in added.output
    assert "http://127.0.0.1:8080/oauth/token" in added.output
    by_url = runner.invoke(
        cli,
        ["vendor", "add", "beta", "--name", "Beta", "--jwks-url", "https://keys.acme.example/jwks.json"],
        env=_env(app),
    )
    assert by_url.exit_code == 0, by_url.output
    listed = runner.invoke(cli, ["vendor", "list"], env=_env(app)).output
    assert "acme-mood  active" in listed and "[records.write]" in listed
    assert "https://keys.acme.example/jwks.json" in listed

    vendor = Vendor(app.test_client(), "acme-mood", key)
    assert vendor.token_request(scope="records.write").status_code == 200
    # Scopes added by an upgrade (issue 10's relationship.read): granted only once hospital IT says so.
    assert vendor.token_request(scope="relationship.read").status_code == 400
    widened = runner.invoke(cli, ["vendor", "scopes", "acme-mood", "--all"], env=_env(app))
    assert widened.exit_code == 0 and "relationship.read" in widened.output, widened.output
    assert vendor.token_request(scope="relationship.read").status_code == 200
    narrowed = runner.invoke(
        cli, ["vendor", "scopes", "acme-mood", "--scope", "records.write"], env=_env(app)
    )
    assert narrowed.exit_code == 0 and "granted: records.write" in narrowed.output, narrowed.output
    assert vendor.token_request(scope="relationship.read").status_code == 400
    for bad, message in (
        (["acme-mood", "--scope", "system/*.cruds"], "unknown scope"),
        (["nobody", "--all"], "no vendor"),
        (["acme-mood"], "--scope"),
    ):
        refused = runner.invoke(cli, ["vendor", "scopes", *bad], env=_env(app))
        assert refused.exit_code != 0 and message in refused.output, (bad, refused.output)
    disabled = runner.invoke(cli, ["vendor", "disable", "acme-mood"], env=_env(app))
    assert disabled.exit_code == 0 and "acme-mood is disabled" in disabled.output
    assert vendor.token_request(scope="records.write").status_code == 400
    assert "acme-mood  disabled" in runner.invoke(cli, ["vendor", "list"], env=_env(app)).output


def test_add_refuses_bad_keys_hosts_scopes_and_duplicates(app: Flask, tmp_path: Path) -> None:
    runner = CliRunner()
    private = tmp_path / "private.json"
    key = vendor_key("RS384", "leaky")
    private.write_text(json.dumps({"keys": [key.as_dict(private=True) | {"kid": "k"}]}))
    weak = tmp_path / "weak.json"
    import base64

    from cryptography.hazmat.primitives.asymmetric import rsa

    numbers = rsa.generate_private_key(65537, 1024).public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()

    weak.write_text(
        json.dumps({"keys": [{"kty": "RSA", "kid": "small", "n": b64(numbers.n), "e": b64(numbers.e)}]})
    )
    good = tmp_path / "good.json"
    good.write_text(json.dumps(public_jwks(key)))
    cases = [
        (["--jwks", str(private)], "private key material"),
        (["--jwks", str(weak)], "at least 2048 bits"),
        (["--jwks-url", "https://evil.example/jwks.json"], "JWKS_FETCH_ALLOWED_HOSTS"),
        (["--jwks-url", "http://keys.acme.example/jwks.json"], "https"),
        (["--jwks", str(good), "--scope", "system/*.cruds"], "unknown scope"),
        ([], "exactly one of"),
    ]
    for extra, message in cases:
        result = runner.invoke(cli, ["vendor", "add", "vendor-1", "--name", "V", *extra], env=_env(app))
        assert result.exit_code != 0, extra
        assert message in result.output, (extra, result.output)
    assert (
        runner.invoke(
            cli, ["vendor", "add", "vendor-1", "--name", "V", "--jwks", str(good)], env=_env(app)
        ).exit_code
        == 0
    )
    add = ["vendor", "add", "vendor-1", "--name", "V", "--jwks", str(good)]
    again = runner.invoke(cli, add, env=_env(app))
    assert again.exit_code != 0 and "already registered" in again.output
    missing = runner.invoke(cli, ["vendor", "disable", "ghost"], env=_env(app))
    assert missing.exit_code != 0 and "no vendor" in missing.output


def test_webhook_url_is_https_only_and_removable(app: Flask, tmp_path: Path) -> None:
    from tests.support.vendor import register

    register(app, "hooked-app")
    runner = CliRunner()
    env = _env(app)
    plain = runner.invoke(cli, ["vendor", "webhook", "hooked-app", "http://hooks.acme.example/x"], env=env)
    assert plain.exit_code != 0 and "https" in plain.output
    ok = runner.invoke(cli, ["vendor", "webhook", "hooked-app", "https://hooks.acme.example/x"], env=env)
    assert ok.exit_code == 0, ok.output
    assert "/.well-known/jwks.json" in ok.output
    listed = runner.invoke(cli, ["vendor", "list"], env=env)
    assert "webhook: https://hooks.acme.example/x" in listed.output
    unknown = runner.invoke(cli, ["vendor", "webhook", "nobody-app", "https://hooks.acme.example/x"], env=env)
    assert unknown.exit_code != 0 and "no vendor" in unknown.output
    removed = runner.invoke(cli, ["vendor", "webhook", "hooked-app", "--remove"], env=env)
    assert removed.exit_code == 0 and "removed" in removed.output
    both = runner.invoke(cli, ["vendor", "webhook", "hooked-app"], env=env)
    assert both.exit_code != 0


def test_the_crisis_line_is_an_ehr_setting_shown_with_every_thread(app: Flask) -> None:
    from fhir_bridge.relationship import messages
    from fhir_bridge.storage.models import Tenant
    from tests.support.vendor import add_tenant

    db = services.from_app(app).db
    add_tenant(db, "general")
    runner = CliRunner()
    env = _env(app)
    ok = runner.invoke(cli, ["ehr", "update", "general", "--crisis-line", "Samaritans 116 123"], env=env)
    assert ok.exit_code == 0, ok.output
    with db.sessions() as session:
        assert "Samaritans 116 123" in messages.crisis_notice(session.get(Tenant, "general"))
    bad = runner.invoke(cli, ["ehr", "update", "general", "--crisis-line", "a\nb"], env=env)
    assert bad.exit_code != 0 and "one line" in bad.output
    cleared = runner.invoke(cli, ["ehr", "update", "general", "--crisis-line", ""], env=env)
    assert cleared.exit_code == 0
    with db.sessions() as session:
        notice = messages.crisis_notice(session.get(Tenant, "general"))
    assert notice.endswith("local emergency number.")
