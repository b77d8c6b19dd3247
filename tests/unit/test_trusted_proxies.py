"""Forwarded headers: believed from the configured proxies only, so the token endpoint's per-client rate
limit sees each vendor behind the hospital's proxy, and a client cannot claim another's address."""

from __future__ import annotations

import pytest
from flask import Flask

from fhir_bridge.settings import SettingsError, load_settings
from tests.conftest import AppFactory

LIMIT = 120  # token requests per client address per minute (fhir_bridge.api.oauth)


def token_status(app: Flask, peer: str, forwarded_for: str | None = None) -> int:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    response = app.test_client().post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers=headers,
        environ_base={"REMOTE_ADDR": peer},
    )
    return response.status_code


def exhaust(app: Flask, peer: str, forwarded_for: str | None = None) -> None:
    statuses = {token_status(app, peer, forwarded_for) for _ in range(LIMIT)}
    assert 429 not in statuses
    assert token_status(app, peer, forwarded_for) == 429


def test_clients_behind_a_trusted_proxy_each_have_their_own_limit(make_app: AppFactory) -> None:
    app = make_app(TRUSTED_PROXIES="10.0.1.0/28")
    exhaust(app, "10.0.1.5", "198.51.100.7")
    assert token_status(app, "10.0.1.5", "198.51.100.8") != 429, "another client behind the proxy"
    # Only the entry the proxy added counts: a client cannot pick its bucket by prepending addresses.
    assert token_status(app, "10.0.1.5", "203.0.113.9, 198.51.100.7") == 429


def test_forwarded_headers_from_anywhere_else_are_ignored(make_app: AppFactory) -> None:
    app = make_app()  # default: only a proxy on this host is trusted
    exhaust(app, "192.0.2.50", "198.51.100.7")
    assert token_status(app, "192.0.2.50", "198.51.100.99") == 429, "a claimed address changes nothing"
    assert token_status(app, "127.0.0.1", "198.51.100.99") != 429, "the local proxy is trusted"


def test_a_bad_entry_is_named_at_start_up() -> None:
    with pytest.raises(SettingsError, match=r"TRUSTED_PROXIES.*'proxy\.example'"):
        load_settings({"TRUSTED_PROXIES": "10.0.0.1,proxy.example"}, environ={})
