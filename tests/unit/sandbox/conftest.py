"""A sandbox EHR per test (copied from one built per session), and a driver that speaks SMART to it."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from fhir_bridge.sandbox import SandboxConfig, create_sandbox_app
from fhir_bridge.sandbox.runtime import Sandbox
from tests.support.http import json_object_of, json_of
from tests.support.smart import AppKey, authorize_query, pkce_pair, redirect_params

BASE = "http://127.0.0.1:9090"
FHIR = f"{BASE}/fhir"
TOKEN_URL = f"{BASE}/oauth/token"
APP_REDIRECT = "https://app.example/callback"
APP_LAUNCH = "https://app.example/launch"
PATIENT = "sbx-patient-1"
OTHER_PATIENT = "sbx-patient-2"
PRACTITIONER = "sbx-practitioner-1"
ENCOUNTER = "sbx-encounter-1"


def sandbox_of(app: Flask) -> Sandbox:
    value = app.extensions["fhir_bridge.sandbox"]
    assert isinstance(value, Sandbox)
    return value


@pytest.fixture(scope="session")
def sandbox_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys, secrets and demo data made once; each test gets a copy (RSA key generation is slow)."""
    folder = tmp_path_factory.mktemp("sandbox-template")
    app = create_sandbox_app(SandboxConfig(data_dir=folder, public_url=BASE))
    sandbox_of(app).db.dispose()
    return folder


@pytest.fixture
def sandbox_app(sandbox_template: Path, tmp_path: Path) -> Iterator[Flask]:
    data = tmp_path / "sandbox"
    shutil.copytree(sandbox_template, data)
    app = create_sandbox_app(SandboxConfig(data_dir=data, public_url=BASE))
    app.config["TESTING"] = True
    yield app
    sandbox_of(app).db.dispose()


@pytest.fixture(scope="session")
def rs384_key() -> AppKey:
    return AppKey.rsa("RS384")


@pytest.fixture(scope="session")
def es384_key() -> AppKey:
    return AppKey.ec()


class Driver:
    """The moves of an app, an admin and an EHR user against one sandbox, through its HTTP interface."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.http: FlaskClient = app.test_client()
        self.admin_token = sandbox_of(app).admin_token

    # -- admin -------------------------------------------------------------------------------
    def admin(self, method: str, path: str, body: Any = None) -> TestResponse:
        return self.http.open(
            f"/api/admin{path}",
            method=method,
            json=body,
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )

    def register(self, client_id: str = "app", **fields: Any) -> dict[str, Any]:
        body = {"redirect_uris": [APP_REDIRECT], "launch_url": APP_LAUNCH, **fields}
        response = self.admin("PUT", f"/clients/{client_id}", body)
        assert response.status_code in (200, 201), response.json
        return json_object_of(response)

    def register_backend(self, key: AppKey, client_id: str = "backend", **fields: Any) -> None:
        body = {"auth_method": "private_key_jwt", "jwks": key.jwks, "scopes": ["system/*.cruds"], **fields}
        response = self.admin("PUT", f"/clients/{client_id}", body)
        assert response.status_code in (200, 201), response.json

    def faults(self, client_id: str, faults: dict[str, Any]) -> None:
        response = self.admin("PUT", f"/clients/{client_id}/faults", faults)
        assert response.status_code == 200, response.json

    def launch(self, client_id: str = "app", patient: str = PATIENT) -> str:
        response = self.admin("POST", "/launches", {"client_id": client_id, "patient": patient})
        assert response.status_code == 201, response.json
        return str(json_of(response)["launch"])

    # -- app ---------------------------------------------------------------------------------
    def authorize(self, **params: str | None) -> TestResponse:
        return self.http.get("/oauth/authorize?" + authorize_query(**params))

    def ehr_authorize(
        self,
        *,
        client_id: str = "app",
        patient: str = PATIENT,
        scope: str = "launch openid fhirUser patient/*.rs offline_access",
        state: str | None = "state-123",  # None leaves it out of the request
        **overrides: str | None,
    ) -> tuple[TestResponse, str]:
        """An EHR launch's authorization request; returns the response and the PKCE verifier."""
        verifier, challenge = pkce_pair()
        params: dict[str, str | None] = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": APP_REDIRECT,
            "scope": scope,
            "state": state,
            "aud": FHIR,
            "launch": self.launch(client_id, patient),
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        params.update(overrides)
        return self.authorize(**params), verifier

    def ehr_code(self, **kwargs: Any) -> tuple[str, str]:
        response, verifier = self.ehr_authorize(**kwargs)
        assert response.status_code == 302, response.get_data(as_text=True)
        params = redirect_params(response.headers["Location"])
        assert "code" in params, params
        return params["code"], verifier

    def token(self, form: dict[str, str]) -> TestResponse:
        return self.http.post("/oauth/token", data=form)

    def exchange(
        self, code: str, verifier: str | None, *, client_id: str | None = "app", **extra: str
    ) -> TestResponse:
        """The authorization code grant; a None verifier or client_id is left out of the form."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": APP_REDIRECT,
            "client_id": client_id,
            "code_verifier": verifier,
            **extra,
        }
        return self.token({k: v for k, v in form.items() if v is not None})

    def ehr_launch_token(self, **kwargs: Any) -> dict[str, Any]:
        code, verifier = self.ehr_code(**kwargs)
        response = self.exchange(code, verifier, client_id=kwargs.get("client_id", "app"))
        assert response.status_code == 200, response.json
        return json_object_of(response)

    def backend_token(self, key: AppKey, scope: str = "system/*.cruds", client_id: str = "backend") -> str:
        response = self.token(key.client_credentials(client_id, TOKEN_URL, scope))
        assert response.status_code == 200, response.json
        return str(json_of(response)["access_token"])

    # -- FHIR --------------------------------------------------------------------------------
    def fhir(
        self, method: str, path: str, token: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> TestResponse:
        all_headers = {"Authorization": f"Bearer {token}", **(headers or {})}
        kwargs: dict[str, Any] = {"method": method, "headers": all_headers}
        if body is not None:
            kwargs["json"] = body
            all_headers.setdefault("Content-Type", "application/fhir+json")
        return self.http.open(f"/fhir/{path.lstrip('/')}", **kwargs)

    # -- the chart (a person in a browser) ---------------------------------------------------
    def csrf(self) -> str:
        page = self.http.get("/").get_data(as_text=True)
        match = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert match, "no CSRF token on the chart page"
        return match.group(1)


@pytest.fixture
def driver(sandbox_app: Flask) -> Driver:
    return Driver(sandbox_app)
