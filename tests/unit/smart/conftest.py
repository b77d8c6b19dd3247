"""Fixtures of the SMART app's unit tests: an app on a public HTTPS URL, a tenant, a browser, a faked EHR."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient
from joserfc.jwk import RSAKey

from fhir_bridge import services
from fhir_bridge.storage.models import Tenant
from tests.conftest import AppFactory
from tests.support.fake_ehr import BASE, CLIENT_ID, FakeEhr

PUBLIC = "https://bridge.example.org"
EHR_ORIGIN = "https://ehr.example.com"


@pytest.fixture(scope="session")
def ehr_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "ehr-1", "alg": "RS256", "use": "sig"}, private=True)


def add_tenant(app: Flask, tenant_id: str = "t1", **fields: Any) -> None:
    values: dict[str, Any] = {
        "id": tenant_id,
        "name": f"Hospital {tenant_id}",
        "fhir_base_url": BASE,
        "smart_client_id": CLIENT_ID,
        "frame_ancestors": [EHR_ORIGIN],
    }
    values.update(fields)
    with app.app_context(), services.current().db.transaction() as session:
        session.add(Tenant(**values))


@pytest.fixture
def smart(make_app: AppFactory) -> Flask:
    app = make_app(PUBLIC_URL=PUBLIC)
    add_tenant(app)
    return app


@pytest.fixture
def browser(smart: Flask) -> FlaskClient:
    return smart.test_client()


@pytest.fixture
def ehr(ehr_key: RSAKey) -> Iterator[FakeEhr]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        fake = FakeEhr(key=ehr_key)
        fake.install(rsps)
        yield fake


def calls(ehr: FakeEhr) -> list[str]:
    return [str(call.request.url) for call in ehr.rsps.calls]


def launch(browser: FlaskClient, query: str = f"iss={BASE}&launch=abc123") -> Any:
    return browser.get(f"/launch?{query}", base_url=PUBLIC)


def start(browser: FlaskClient, ehr: FakeEhr, query: str = f"iss={BASE}&launch=abc123") -> dict[str, str]:
    response = launch(browser, query)
    assert response.status_code == 302, response.get_data(as_text=True)
    return ehr.authorize(response.headers["Location"])


def finish(browser: FlaskClient, params: dict[str, str], *, tenant: str = "t1", extra: str = "") -> Any:
    query = f"code=the-code&state={params['state']}{extra}"
    return browser.get(f"/callback/{tenant}?{query}", base_url=PUBLIC)


def full_launch(browser: FlaskClient, ehr: FakeEhr) -> str:
    response = finish(browser, start(browser, ehr))
    assert response.status_code == 303, response.get_data(as_text=True)
    match = re.fullmatch(rf"{PUBLIC}/app/([A-Za-z0-9_-]+)/", response.headers["Location"])
    assert match, response.headers["Location"]
    return match.group(1)


def no_tokens_in(ehr: FakeEhr, *responses_: Any) -> None:
    for response in responses_:
        text = response.get_data(as_text=True) + str(response.headers)
        for token in ehr.issued:
            assert token not in text
        assert re.search(r"\b(at|rt)-\d+-secret", text) is None
