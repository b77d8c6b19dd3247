"""Operations surface: health, readiness, metrics, JWKS, error shapes, and logs without PHI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, abort
from flask.testing import FlaskClient

from fhir_bridge import create_app
from fhir_bridge.errors import Unprocessable
from tests.conftest import AppFactory
from tests.support.http import json_of


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok"}


def test_readyz_when_migrated(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert json_of(response)["checks"] == {"database": "ok", "migrations": "ok"}


def test_readyz_before_migrations(tmp_path: Path, keys_dir: Path) -> None:
    app = create_app(
        {
            "INSTANCE_PATH": str(tmp_path / "i"),
            "KEYS_DIR": str(keys_dir),
            "DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
        }
    )
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert json_of(response)["status"] == "not-ready"
    assert "expected" in json_of(response)["checks"]["migrations"]


def test_metrics_expose_requests_and_outbox(client: FlaskClient) -> None:
    client.get("/healthz")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'fhir_bridge_http_requests_total{method="GET",route="/healthz",status="200"}' in text
    assert "fhir_bridge_outbox_items" in text


def test_jwks_is_public_and_cacheable(client: FlaskClient) -> None:
    response = client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.headers["Cache-Control"].startswith("public")
    assert all("d" not in key for key in json_of(response)["keys"])


def _routes_that_fail(app: Flask) -> None:
    @app.get("/api/v1/_test/unprocessable")
    def api_fail() -> Any:
        raise Unprocessable("value must be a number", code="invalid-value")

    @app.get("/fhir/_test/boom")
    def fhir_boom() -> Any:
        raise RuntimeError("secret internal detail: Jane Roe")

    @app.get("/app/_test/boom")
    def html_boom() -> Any:
        raise RuntimeError("secret internal detail: Jane Roe")

    @app.get("/app/_test/forbidden")
    def html_forbidden() -> Any:
        abort(403)


def test_errors_take_the_shape_of_their_surface(make_app: AppFactory) -> None:
    app = make_app()
    _routes_that_fail(app)
    client = app.test_client()

    api = client.get("/api/v1/_test/unprocessable")
    assert api.status_code == 422
    assert api.json == {"error": "invalid-value", "message": "value must be a number"}

    fhir = client.get("/fhir/_test/boom")
    assert fhir.status_code == 500
    assert fhir.mimetype == "application/fhir+json"
    assert json_of(fhir)["resourceType"] == "OperationOutcome"
    assert "Jane Roe" not in fhir.get_data(as_text=True)

    html = client.get("/app/_test/boom")
    assert html.status_code == 500
    assert html.mimetype == "text/html"
    body = html.get_data(as_text=True)
    assert "Jane Roe" not in body and "Traceback" not in body and "RuntimeError" not in body

    assert client.get("/app/_test/forbidden").status_code == 403
    missing = client.get("/fhir/NoSuchThing/1")
    assert missing.status_code == 404 and json_of(missing)["issue"][0]["code"] == "not-found"
    assert client.post("/healthz").status_code == 405


def test_body_over_the_limit_is_413(make_app: AppFactory) -> None:
    app = make_app(max_body_bytes=1024)

    @app.post("/api/v1/_test/echo")
    def echo() -> Any:
        from flask import request

        return {"n": len(request.get_data())}

    response = app.test_client().post("/api/v1/_test/echo", data=b"x" * 5000, content_type="application/json")
    assert response.status_code == 413
    assert json_of(response)["error"] == "payload-too-large"


def test_logs_are_json_with_a_request_id_and_no_phi(
    make_app: AppFactory, capfd: pytest.CaptureFixture[str]
) -> None:
    app = make_app()
    _routes_that_fail(app)
    client = app.test_client()
    name = "Zebedee Quillfeather-Phi"
    record = {"records": [{"patient_name": name, "note": f"{name} felt low"}]}
    client.post("/api/v1/records?name=" + name.replace(" ", "%20"), json=record)
    client.get("/fhir/_test/boom", headers={"X-Request-ID": "abc123"})
    client.post("/fhir/Observation", json={"resourceType": "Observation", "note": [{"text": name}]})
    out, err = capfd.readouterr()
    logged = out + err
    assert name not in logged and "Zebedee" not in logged and "Jane Roe" not in logged
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert lines, "expected JSON log lines on stderr"
    assert all("request_id" in line for line in lines if line["logger"] == "fhir_bridge.access")
    boom = [line for line in lines if line.get("exception") == "RuntimeError"]
    assert boom and boom[0]["request_id"] == "abc123"
