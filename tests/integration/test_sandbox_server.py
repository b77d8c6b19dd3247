"""The sandbox EHR as a real server process: a full EHR launch and backend-services session over HTTP.

Everything here goes through sockets the way the bridge and a browser will: discovery from the
``iss`` the chart hands out, the chart's launch form, redirects read from Location headers, id_token
keys fetched from the published JWKS, a backend client's keys fetched from its own JWKS URL.
"""

from __future__ import annotations

import html
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.support.sandbox import JwksHost, SandboxServer
from tests.support.smart import AppKey, authorize_query, pkce_pair, redirect_params

REDIRECT = "https://bridge.example/callback"
LAUNCH = "https://bridge.example/launch"
PATIENT = "sbx-patient-4"


@pytest.fixture
def app_id(sandbox_server: SandboxServer) -> str:
    """A fresh public SMART app registration per test (tests never share an app, or its faults)."""
    client_id = f"app-{uuid.uuid4().hex[:8]}"
    sandbox_server.register(client_id, name="fhir-bridge", redirect_uris=[REDIRECT], launch_url=LAUNCH)
    return client_id


def chart_launch(server: SandboxServer, client_id: str, patient: str = PATIENT) -> dict[str, str]:
    """A person on the chart page pressing "Launch": returns the iss and launch the app's frame receives."""
    browser = requests.Session()
    page = browser.get(server.url + "/", timeout=10).text
    assert "SANDBOX EHR" in page
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf is not None, "the chart page has a CSRF token"
    framed = browser.post(
        f"{server.url}/chart/{patient}/launch",
        data={"client_id": client_id, "csrf_token": csrf.group(1)},
        timeout=10,
    )
    assert framed.status_code == 200, framed.text
    iframe = re.search(r'<iframe[^>]+src="([^"]+)"', framed.text)
    assert iframe is not None, framed.text
    src = html.unescape(iframe.group(1))
    assert src.startswith(LAUNCH + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(src).query).items()}


def discover(iss: str) -> dict[str, Any]:
    response = requests.get(f"{iss}/.well-known/smart-configuration", timeout=10)
    assert response.status_code == 200
    config: dict[str, Any] = response.json()
    return config


def authorize(config: dict[str, Any], **params: str | None) -> requests.Response:
    return requests.get(
        config["authorization_endpoint"] + "?" + authorize_query(**params), allow_redirects=False, timeout=10
    )


def launch_params(
    client_id: str, launch: dict[str, str], challenge: str | None, **extra: str | None
) -> dict[str, Any]:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "scope": "launch openid fhirUser patient/*.rs offline_access",
        "state": "st-" + uuid.uuid4().hex,
        "aud": launch["iss"],
        "launch": launch["launch"],
        "code_challenge": challenge,
        "code_challenge_method": "S256" if challenge else None,
    }
    params.update(extra)
    return params


def exchange(config: dict[str, Any], client_id: str, code: str, verifier: str) -> requests.Response:
    return requests.post(
        config["token_endpoint"],
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": client_id,
            "code_verifier": verifier,
        },
        timeout=10,
    )


def test_full_ehr_launch_from_the_chart(sandbox_server: SandboxServer, app_id: str) -> None:
    launch = chart_launch(sandbox_server, app_id)
    assert launch["iss"] == sandbox_server.fhir_base
    config = discover(launch["iss"])
    assert config["code_challenge_methods_supported"] == ["S256"]

    verifier, challenge = pkce_pair()
    params = launch_params(app_id, launch, challenge, nonce="n-1")
    response = authorize(config, **params)
    assert response.status_code == 302
    back = redirect_params(response.headers["Location"])
    assert response.headers["Location"].startswith(REDIRECT + "?")
    assert back["state"] == params["state"]

    token_response = exchange(config, app_id, back["code"], verifier)
    assert token_response.status_code == 200, token_response.text
    assert token_response.headers["Cache-Control"] == "no-store"
    token = token_response.json()
    assert token["patient"] == PATIENT
    assert token["encounter"] == "sbx-encounter-4"
    assert token["need_patient_banner"] is False

    # id_token: keys from the issuer's openid-configuration, fhirUser names the practitioner.
    oidc = requests.get(f"{launch['iss']}/.well-known/openid-configuration", timeout=10).json()
    keys = KeySet.import_key_set(requests.get(oidc["jwks_uri"], timeout=10).json())
    claims = jwt.decode(token["id_token"], keys, algorithms=["RS256"]).claims
    assert claims["iss"] == oidc["issuer"] == launch["iss"]
    assert claims["aud"] == app_id and claims["nonce"] == "n-1"
    assert claims["fhirUser"] == f"{launch['iss']}/Practitioner/sbx-practitioner-1"

    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    patient = requests.get(f"{launch['iss']}/Patient/{PATIENT}", headers=bearer, timeout=10)
    assert patient.status_code == 200
    assert patient.json()["name"][0]["family"] == "Chen"
    other = requests.get(f"{launch['iss']}/Patient/sbx-patient-1", headers=bearer, timeout=10)
    assert other.status_code == 403

    # Refresh rotates; the rotated-away refresh token is dead afterwards.
    refreshed = requests.post(
        config["token_endpoint"],
        data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"], "client_id": app_id},
        timeout=10,
    )
    assert refreshed.status_code == 200
    assert refreshed.json()["refresh_token"] != token["refresh_token"]
    reused = requests.post(
        config["token_endpoint"],
        data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"], "client_id": app_id},
        timeout=10,
    )
    assert reused.json()["error"] == "invalid_grant"


def test_launch_refusals_over_http(sandbox_server: SandboxServer, app_id: str) -> None:
    config = discover(sandbox_server.fhir_base)
    verifier, challenge = pkce_pair()

    wrong_redirect = authorize(
        config,
        **launch_params(app_id, chart_launch(sandbox_server, app_id), challenge, redirect_uri=REDIRECT + "x"),
    )
    assert wrong_redirect.status_code == 400 and "Location" not in wrong_redirect.headers

    for bad in ({"code_challenge": None}, {"code_challenge_method": "plain"}):
        params = launch_params(app_id, chart_launch(sandbox_server, app_id), challenge, **bad)
        refused = authorize(config, **params)
        back = redirect_params(refused.headers["Location"])
        assert back["error"] == "invalid_request" and back["state"] == params["state"] and "code" not in back

    params = launch_params(app_id, chart_launch(sandbox_server, app_id), challenge)
    code = redirect_params(authorize(config, **params).headers["Location"])["code"]
    assert exchange(config, app_id, code, pkce_pair()[0]).json()["error"] == "invalid_grant"  # wrong verifier
    assert exchange(config, app_id, code, verifier).status_code == 200
    assert exchange(config, app_id, code, verifier).json()["error"] == "invalid_grant"  # reused

    # PKCE at the token endpoint: a code issued with a challenge is worthless without its verifier,
    # and the redirect URI must be the one the code was issued for (RFC 6749 4.1.3).
    params = launch_params(app_id, chart_launch(sandbox_server, app_id), challenge)
    code = redirect_params(authorize(config, **params).headers["Location"])["code"]
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "client_id": app_id}
    no_verifier = requests.post(config["token_endpoint"], data=form, timeout=10)
    assert no_verifier.status_code == 400 and no_verifier.json()["error"] == "invalid_request"
    other_redirect = {**form, "redirect_uri": REDIRECT + "x", "code_verifier": verifier}
    moved = requests.post(config["token_endpoint"], data=other_redirect, timeout=10)
    assert moved.status_code == 400 and moved.json()["error"] == "invalid_grant"

    # An expired code, made so on demand (a running server's clock cannot be moved by the test).
    assert sandbox_server.admin("PUT", f"/clients/{app_id}/faults", {"code_expired": True}).status_code == 200
    params = launch_params(app_id, chart_launch(sandbox_server, app_id), challenge)
    code = redirect_params(authorize(config, **params).headers["Location"])["code"]
    expired = exchange(config, app_id, code, verifier)
    assert expired.json()["error"] == "invalid_grant" and "expired" in expired.json()["error_description"]


def test_backend_services_write_and_search(sandbox_server: SandboxServer) -> None:
    key = AppKey.rsa("RS384")
    client_id = f"backend-{uuid.uuid4().hex[:8]}"
    patient = "sbx-patient-5"
    with JwksHost() as jwks_host:
        jwks_host.jwks = key.jwks
        sandbox_server.register(
            client_id, auth_method="private_key_jwt", jwks_url=jwks_host.url, scopes=["system/*.cruds"]
        )
        config = discover(sandbox_server.fhir_base)
        response = requests.post(
            config["token_endpoint"],
            data=key.client_credentials(client_id, config["token_endpoint"], "system/*.cruds"),
            timeout=10,
        )
        assert response.status_code == 200, response.text
        assert response.json()["expires_in"] <= 300
        assert jwks_host.requests == 1
    bearer = {
        "Authorization": f"Bearer {response.json()['access_token']}",
        "Content-Type": "application/fhir+json",
    }
    base = sandbox_server.fhir_base
    ident = f"https://fhir-bridge.org/fhir/id/{uuid.uuid4().hex[:8]}"

    def bundle(day: int) -> dict[str, Any]:
        qr_url = f"urn:uuid:{uuid.uuid4()}"
        qr = {
            "resourceType": "QuestionnaireResponse",
            "identifier": {"system": ident, "value": f"qr-{day}"},
            "questionnaire": "https://fhir-bridge.org/fhir/Questionnaire/phq9",
            "status": "completed",
            "subject": {"reference": f"Patient/{patient}"},
            "authored": f"2024-03-{day:02d}T09:00:00Z",
        }
        obs = {
            "resourceType": "Observation",
            "identifier": [{"system": ident, "value": f"score-{day}"}],
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
            "subject": {"reference": f"Patient/{patient}"},
            "effectiveDateTime": f"2024-03-{day:02d}T09:00:00Z",
            "valueInteger": 20 - day // 2,
            "derivedFrom": [{"reference": qr_url}],
        }
        return {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": qr_url,
                    "resource": qr,
                    "request": {
                        "method": "POST",
                        "url": "QuestionnaireResponse",
                        "ifNoneExist": f"identifier={ident}|qr-{day}",
                    },
                },
                {
                    "resource": obs,
                    "request": {
                        "method": "POST",
                        "url": "Observation",
                        "ifNoneExist": f"identifier={ident}|score-{day}",
                    },
                },
            ],
        }

    for day in range(1, 13):
        written = requests.post(base, json=bundle(day), headers=bearer, timeout=10)
        assert written.status_code == 200, written.text
    again = requests.post(base, json=bundle(1), headers=bearer, timeout=10).json()
    assert [e["response"]["status"] for e in again["entry"]] == ["200 OK", "200 OK"]

    # Paged search, following the server's absolute next links.
    url: str | None = (
        f"{base}/Observation?patient={patient}&code=http://loinc.org|44261-6&date=ge2024-03-03&_sort=-date&_count=4"
    )
    dates: list[str] = []
    while url:
        page = requests.get(url, headers=bearer, timeout=10).json()
        assert page.get("total", 10) == 10
        dates += [e["resource"]["effectiveDateTime"][:10] for e in page.get("entry", [])]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert dates == [f"2024-03-{d:02d}" for d in range(12, 2, -1)]
    first = requests.get(
        f"{base}/Observation?patient={patient}&date=ge2024-03-03&_count=4", headers=bearer, timeout=10
    )
    assert first.json()["total"] == 10
    derived = requests.get(
        f"{base}/Observation?identifier={ident}|score-5", headers=bearer, timeout=10
    ).json()
    qr_ref = derived["entry"][0]["resource"]["derivedFrom"][0]["reference"]
    assert qr_ref.startswith("QuestionnaireResponse/")
    assert (
        requests.get(f"{base}/{qr_ref}", headers=bearer, timeout=10).json()["identifier"]["value"] == "qr-5"
    )


def test_concurrent_identical_conditional_creates_make_one_resource(sandbox_server: SandboxServer) -> None:
    """Unlike the third-party test server, the sandbox's conditional create is atomic."""
    key = AppKey.ec()
    client_id = f"backend-{uuid.uuid4().hex[:8]}"
    sandbox_server.register(
        client_id, auth_method="private_key_jwt", jwks=key.jwks, scopes=["system/*.cruds"]
    )
    token = requests.post(
        sandbox_server.token_url,
        data=key.client_credentials(client_id, sandbox_server.token_url, "system/Observation.crs"),
        timeout=10,
    ).json()["access_token"]
    ident = uuid.uuid4().hex
    observation = {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:test", "value": ident}],
        "status": "final",
        "code": {"text": "steps"},
        "subject": {"reference": "Patient/sbx-patient-6"},
        "valueInteger": 4000,
    }
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/fhir+json",
        "If-None-Exist": f"identifier=urn:test|{ident}",
    }

    def post(_: int) -> tuple[int, str]:
        response = requests.post(
            f"{sandbox_server.fhir_base}/Observation", json=observation, headers=headers, timeout=30
        )
        return response.status_code, response.json()["id"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(post, range(16)))
    assert sorted(status for status, _ in results).count(201) == 1
    assert {status for status, _ in results} == {200, 201}
    assert len({rid for _, rid in results}) == 1
    found = requests.get(
        f"{sandbox_server.fhir_base}/Observation?identifier=urn:test|{ident}", headers=headers, timeout=10
    ).json()
    assert found["total"] == 1
