"""The chart page launches apps like an EHR; the admin API registers them; faults misbehave on demand."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import pytest
from werkzeug.test import TestResponse

from tests.support.http import json_of
from tests.support.smart import AppKey, pkce_pair, redirect_params
from tests.unit.sandbox.conftest import (
    APP_LAUNCH,
    APP_REDIRECT,
    FHIR,
    OTHER_PATIENT,
    PATIENT,
    TOKEN_URL,
    Driver,
)

# -- the chart -----------------------------------------------------------------------------------


def test_chart_lists_patients_under_a_sandbox_banner(driver: Driver) -> None:
    driver.register(name="fhir-bridge")
    response = driver.http.get("/")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "SANDBOX EHR" in page and "development and demos only" in page
    assert response.headers["X-Sandbox-EHR"] == "development-and-demo-only"
    for name in ("Alex Rivera", "Jordan Blake", "Sam Okafor"):
        assert name in page
    assert page.count(">Launch fhir-bridge</button>") == 6
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'self'" in csp
    assert "http://" not in re.sub(r'href="http[^"]+"', "", page.split("<body>")[1]).replace(
        "http://127.0.0.1:9090", ""
    ), "no third-party assets"


def test_launch_button_opens_the_app_in_a_frame_with_iss_and_launch(driver: Driver) -> None:
    driver.register(name="fhir-bridge")
    response = driver.http.post(
        f"/chart/{PATIENT}/launch", data={"client_id": "app", "csrf_token": driver.csrf()}
    )
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "Alex Rivera" in page and "MRN-100001" in page
    iframe = re.search(r'<iframe[^>]+src="([^"]+)"', page)
    assert iframe is not None, page
    src = html.unescape(iframe.group(1))
    assert src.startswith(APP_LAUNCH + "?")
    query = {k: v[0] for k, v in parse_qs(urlsplit(src).query).items()}
    assert query["iss"] == FHIR
    assert "frame-src 'self' https://app.example;" in response.headers["Content-Security-Policy"]

    # What the app does next: authorize with that launch, and it gets this patient.
    verifier, challenge = pkce_pair()
    authorize = driver.authorize(
        response_type="code",
        client_id="app",
        redirect_uri=APP_REDIRECT,
        scope="launch patient/*.rs",
        state="abc",
        aud=query["iss"],
        launch=query["launch"],
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    code = redirect_params(authorize.headers["Location"])["code"]
    assert json_of(driver.exchange(code, verifier))["patient"] == PATIENT


def test_launch_button_needs_the_csrf_token(driver: Driver) -> None:
    driver.register()
    response = driver.http.post(f"/chart/{PATIENT}/launch", data={"client_id": "app", "csrf_token": "x"})
    assert response.status_code == 403
    assert "text/html" in response.content_type


def test_standalone_link_is_offered_for_apps_that_have_one(driver: Driver) -> None:
    driver.register(standalone_url="https://app.example/launch/standalone?tenant=sandbox")
    page = driver.http.get("/").get_data(as_text=True)
    assert 'href="https://app.example/launch/standalone?tenant=sandbox"' in page


# -- the admin API -------------------------------------------------------------------------------


def test_admin_api_needs_the_admin_token(driver: Driver) -> None:
    response = driver.http.get("/api/admin/clients")
    assert response.status_code == 401
    assert json_of(response)["error"] == "admin-token-required"
    response = driver.http.get("/api/admin/clients", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401
    response = driver.http.get("/api/admin/clients", headers={"Authorization": "Bearer caf\u00e9"})
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"redirect_uris": ["not a url"]}, "absolute http(s) URL"),
        ({"redirect_uris": ["https://a.example/cb#frag"]}, "without a fragment"),
        ({"auth_method": "private_key_jwt"}, "needs jwks_url"),
        ({"auth_method": "client_secret_basic"}, "public or private_key_jwt"),
        ({"scopes": ["system/*.rs"]}, "system/ scopes need a private_key_jwt client"),
        ({"scopes": ["patient/Observation.sr"]}, "letters of cruds in order"),
        ({"scopes": ["patient/Observation"]}, "malformed"),
        ({"scopes": ["admin"]}, "neither a resource scope"),
        ({"secret": "x"}, "Unknown field"),
        (
            {"auth_method": "private_key_jwt", "jwks": {"keys": [{"kty": "RSA", "d": "x"}]}},
            "public keys only",
        ),
    ],
)
def test_bad_registrations_are_refused_with_the_reason(
    driver: Driver, body: dict[str, object], message: str
) -> None:
    response = driver.admin("PUT", "/clients/app", body)
    assert response.status_code == 400
    assert message in json_of(response)["message"]


def test_registration_round_trip_and_delete(driver: Driver) -> None:
    created = driver.register(name="My app")
    assert created["auth_method"] == "public"
    assert "patient/*.cruds" in created["scopes"]
    assert json_of(driver.admin("GET", "/clients/app"))["name"] == "My app"
    assert driver.admin("DELETE", "/clients/app").status_code == 204
    assert driver.admin("GET", "/clients/app").status_code == 404


def test_launch_api_checks_its_patient(driver: Driver) -> None:
    driver.register()
    response = driver.admin("POST", "/launches", {"client_id": "app", "patient": "nobody"})
    assert response.status_code == 400
    created = json_of(driver.admin("POST", "/launches", {"client_id": "app", "patient": OTHER_PATIENT}))
    assert created["iss"] == FHIR and created["encounter"] == "sbx-encounter-2"
    assert created["launch_url"].startswith(APP_LAUNCH + "?iss=")


# -- fault injection -----------------------------------------------------------------------------


def test_fault_list_is_documented_by_the_api(driver: Driver) -> None:
    faults = json_of(driver.admin("GET", "/faults"))
    assert set(faults["client"]) == {
        "token_error",
        "authorize_error",
        "code_expired",
        "token_response",
        "search_foreign_patient",
        "search_next_url",
        "fhir_error",
    }
    assert "smart-configuration" in faults["server"]["discovery"]


@pytest.mark.parametrize(
    "faults",
    [
        {"nonsense": True},
        {"token_error": {"error": "made_up"}},
        {"token_error": {"error": "invalid_grant", "error_description": 'has "quotes"'}},
        {"fhir_error": {"status": 200}},
        {"fhir_error": {"status": 503, "times": 0}},
        {"code_expired": "yes"},
        {"token_response": {"access_token": "attacker-chosen"}},
    ],
)
def test_bad_faults_are_refused(driver: Driver, faults: dict[str, object]) -> None:
    driver.register()
    assert driver.admin("PUT", "/clients/app/faults", faults).status_code == 400


def test_token_error_fault_answers_with_the_oauth_error_then_clears(driver: Driver) -> None:
    driver.register()
    driver.faults("app", {"token_error": {"error": "temporarily_unavailable", "status": 503, "times": 1}})
    code, verifier = driver.ehr_code()
    failed = driver.exchange(code, verifier)
    assert failed.status_code == 503
    assert failed.json == {"error": "temporarily_unavailable"}
    assert driver.exchange(code, verifier).status_code == 200  # the code was not spent by the fault
    assert json_of(driver.admin("GET", "/clients/app"))["faults"] == {}


def test_authorize_error_fault_redirects_with_the_error_and_state(driver: Driver) -> None:
    driver.register()
    driver.faults(
        "app", {"authorize_error": {"error": "access_denied", "error_description": "clinician said no"}}
    )
    response, _ = driver.ehr_authorize(state="keep-me")
    params = redirect_params(response.headers["Location"])
    assert params == {"error": "access_denied", "error_description": "clinician said no", "state": "keep-me"}


def test_code_expired_fault(driver: Driver) -> None:
    driver.register()
    driver.faults("app", {"code_expired": True})
    code, verifier = driver.ehr_code()
    response = driver.exchange(code, verifier)
    assert json_of(response)["error"] == "invalid_grant"
    assert "expired" in json_of(response)["error_description"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"expires_in": -1},
        {"expires_in": "3600"},
        {"expires_in": 10**12},
        {"expires_in": None},
        {"patient": None},
    ],
)
def test_token_response_fault_bends_the_response(driver: Driver, overrides: dict[str, object]) -> None:
    driver.register()
    driver.faults("app", {"token_response": overrides})
    token = driver.ehr_launch_token()
    for name, value in overrides.items():
        if value is None:
            assert name not in token
        else:
            assert token[name] == value
    # Only the response is bent: the token itself still works with its real context.
    assert driver.fhir("GET", f"Patient/{PATIENT}", token["access_token"]).status_code == 200


def test_search_foreign_patient_fault_leaks_another_patients_resource(
    driver: Driver, rs384_key: AppKey
) -> None:
    driver.register()
    driver.register_backend(rs384_key)
    system = driver.backend_token(rs384_key)
    for patient in (PATIENT, OTHER_PATIENT):
        obs = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "mood"},
            "subject": {"reference": f"Patient/{patient}"},
            "valueInteger": 3,
        }
        assert driver.fhir("POST", "Observation", system, obs).status_code == 201
    token = driver.ehr_launch_token(scope="launch patient/*.rs")["access_token"]
    honest = json_of(driver.fhir("GET", "Observation", token))
    assert {e["resource"]["subject"]["reference"] for e in honest["entry"]} == {f"Patient/{PATIENT}"}

    driver.faults("app", {"search_foreign_patient": True})
    leaky = json_of(driver.fhir("GET", "Observation", token))
    subjects = [e["resource"]["subject"]["reference"] for e in leaky["entry"]]
    assert subjects.count(f"Patient/{OTHER_PATIENT}") == 1
    assert subjects.count(f"Patient/{PATIENT}") == 1


def test_fhir_error_fault_fails_requests_then_recovers(driver: Driver) -> None:
    driver.register()
    token = driver.ehr_launch_token()["access_token"]
    driver.faults("app", {"fhir_error": {"status": 429, "retry_after": "5", "times": 2}})
    for _ in range(2):
        response = driver.fhir("GET", f"Patient/{PATIENT}", token)
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "5"
        assert json_of(response)["resourceType"] == "OperationOutcome"
    assert driver.fhir("GET", f"Patient/{PATIENT}", token).status_code == 200


def test_faults_apply_only_to_their_app(driver: Driver, rs384_key: AppKey) -> None:
    driver.register()
    driver.register_backend(rs384_key)
    driver.faults("app", {"token_error": {"error": "server_error", "status": 500}})
    response = driver.token(rs384_key.client_credentials("backend", TOKEN_URL, "system/*.rs"))
    assert response.status_code == 200
    # A backend client is recognised by its assertion (it sends no client_id).
    driver.faults("backend", {"token_error": {"error": "invalid_client", "status": 401}})
    response = driver.token(rs384_key.client_credentials("backend", TOKEN_URL, "system/*.rs"))
    assert (response.status_code, json_of(response)["error"]) == (401, "invalid_client")


def test_fhir_error_fault_can_answer_with_something_that_is_not_fhir(driver: Driver) -> None:
    driver.register()
    token = driver.ehr_launch_token()["access_token"]
    driver.faults(
        "app", {"fhir_error": {"status": 200, "content_type": "text/html", "body": "<h1>Sign in</h1>"}}
    )
    response = driver.fhir("GET", "Observation", token)
    assert (response.status_code, response.mimetype) == (200, "text/html")
    assert response.get_data(as_text=True) == "<h1>Sign in</h1>"


def test_search_next_url_fault_points_paging_elsewhere(driver: Driver) -> None:
    driver.register()
    token = driver.ehr_launch_token()["access_token"]
    driver.faults("app", {"search_next_url": "https://evil.example/fhir/Observation?page=2"})
    bundle = json_of(driver.fhir("GET", "Encounter", token))
    assert {"relation": "next", "url": "https://evil.example/fhir/Observation?page=2"} in bundle["link"]


def test_forged_id_token_can_be_handed_to_the_app(driver: Driver) -> None:
    """The I rows of the checklist: the test forges the id_token, the sandbox delivers it in a real flow."""
    driver.register()
    driver.faults("app", {"token_response": {"id_token": "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."}})
    token = driver.ehr_launch_token(scope="launch openid fhirUser patient/*.rs")
    assert token["id_token"] == "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."


@pytest.mark.parametrize(
    ("fault", "check"),
    [
        ({"status": 500}, lambda r: r.status_code == 500),
        (
            {"content_type": "text/html", "body": "<html>maintenance</html>"},
            lambda r: r.mimetype == "text/html",
        ),
        (
            {
                "overrides": {
                    "code_challenge_methods_supported": None,
                    "token_endpoint": "http://evil.example/t",
                }
            },
            lambda r: (
                "code_challenge_methods_supported" not in r.json
                and json_of(r)["token_endpoint"] == "http://evil.example/t"
            ),
        ),
        (
            {"redirect": "https://other.example/.well-known/smart-configuration"},
            lambda r: r.status_code == 302 and r.headers["Location"].startswith("https://other.example/"),
        ),
    ],
)
def test_discovery_fault_bends_smart_configuration(
    driver: Driver, fault: dict[str, object], check: Callable[[TestResponse], bool]
) -> None:
    assert driver.admin("PUT", "/discovery/fault", fault).status_code == 200
    response = driver.http.get("/fhir/.well-known/smart-configuration")
    assert check(response)
    assert driver.admin("DELETE", "/discovery/fault").status_code == 204
    assert json_of(driver.http.get("/fhir/.well-known/smart-configuration"))[
        "code_challenge_methods_supported"
    ] == ["S256"]


def test_discovery_fault_can_target_one_document_and_expire(driver: Driver) -> None:
    fault = {"status": 503, "documents": ["openid-configuration"], "times": 1}
    assert driver.admin("PUT", "/discovery/fault", fault).status_code == 200
    assert driver.http.get("/fhir/.well-known/smart-configuration").status_code == 200
    assert driver.http.get("/fhir/.well-known/openid-configuration").status_code == 503
    assert driver.http.get("/fhir/.well-known/openid-configuration").status_code == 200


@pytest.mark.parametrize(
    "fault",
    [
        {},
        {"status": 700},
        {"delay_seconds": 60},
        {"documents": ["metadata"]},
        {"overrides": []},
        {"colour": "red"},
    ],
)
def test_bad_discovery_faults_are_refused(driver: Driver, fault: dict[str, object]) -> None:
    assert driver.admin("PUT", "/discovery/fault", fault).status_code == 400
