"""The sandbox's SMART authorization server behaves like a strict, correct EHR (SMART App Launch 2.x)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import re
import time
from datetime import timedelta
from typing import Any

import pytest
import responses
import time_machine
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from tests.support.http import json_of
from tests.support.smart import ASSERTION_TYPE, AppKey, pkce_pair, redirect_params
from tests.unit.sandbox.conftest import (
    APP_REDIRECT,
    BASE,
    ENCOUNTER,
    FHIR,
    PATIENT,
    PRACTITIONER,
    TOKEN_URL,
    Driver,
    sandbox_of,
)

# -- EHR launch, authorization code with PKCE --------------------------------------------------


def test_ehr_launch_gives_a_code_with_state_echoed_and_a_token_with_launch_context(driver: Driver) -> None:
    driver.register()
    response, verifier = driver.ehr_authorize(state="s-0123456789")
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith(APP_REDIRECT + "?")
    params = redirect_params(location)
    assert params["state"] == "s-0123456789"

    token = driver.exchange(params["code"], verifier)
    assert token.status_code == 200
    assert token.headers["Cache-Control"] == "no-store"
    assert token.headers["Pragma"] == "no-cache"
    body = json_of(token)
    assert body["token_type"] == "Bearer"
    assert body["patient"] == PATIENT
    assert body["encounter"] == ENCOUNTER
    assert body["need_patient_banner"] is False
    assert set(body["scope"].split()) == {"launch", "openid", "fhirUser", "patient/*.rs", "offline_access"}
    assert body["refresh_token"] and body["id_token"]

    read = driver.fhir("GET", f"Patient/{PATIENT}", body["access_token"])
    assert read.status_code == 200
    assert json_of(read)["id"] == PATIENT


def test_unknown_redirect_uri_is_refused_on_a_page_never_redirected(driver: Driver) -> None:
    driver.register()
    response, _ = driver.ehr_authorize(redirect_uri="https://evil.example/callback")
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert "text/html" in response.content_type
    assert "evil.example" not in response.get_data(as_text=True)


def test_redirect_uri_must_match_exactly(driver: Driver) -> None:
    driver.register()
    for near_miss in (APP_REDIRECT + "/", APP_REDIRECT + "?x=1", APP_REDIRECT.upper(), APP_REDIRECT + "#f"):
        response, _ = driver.ehr_authorize(redirect_uri=near_miss)
        assert response.status_code == 400, near_miss
        assert "Location" not in response.headers


def test_unknown_client_is_refused_on_a_page(driver: Driver) -> None:
    driver.register()
    response = driver.authorize(
        response_type="code",
        client_id="nobody",
        redirect_uri=APP_REDIRECT,
        state="s",
        aud=FHIR,
        scope="launch",
    )
    assert response.status_code == 400
    assert "Location" not in response.headers


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"code_challenge": None, "code_challenge_method": None}, "PKCE is required"),
        ({"code_challenge_method": None}, "S256"),
        ({"code_challenge_method": "plain"}, "plain is not accepted"),
        ({"state": None}, "state is required"),
        ({"aud": "https://other.example/fhir"}, "aud must be"),
        ({"aud": FHIR + "/"}, "aud must be"),
        ({"launch": "not-a-launch"}, "launch is unknown"),
    ],
)
def test_bad_authorization_requests_go_back_to_the_app_with_an_error(
    driver: Driver, overrides: dict[str, Any], reason: str
) -> None:
    driver.register()
    # Any: these are request parameters (None drops one), passed on as ehr_authorize's keywords.
    response, _ = driver.ehr_authorize(**overrides)
    assert response.status_code == 302
    params = redirect_params(response.headers["Location"])
    assert "code" not in params
    assert params["error"] == "invalid_request"
    assert reason in params["error_description"]
    if overrides.get("state", "x") is not None:
        assert params["state"] == "state-123"


def test_launch_of_another_app_is_refused(driver: Driver) -> None:
    driver.register("app")
    driver.register("other-app")
    launch = driver.launch("other-app")
    response, _ = driver.ehr_authorize(launch=launch)
    assert redirect_params(response.headers["Location"])["error"] == "invalid_request"


def test_launch_expires(driver: Driver) -> None:
    driver.register()
    with time_machine.travel(0, tick=False) as clock:
        clock.move_to("2030-01-01T09:00:00Z")
        launch = driver.launch()
        clock.shift(timedelta(minutes=11))
        response, _ = driver.ehr_authorize(launch=launch)
    assert "launch is unknown, expired" in redirect_params(response.headers["Location"])["error_description"]


def test_scopes_are_narrowed_to_the_registration(driver: Driver) -> None:
    driver.register(scopes=["launch", "patient/Observation.rs", "openid", "fhirUser"])
    token = driver.ehr_launch_token(
        scope="launch openid fhirUser patient/Observation.read patient/Patient.rs"
    )
    # v1 syntax is granted in the form asked; what the app may not have is left out, not refused.
    assert token["scope"].split() == ["launch", "openid", "fhirUser", "patient/Observation.read"]
    assert "refresh_token" not in token


def test_wrong_code_verifier_is_refused(driver: Driver) -> None:
    driver.register()
    code, _ = driver.ehr_code()
    wrong, _ = pkce_pair()
    response = driver.exchange(code, wrong)
    assert response.status_code == 400
    assert json_of(response)["error"] == "invalid_grant"


def test_missing_code_verifier_is_refused(driver: Driver) -> None:
    driver.register()
    code, _ = driver.ehr_code()
    response = driver.exchange(code, None)
    assert response.status_code == 400
    assert json_of(response)["error"] == "invalid_request"


def test_plain_verifier_equal_to_the_challenge_is_refused(driver: Driver) -> None:
    driver.register()
    verifier, challenge = pkce_pair()
    response, _ = driver.ehr_authorize(code_challenge=challenge)
    code = redirect_params(response.headers["Location"])["code"]
    assert json_of(driver.exchange(code, challenge))["error"] == "invalid_grant"
    assert driver.exchange(code, verifier).status_code == 200


def test_redirect_uri_at_the_token_endpoint_must_be_the_same(driver: Driver) -> None:
    driver.register(redirect_uris=[APP_REDIRECT, "https://app.example/other"])
    code, verifier = driver.ehr_code()
    response = driver.exchange(code, verifier, redirect_uri="https://app.example/other")
    assert json_of(response)["error"] == "invalid_grant"


def test_expired_code_is_refused(driver: Driver) -> None:
    driver.register()
    with time_machine.travel(0, tick=False) as clock:
        clock.move_to("2030-01-01T09:00:00Z")
        code, verifier = driver.ehr_code()
        clock.shift(timedelta(seconds=61))
        response = driver.exchange(code, verifier)
    assert response.status_code == 400
    assert json_of(response)["error"] == "invalid_grant"
    assert "expired" in json_of(response)["error_description"]


def test_code_reuse_is_refused_and_revokes_what_the_code_issued(driver: Driver) -> None:
    driver.register()
    code, verifier = driver.ehr_code()
    first = driver.exchange(code, verifier)
    assert first.status_code == 200
    again = driver.exchange(code, verifier)
    assert again.status_code == 400
    assert json_of(again)["error"] == "invalid_grant"
    assert "already used" in json_of(again)["error_description"]
    # The tokens the code produced are revoked (RFC 6749 4.1.2 / OAuth security BCP).
    assert driver.fhir("GET", f"Patient/{PATIENT}", json_of(first)["access_token"]).status_code == 401
    refresh = driver.token(
        {"grant_type": "refresh_token", "refresh_token": json_of(first)["refresh_token"], "client_id": "app"}
    )
    assert json_of(refresh)["error"] == "invalid_grant"


def test_code_is_bound_to_its_client(driver: Driver) -> None:
    driver.register("app")
    driver.register("other-app")
    code, verifier = driver.ehr_code()
    response = driver.exchange(code, verifier, client_id="other-app")
    assert json_of(response)["error"] == "invalid_grant"


# -- refresh tokens ----------------------------------------------------------------------------


def test_refresh_rotates_and_reuse_of_a_rotated_token_revokes_the_grant(driver: Driver) -> None:
    driver.register()
    first = driver.ehr_launch_token()
    refreshed = driver.token(
        {"grant_type": "refresh_token", "refresh_token": first["refresh_token"], "client_id": "app"}
    )
    assert refreshed.status_code == 200
    second = json_of(refreshed)
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["patient"] == PATIENT
    assert driver.fhir("GET", f"Patient/{PATIENT}", second["access_token"]).status_code == 200

    reused = driver.token(
        {"grant_type": "refresh_token", "refresh_token": first["refresh_token"], "client_id": "app"}
    )
    assert reused.status_code == 400
    assert json_of(reused)["error"] == "invalid_grant"
    # Reuse means the refresh token leaked: everything issued under the grant stops working.
    assert driver.fhir("GET", f"Patient/{PATIENT}", second["access_token"]).status_code == 401
    latest = driver.token(
        {"grant_type": "refresh_token", "refresh_token": second["refresh_token"], "client_id": "app"}
    )
    assert json_of(latest)["error"] == "invalid_grant"


def test_refresh_may_narrow_but_not_widen_the_scope(driver: Driver) -> None:
    driver.register()
    first = driver.ehr_launch_token(scope="launch patient/*.rs offline_access")
    wider = driver.token(
        {
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": "app",
            "scope": "launch patient/*.cruds offline_access",
        }
    )
    assert json_of(wider)["error"] == "invalid_scope"
    narrower = driver.token(
        {
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": "app",
            "scope": "launch patient/*.rs offline_access",
        }
    )
    assert narrower.status_code == 200


def test_refresh_token_of_another_client_is_refused(driver: Driver) -> None:
    driver.register("app")
    driver.register("other-app")
    first = driver.ehr_launch_token()
    response = driver.token(
        {"grant_type": "refresh_token", "refresh_token": first["refresh_token"], "client_id": "other-app"}
    )
    assert json_of(response)["error"] == "invalid_grant"


# -- id_token ------------------------------------------------------------------------------------


def test_id_token_validates_against_the_published_jwks_and_names_the_practitioner(driver: Driver) -> None:
    driver.register()
    token = driver.ehr_launch_token(scope="launch openid fhirUser patient/*.rs", nonce="n-42")

    config = json_of(driver.http.get("/fhir/.well-known/openid-configuration"))
    assert config["issuer"] == FHIR
    assert config["id_token_signing_alg_values_supported"] == ["RS256"]
    jwks_path = config["jwks_uri"].removeprefix(BASE)
    keys = KeySet.import_key_set(json_of(driver.http.get(jwks_path)))
    id_token = jwt.decode(token["id_token"], keys, algorithms=["RS256"])
    claims = id_token.claims
    assert id_token.header["alg"] == "RS256"
    assert claims["iss"] == config["issuer"]
    assert claims["aud"] == "app"
    assert claims["sub"] == PRACTITIONER
    assert claims["fhirUser"] == f"{FHIR}/Practitioner/{PRACTITIONER}"
    assert claims["nonce"] == "n-42"
    assert claims["exp"] > claims["iat"]
    digest = hashlib.sha256(token["access_token"].encode()).digest()[:16]
    assert claims["at_hash"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    # And the practitioner it names exists on this server.
    assert driver.fhir("GET", f"Practitioner/{PRACTITIONER}", token["access_token"]).status_code in (200, 403)


def test_id_token_does_not_verify_with_another_key(driver: Driver, rs384_key: AppKey) -> None:
    driver.register()
    token = driver.ehr_launch_token(scope="launch openid fhirUser patient/*.rs")
    with pytest.raises(JoseError):
        jwt.decode(token["id_token"], rs384_key.key, algorithms=["RS256"])


def test_no_id_token_without_openid(driver: Driver) -> None:
    driver.register()
    token = driver.ehr_launch_token(scope="launch patient/*.rs")
    assert "id_token" not in token


def test_nonce_replay_is_refused(driver: Driver) -> None:
    driver.register()
    driver.ehr_code(scope="launch openid fhirUser patient/*.rs", nonce="same-nonce")
    response, _ = driver.ehr_authorize(scope="launch openid fhirUser patient/*.rs", nonce="same-nonce")
    assert redirect_params(response.headers["Location"])["error"] == "invalid_request"


# -- standalone launch ---------------------------------------------------------------------------


def _standalone(driver: Driver, scope: str, state: str = "st-1") -> tuple[str, str]:
    verifier, challenge = pkce_pair()
    response = driver.authorize(
        response_type="code",
        client_id="app",
        redirect_uri=APP_REDIRECT,
        scope=scope,
        state=state,
        aud=FHIR,
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_data(as_text=True), verifier


def _decide(driver: Driver, page: str, **choices: str) -> tuple[int, str]:
    found = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page)
    fields = {k: html.unescape(v) for k, v in found}
    fields.update(choices)
    response = driver.http.post("/oauth/authorize/decision", data=fields)
    return response.status_code, response.headers.get("Location", "")


def test_standalone_launch_shows_a_patient_picker_and_returns_the_chosen_patient(driver: Driver) -> None:
    driver.register()
    page, verifier = _standalone(driver, "launch/patient openid fhirUser patient/*.rs")
    assert "Alex Rivera" in page and "Jordan Blake" in page
    assert "SANDBOX EHR" in page
    status, location = _decide(
        driver, page, decision="approve", practitioner=PRACTITIONER, patient="sbx-patient-3"
    )
    assert status == 302
    params = redirect_params(location)
    assert params["state"] == "st-1"
    token = json_of(driver.exchange(params["code"], verifier))
    assert token["patient"] == "sbx-patient-3"
    assert token["need_patient_banner"] is True
    assert "encounter" not in token


def test_standalone_launch_can_be_denied(driver: Driver) -> None:
    driver.register()
    page, _ = _standalone(driver, "launch/patient patient/*.rs")
    status, location = _decide(driver, page, decision="deny")
    assert status == 302
    params = redirect_params(location)
    assert params["error"] == "access_denied"
    assert params["state"] == "st-1"


def test_standalone_launch_needs_a_patient_when_patient_scopes_are_asked(driver: Driver) -> None:
    driver.register()
    page, _ = _standalone(driver, "launch/patient patient/*.rs")
    status, location = _decide(driver, page, decision="approve", practitioner=PRACTITIONER)
    assert status == 400
    assert not location


def test_standalone_decision_needs_the_csrf_token(driver: Driver) -> None:
    driver.register()
    page, _ = _standalone(driver, "launch/patient patient/*.rs")
    status, location = _decide(
        driver, page, decision="approve", practitioner=PRACTITIONER, patient=PATIENT, csrf_token="forged"
    )
    assert status == 403
    assert not location


def test_launch_scope_without_a_launch_parameter_is_refused(driver: Driver) -> None:
    driver.register()
    _verifier, challenge = pkce_pair()
    response = driver.authorize(
        response_type="code",
        client_id="app",
        redirect_uri=APP_REDIRECT,
        scope="launch patient/*.rs",
        state="s",
        aud=FHIR,
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    assert redirect_params(response.headers["Location"])["error"] == "invalid_request"


# -- backend services: client_credentials with private_key_jwt -----------------------------------


@pytest.mark.parametrize("key_fixture", ["rs384_key", "es384_key"])
def test_client_credentials_with_private_key_jwt(
    driver: Driver, key_fixture: str, request: pytest.FixtureRequest
) -> None:
    key: AppKey = request.getfixturevalue(key_fixture)
    driver.register_backend(key, scopes=["system/Observation.cruds", "system/Patient.rs"])
    response = driver.token(
        key.client_credentials("backend", TOKEN_URL, "system/Observation.c system/Patient.rs system/Task.c")
    )
    assert response.status_code == 200, response.json
    body = json_of(response)
    assert body["scope"] == "system/Observation.c system/Patient.rs"
    assert 0 < body["expires_in"] <= 300
    assert "refresh_token" not in body and "patient" not in body
    assert response.headers["Cache-Control"] == "no-store"
    assert driver.fhir("GET", "Patient?_count=1", body["access_token"]).status_code == 200


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"alg": "RS256"}, "RS384 or ES384"),
        ({"lifetime": 3600}, "at most 5 minutes"),
        ({"lifetime": -120}, "expired"),
        ({"claims": {"aud": "https://other.example/token"}}, "aud must be the token URL"),
        ({"claims": {"aud": [TOKEN_URL, "https://other.example/token"]}}, "aud must be the token URL"),
        ({"claims": {"iss": "someone-else"}}, "iss and sub"),
        ({"claims": {"jti": None}}, "jti is required"),
        ({"header": {"kid": "unknown-kid"}}, "kid"),
        ({"header": {"jku": "https://evil.example/jwks.json"}}, "jku"),
    ],
)
def test_bad_client_assertions_are_refused(
    driver: Driver, rs384_key: AppKey, change: dict[str, Any], reason: str
) -> None:
    driver.register_backend(rs384_key)
    claims = change.get("claims")
    form = rs384_key.client_credentials(
        "backend",
        TOKEN_URL,
        "system/*.rs",
        alg=change.get("alg"),
        lifetime=change.get("lifetime", 240),
        header=change.get("header"),
        claims={k: v for k, v in claims.items() if v is not None} if isinstance(claims, dict) else None,
    )
    if isinstance(claims, dict) and claims.get("jti", "x") is None:
        form["client_assertion"] = _without_jti(rs384_key)
    response = driver.token(form)
    assert response.status_code in (400, 401), response.json
    assert json_of(response)["error"] == "invalid_client"
    assert reason in json_of(response)["error_description"]


def _without_jti(key: AppKey) -> str:
    now = int(time.time())
    claims = {"iss": "backend", "sub": "backend", "aud": TOKEN_URL, "exp": now + 200}
    return jwt.encode({"alg": key.alg, "kid": key.kid}, claims, key.key, algorithms=[key.alg])


def test_assertion_with_crit_header_is_refused(driver: Driver, rs384_key: AppKey) -> None:
    driver.register_backend(rs384_key)
    header = {"alg": "RS384", "typ": "JWT", "kid": rs384_key.kid, "crit": ["x-policy"], "x-policy": 1}
    form = {
        "grant_type": "client_credentials",
        "scope": "system/*.rs",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": rs384_key.signed(header, rs384_key.claims("backend", TOKEN_URL)),
    }
    response = driver.token(form)
    assert json_of(response)["error"] == "invalid_client"
    assert "crit" in json_of(response)["error_description"]
    # The same assertion without `crit` is accepted: the refusal is about the header, not the signature.
    header.pop("crit")
    header.pop("x-policy")
    form["client_assertion"] = rs384_key.signed(header, rs384_key.claims("backend", TOKEN_URL))
    assert driver.token(form).status_code == 200


def test_replayed_assertion_is_refused(driver: Driver, rs384_key: AppKey) -> None:
    driver.register_backend(rs384_key)
    form = rs384_key.client_credentials("backend", TOKEN_URL, "system/*.rs", jti="once")
    assert driver.token(form).status_code == 200
    again = driver.token(form)
    assert json_of(again)["error"] == "invalid_client"
    assert "replay" in json_of(again)["error_description"]


def _forged(header: dict[str, str], claims: dict[str, object], sign: bytes | None) -> str:
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(claims).encode())
    signature = b64(hmac.new(sign, signing_input, hashlib.sha256).digest()) if sign is not None else b""
    return (signing_input + b"." + signature).decode()


def test_alg_none_and_hs256_with_the_public_key_are_refused(driver: Driver, rs384_key: AppKey) -> None:
    driver.register_backend(rs384_key)
    claims = {
        "iss": "backend",
        "sub": "backend",
        "aud": TOKEN_URL,
        "exp": int(time.time()) + 100,
        "jti": "j1",
    }
    public_pem = rs384_key.key.as_pem(private=False)
    for assertion in (
        _forged({"alg": "none", "kid": rs384_key.kid}, claims, None),
        _forged({"alg": "HS256", "kid": rs384_key.kid}, claims, public_pem),
        _forged({"alg": "HS256", "kid": rs384_key.kid}, claims, json.dumps(rs384_key.jwk).encode()),
    ):
        form = {
            "grant_type": "client_credentials",
            "scope": "system/*.rs",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        }
        response = driver.token(form)
        assert response.status_code in (400, 401)
        assert json_of(response)["error"] == "invalid_client"


def test_embedded_jwk_header_is_refused(driver: Driver, rs384_key: AppKey, es384_key: AppKey) -> None:
    driver.register_backend(rs384_key)
    form = es384_key.client_credentials(
        "backend", TOKEN_URL, "system/*.rs", header={"kid": rs384_key.kid, "jwk": es384_key.jwk}
    )
    assert json_of(driver.token(form))["error"] == "invalid_client"


def test_client_credentials_needs_a_registered_system_scope(driver: Driver, rs384_key: AppKey) -> None:
    driver.register_backend(rs384_key, scopes=["system/Observation.c"])
    response = driver.token(rs384_key.client_credentials("backend", TOKEN_URL, "system/Patient.rs"))
    assert json_of(response)["error"] == "invalid_scope"
    response = driver.token(rs384_key.client_credentials("backend", TOKEN_URL, "patient/Observation.rs"))
    assert json_of(response)["error"] == "invalid_scope"


def test_public_clients_cannot_use_client_credentials(driver: Driver) -> None:
    driver.register()
    response = driver.token({"grant_type": "client_credentials", "client_id": "app", "scope": "system/*.rs"})
    assert json_of(response)["error"] == "invalid_client"


def test_unsupported_grant_type(driver: Driver) -> None:
    driver.register()
    response = driver.token({"grant_type": "password", "client_id": "app", "username": "u", "password": "p"})
    assert json_of(response)["error"] == "unsupported_grant_type"


@responses.activate
def test_jwks_url_is_fetched_and_a_rotated_key_is_picked_up(
    driver: Driver, rs384_key: AppKey, es384_key: AppKey
) -> None:
    jwks_url = "https://backend.example/.well-known/jwks.json"
    responses.get(jwks_url, json=rs384_key.jwks, headers={"Cache-Control": "max-age=3600"})
    driver.register_backend(rs384_key, jwks=None, jwks_url=jwks_url)
    assert driver.token(rs384_key.client_credentials("backend", TOKEN_URL, "system/*.rs")).status_code == 200
    assert driver.token(rs384_key.client_credentials("backend", TOKEN_URL, "system/*.rs")).status_code == 200
    assert len(responses.calls) == 1  # cached

    # The client rotates to a new key: an unknown kid makes the sandbox look again, once.
    responses.replace(responses.GET, jwks_url, json={"keys": [rs384_key.jwk, es384_key.jwk]})
    resolver = sandbox_of(driver.app).client_keys
    resolver.clock = lambda: time.monotonic() + 30  # the rotation happens a while after the last fetch
    response = driver.token(es384_key.client_credentials("backend", TOKEN_URL, "system/*.rs"))
    assert response.status_code == 200, response.json
    assert len(responses.calls) == 2
    # A kid that is nowhere makes no new fetch within ten seconds of the last one, however often tried.
    stranger = AppKey.ec()
    for _ in range(3):
        form = stranger.client_credentials("backend", TOKEN_URL, "system/*.rs")
        assert json_of(driver.token(form))["error"] == "invalid_client"
    assert len(responses.calls) == 2


def test_confidential_app_authenticates_at_the_token_endpoint(driver: Driver, rs384_key: AppKey) -> None:
    driver.register("conf-app", auth_method="private_key_jwt", jwks=rs384_key.jwks)
    code, verifier = driver.ehr_code(client_id="conf-app")
    # Without its assertion a confidential app gets nothing, even with a valid code and verifier.
    assert json_of(driver.exchange(code, verifier, client_id="conf-app"))["error"] == "invalid_client"
    response = driver.exchange(
        code,
        verifier,
        client_id=None,
        client_assertion_type=ASSERTION_TYPE,
        client_assertion=rs384_key.assertion("conf-app", TOKEN_URL),
    )
    assert response.status_code == 200, response.json
    assert json_of(response)["patient"] == PATIENT


# -- discovery -----------------------------------------------------------------------------------


def test_smart_configuration_advertises_what_the_server_enforces(driver: Driver) -> None:
    response = driver.http.get("/fhir/.well-known/smart-configuration")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    config = json_of(response)
    assert config["authorization_endpoint"] == f"{BASE}/oauth/authorize"
    assert config["token_endpoint"] == TOKEN_URL
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert config["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert {"launch-ehr", "launch-standalone", "client-confidential-asymmetric", "sso-openid-connect"} <= set(
        config["capabilities"]
    )
    assert {"permission-v1", "permission-v2", "context-ehr-patient"} <= set(config["capabilities"])
