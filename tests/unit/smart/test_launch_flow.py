"""The SMART launch as a browser and an EHR see it: /launch, authorize, /callback, the dashboard.

Hostile cases are named after the security checklist's catalogue (L launch, C callback, D quirky EHR,
I id_token, S session). Each asserts what the browser got, that nothing was sent to an issuer that
is not registered (``responses`` records every request), and that no token reached the browser.
"""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import responses
import time_machine
from flask import Flask
from flask.testing import FlaskClient
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey
from sqlalchemy import select

from fhir_bridge import services
from fhir_bridge.ops.logs import JsonFormatter
from fhir_bridge.storage.models import SmartLaunch, Tenant
from tests.conftest import AppFactory
from tests.support.fake_ehr import BASE, CLIENT_ID, JWKS, TOKEN, FakeEhr, observation
from tests.support.http import json_of
from tests.unit.smart.conftest import (
    EHR_ORIGIN,
    PUBLIC,
    add_tenant,
    calls,
    finish,
    full_launch,
    launch,
    no_tokens_in,
    start,
)

# -- L: launch --------------------------------------------------------------------------------


def test_ehr_launch_redirects_to_the_ehr_with_pkce_state_and_aud(browser: FlaskClient, ehr: FakeEhr) -> None:
    params = start(browser, ehr)
    assert params["response_type"] == "code"
    assert params["client_id"] == CLIENT_ID
    assert params["redirect_uri"] == f"{PUBLIC}/callback/t1"
    assert params["aud"] == BASE
    assert params["launch"] == "abc123"
    assert params["code_challenge_method"] == "S256"
    assert len(params["code_challenge"]) == 43
    assert len(params["state"]) >= 43  # 256 bits, url-safe base64
    scopes = params["scope"].split()
    assert {"launch", "openid", "fhirUser", "patient/Observation.rs"} <= set(scopes)


@pytest.mark.parametrize(
    "iss",
    [
        "https://evil.example/fhir",  # L1
        "http://ehr.example.com/fhir",  # L2
        "https://ehr.example.com@evil.example/fhir",  # L3
        "https://ehr.example.com.evil.example/fhir",
        "https://evil.example/?u=https://ehr.example.com/fhir",
        "https://ehr.example.com/fhir/../../evil",
        "https://ehr.example.com/fhir/./",
        "http://169.254.169.254/latest/meta-data/",  # L4
        "http://localhost:5432",
        "file:///etc/passwd",
        "gopher://ehr.example.com/fhir",
        "https://[::1]/fhir",
        "https://ehr.example.com/%2566hir",  # L5: a percent-encoded path is refused, not decoded
        "https://ehr.example.com/fhir/extra",
        "https://ehr.example.com",
    ],
)
def test_launch_refuses_an_unregistered_issuer_without_any_network_request(
    browser: FlaskClient, ehr: FakeEhr, iss: str
) -> None:
    response = launch(browser, f"iss={iss}&launch=abc")
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert calls(ehr) == []
    assert "evil" not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    "iss",
    ["HTTPS://EHR.EXAMPLE.COM/fhir", "https://ehr.example.com/fhir/", "https://ehr.example.com:443/fhir"],
)
def test_launch_accepts_spellings_of_the_registered_base_that_normalise_to_it(
    browser: FlaskClient, ehr: FakeEhr, iss: str
) -> None:
    params = start(browser, ehr, f"iss={iss}&launch=abc")
    assert params["aud"] == BASE  # the registered base, never the spelling the EHR sent


@pytest.mark.parametrize(
    ("query", "code"),
    [
        (f"iss={BASE}", "missing-launch"),  # L6
        (f"iss={BASE}&launch=", "missing-launch"),
        ("launch=abc", "missing-iss"),
        (f"iss={BASE}&launch={'x' * 3000}", "invalid-launch"),  # L7
        (f"iss={BASE}&launch=a%0D%0ASet-Cookie:x", "invalid-launch"),
        (f"iss={BASE}&launch=%3Cscript%3Ealert(1)%3C/script%3E", "invalid-launch"),
        (f"iss={BASE}&launch=a%00b", "invalid-launch"),
        (f"iss={BASE}&launch=%FF%FE", "invalid-launch"),
        (f"iss={BASE}&iss=https://evil.example/fhir&launch=abc", "ambiguous"),  # L8
        (f"iss={BASE}&launch=a&launch=b", "ambiguous"),
    ],
)
def test_launch_refuses_missing_ambiguous_or_hostile_parameters(
    browser: FlaskClient, ehr: FakeEhr, query: str, code: str
) -> None:
    response = launch(browser, query)
    assert response.status_code == 400
    body = response.get_data(as_text=True)
    assert code in body
    assert "<script>alert" not in body and "Set-Cookie:x" not in body
    assert calls(ehr) == []


def test_launch_ignores_redirect_targets_given_by_the_caller(browser: FlaskClient, ehr: FakeEhr) -> None:
    params = start(
        browser,
        ehr,
        f"iss={BASE}&launch=abc&next=https://evil.example&redirect_uri=https://evil.example/cb"
        "&return_to=https://evil.example",
    )  # L9
    assert params["redirect_uri"] == f"{PUBLIC}/callback/t1"


def test_every_launch_gets_a_fresh_state_and_verifier(browser: FlaskClient, ehr: FakeEhr) -> None:
    first, second = start(browser, ehr), start(browser, ehr)  # L10
    assert first["state"] != second["state"]
    assert first["code_challenge"] != second["code_challenge"]
    assert first["nonce"] != second["nonce"]


@pytest.mark.parametrize("method", ["post", "put", "delete"])
def test_launch_only_answers_get(browser: FlaskClient, ehr: FakeEhr, method: str) -> None:
    response = getattr(browser, method)(f"/launch?iss={BASE}&launch=abc", base_url=PUBLIC)  # L11
    assert response.status_code == 405
    assert calls(ehr) == []


def test_standalone_launch_offers_registered_ehrs_only_and_asks_for_a_patient(
    browser: FlaskClient, ehr: FakeEhr
) -> None:
    page = browser.get("/launch/standalone", base_url=PUBLIC)  # L12
    body = page.get_data(as_text=True)
    assert page.status_code == 200
    assert "Hospital t1" in body
    assert "<input" not in body  # no free-text FHIR URL
    assert calls(ehr) == []
    assert browser.get("/launch/standalone?tenant=nope", base_url=PUBLIC).status_code == 400
    response = browser.get("/launch/standalone?tenant=t1", base_url=PUBLIC)
    params = ehr.authorize(response.headers["Location"])
    assert "launch" not in params
    assert "launch/patient" in params["scope"].split()
    assert "launch" not in params["scope"].split()


def test_two_launches_in_one_browser_keep_their_own_patients(browser: FlaskClient, ehr: FakeEhr) -> None:
    ehr.observations = [observation("44261-6", 12, "2026-01-05T10:00:00+01:00", patient="p1")]
    first = full_launch(browser, ehr)
    ehr.patient = "p2"
    second = full_launch(browser, ehr)  # L13: another patient in another tab
    one = browser.get(f"/app/{first}/api/summary", base_url=PUBLIC)
    two = browser.get(f"/app/{second}/api/summary", base_url=PUBLIC)
    assert one.status_code == two.status_code == 200
    assert json_of(one)["series"]["phq9"]["v"] == [12]
    assert json_of(two)["series"] == {}  # p1's result never shows for p2
    assert json_of(two)["dropped"]["other_patient"] == 1
    observation_searches = [parse_qs(urlsplit(u).query) for u in calls(ehr) if "/Observation" in u]
    assert [q["patient"] for q in observation_searches] == [["p1"], ["p2"]]


# -- C: callback ------------------------------------------------------------------------------


def test_successful_callback_redirects_to_a_clean_url_with_a_new_session_handle(
    browser: FlaskClient, ehr: FakeEhr
) -> None:
    params = start(browser, ehr)
    before = browser.get_cookie("__Host-fhir-bridge", domain="bridge.example.org")
    assert before is not None
    response = finish(browser, params, extra="&next=https://evil.example")  # C12
    assert response.status_code == 303  # C11
    location = response.headers["Location"]
    assert "code" not in location and "state" not in location and "evil" not in location
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["Cache-Control"] == "no-store"
    after = browser.get_cookie("__Host-fhir-bridge", domain="bridge.example.org")
    assert after is not None and after.value != before.value  # S5
    token_form = ehr.token_requests[0]
    assert token_form["grant_type"] == ["authorization_code"]
    assert token_form["code"] == ["the-code"]
    assert token_form["redirect_uri"] == [f"{PUBLIC}/callback/t1"]
    assert token_form["client_id"] == [CLIENT_ID]
    assert len(token_form["code_verifier"][0]) >= 43
    no_tokens_in(ehr, response)


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("code=abc", 400, "missing-state"),  # C1
        ("code=abc&state=forged-state-value", 400, "unknown-state"),  # C2
    ],
)
def test_callback_without_a_known_state_sends_no_token_request(
    browser: FlaskClient, ehr: FakeEhr, query: str, status: int, code: str
) -> None:
    start(browser, ehr)
    response = browser.get(f"/callback/t1?{query}", base_url=PUBLIC)
    assert response.status_code == status
    assert code in response.get_data(as_text=True)
    assert ehr.token_requests == []


def test_callback_refuses_a_state_started_in_another_browser(smart: Flask, ehr: FakeEhr) -> None:
    attacker, victim = smart.test_client(), smart.test_client()
    params = start(attacker, ehr)  # C3: the attacker's own flow, replayed in the victim's browser
    victim.get("/launch/standalone", base_url=PUBLIC)
    response = finish(victim, params)
    assert response.status_code == 403
    assert ehr.token_requests == []


def test_callback_state_is_single_use(browser: FlaskClient, ehr: FakeEhr) -> None:
    params = start(browser, ehr)
    assert finish(browser, params).status_code == 303
    replay = finish(browser, params)  # C4
    assert replay.status_code == 400
    assert len(ehr.token_requests) == 1


def test_callback_state_expires_after_ten_minutes(browser: FlaskClient, ehr: FakeEhr) -> None:
    params = start(browser, ehr)
    with time_machine.travel(time.time() + 601):
        response = finish(browser, params)  # C5
    assert response.status_code == 400
    assert "state-expired" in response.get_data(as_text=True)
    assert ehr.token_requests == []


@pytest.mark.parametrize("code", ["", "x" * 10_000, "a%00b", "a%0Ab", "%C3%A9t%C3%A9"])
def test_callback_refuses_missing_or_odd_codes(browser: FlaskClient, ehr: FakeEhr, code: str) -> None:
    params = start(browser, ehr)
    response = browser.get(f"/callback/t1?state={params['state']}&code={code}", base_url=PUBLIC)  # C6
    assert response.status_code == 400
    assert ehr.token_requests == []


def test_callback_shows_the_ehrs_error_as_a_readable_escaped_page(browser: FlaskClient, ehr: FakeEhr) -> None:
    params = start(browser, ehr)
    response = browser.get(
        f"/callback/t1?state={params['state']}&code=abc&error=access_denied"  # C7 + C8
        "&error_description=%3Cscript%3Ealert(1)%3C/script%3E",
        base_url=PUBLIC,
    )
    body = response.get_data(as_text=True)
    assert response.status_code == 400
    assert "Access was not granted" in body
    assert "<script>alert" not in body and "alert(1)" not in body
    assert ehr.token_requests == []
    assert response.headers["Content-Type"].startswith("text/html")


def test_callback_refuses_an_authorization_server_issuer_that_is_not_the_tenants(
    browser: FlaskClient, ehr: FakeEhr
) -> None:
    params = start(browser, ehr)
    response = finish(browser, params, extra="&iss=https://evil.example/oauth")  # C9
    assert response.status_code == 400
    assert ehr.token_requests == []


def test_callback_refuses_a_flow_of_another_tenant(smart: Flask, browser: FlaskClient, ehr: FakeEhr) -> None:
    add_tenant(smart, "t2", fhir_base_url="https://other-ehr.example.com/fhir")
    params = start(browser, ehr)
    response = finish(browser, params, tenant="t2")  # C10: tenant A's state at tenant B's redirect URI
    assert response.status_code == 400
    assert "tenant-mismatch" in response.get_data(as_text=True)
    assert ehr.token_requests == []


# -- D: a quirky or hostile EHR ---------------------------------------------------------------


@pytest.mark.parametrize(
    "discovery",
    [
        {"status": 500, "body": b"oops", "content_type": "text/plain"},
        {"status": 200, "body": b"<html>hello</html>", "content_type": "text/html"},
        {"status": 302, "body": b"", "headers": {"Location": "https://evil.example/x"}},
        {"status": 200, "body": b'{"a": "' + b"x" * 400_000 + b'"}', "content_type": "application/json"},
        {"status": 200, "body": b"[1, 2]", "content_type": "application/json"},
    ],
)
def test_unusable_discovery_fails_closed(
    browser: FlaskClient, ehr_key: RSAKey, discovery: dict[str, Any]
) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:  # D1
        rsps.add(responses.GET, f"{BASE}/.well-known/smart-configuration", **discovery)
        rsps.add(
            responses.GET, "https://evil.example/x", json={"authorization_endpoint": "https://evil.example"}
        )
        response = launch(browser)
        assert response.status_code == 502
        assert "Location" not in response.headers
        assert [c.request.url for c in rsps.calls] == [f"{BASE}/.well-known/smart-configuration"]


@pytest.mark.parametrize("methods", [None, ["plain"], []])
def test_pkce_s256_is_sent_whatever_discovery_says(browser: FlaskClient, ehr: FakeEhr, methods: Any) -> None:
    ehr.discovery = ehr.default_discovery()  # D2
    if methods is None:
        del ehr.discovery["code_challenge_methods_supported"]
    else:
        ehr.discovery["code_challenge_methods_supported"] = methods
    ehr.rsps.replace(responses.GET, f"{BASE}/.well-known/smart-configuration", json=ehr.discovery)
    params = start(browser, ehr)
    assert params["code_challenge_method"] == "S256"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("token_endpoint", "https://evil.example/token"),
        ("authorization_endpoint", "https://evil.example/authorize"),
        ("token_endpoint", "http://ehr.example.com/oauth/token"),
    ],
)
def test_discovery_that_disagrees_with_the_pins_is_refused(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr, field: str, value: str
) -> None:
    with smart.app_context(), services.current().db.transaction() as session:  # D3
        tenant = session.get(Tenant, "t1")
        assert tenant is not None
        tenant.token_url, tenant.authorize_url = TOKEN, "https://ehr.example.com/oauth/authorize"
    discovery = ehr.default_discovery() | {field: value}
    ehr.rsps.replace(responses.GET, f"{BASE}/.well-known/smart-configuration", json=discovery)
    response = launch(browser)
    assert response.status_code == 502
    assert "Location" not in response.headers


def test_relative_discovery_endpoints_resolve_against_the_fhir_base(
    browser: FlaskClient, ehr: FakeEhr
) -> None:
    discovery = ehr.default_discovery() | {
        "authorization_endpoint": "../oauth/authorize",
        "token_endpoint": "/oauth/token",
    }
    ehr.rsps.replace(responses.GET, f"{BASE}/.well-known/smart-configuration", json=discovery)
    response = launch(browser)  # D4
    assert response.headers["Location"].startswith("https://ehr.example.com/oauth/authorize?")
    assert finish(browser, ehr.authorize(response.headers["Location"])).status_code == 303


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"token_type": "Bearer", "patient": "p1"}, 502),  # D5: no access token
        ({"access_token": "at-x-secret", "token_type": "mac", "patient": "p1"}, 502),
        ({"access_token": "at-x-secret", "token_type": "DPoP", "patient": "p1"}, 502),
        ({"access_token": "at-x-secret", "token_type": "Bearer"}, 400),  # D10: no patient
        ({"access_token": "at-x-secret", "token_type": "Bearer", "patient": "../Patient/1"}, 502),  # D11
        ({"access_token": "at-x-secret", "token_type": "Bearer", "patient": "123?_format=xml"}, 502),
        ({"access_token": "at-x-secret", "token_type": "Bearer", "patient": "123/_history"}, 502),
        ({"access_token": "at-x-secret", "token_type": "Bearer", "patient": "p" * 200}, 502),
        ({"access_token": "at-x-secret", "token_type": "Bearer", "patient": "pätient"}, 502),
        (
            {
                "access_token": "at-x-secret",
                "token_type": "Bearer",
                "patient": "p1",
                "fhirContext": [{"role": ""}],
            },
            502,
        ),  # D13
    ],
)
def test_unusable_token_responses_create_no_session(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr, body: dict[str, Any], status: int
) -> None:
    ehr.token_body = body | {"scope": "launch patient/Observation.rs"}
    params = start(browser, ehr)
    response = finish(browser, params)
    assert response.status_code == status
    with smart.app_context(), services.current().db.transaction() as session:
        assert session.scalars(select(SmartLaunch)).all() == []
    assert "at-x-secret" not in response.get_data(as_text=True)


def test_lenient_but_safe_reading_of_an_odd_token_response(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr
) -> None:
    ehr.token_body = {
        "access_token": "at-odd-secret",
        "token_type": "bearer",  # D6
        "expires_in": "1e12",  # D7
        "patient": "p1",  # D12: no encounter
        "need_patient_banner": "false",  # D15: not a JSON false
        "intent": "something-new",  # D16
        "scope": "launch patient/*.cruds",  # D9
        "authorization_details": [{"locations": ["https://evil.example/fhir"]}],  # D17
        "__proto__": {"admin": True},  # D20
        "client_id": "someone-else",
    }
    launch_id = full_launch(browser, ehr)
    with smart.app_context(), services.current().db.transaction() as session:
        row = session.get(SmartLaunch, launch_id)
        assert row is not None
        assert row.need_patient_banner is True
        assert row.encounter_id is None
        assert (row.access_expires_at - row.created_at).total_seconds() <= 300
        assert b"at-odd-secret" not in row.access_token_enc
    summary = browser.get(f"/app/{launch_id}/api/summary", base_url=PUBLIC)
    assert summary.status_code == 200
    assert not any("evil.example" in url for url in calls(ehr))


def test_narrower_scope_degrades_with_a_clear_message(browser: FlaskClient, ehr: FakeEhr) -> None:
    ehr.scope = "launch patient/Patient.rs"  # D8: no observations granted, no openid
    launch_id = full_launch(browser, ehr)
    summary = json_of(browser.get(f"/app/{launch_id}/api/summary", base_url=PUBLIC))
    assert [p["code"] for p in summary["problems"]] == ["not-permitted"]
    assert not any("/Observation" in url for url in calls(ehr))


def test_expired_or_reused_code_asks_to_relaunch(browser: FlaskClient, ehr: FakeEhr) -> None:
    ehr.token_status = 400  # D19: invalid_grant
    response = finish(browser, start(browser, ehr))
    body = response.get_data(as_text=True)
    assert response.status_code == 400
    assert "Open the app again from the patient" in body
    assert "<b>nope</b>" not in body
    assert len(ehr.token_requests) == 1  # no retry loop


def test_refresh_tokens_are_stored_encrypted_only(smart: Flask, browser: FlaskClient, ehr: FakeEhr) -> None:
    launch_id = full_launch(browser, ehr)  # D18
    with smart.app_context(), services.current().db.transaction() as session:
        row = session.get(SmartLaunch, launch_id)
        assert row is not None and row.refresh_token_enc is not None
        cipher = services.current().cipher
        assert cipher.decrypt(row.refresh_token_enc).decode().startswith("rt-")
        assert b"rt-" not in row.refresh_token_enc


# -- I: id_token ------------------------------------------------------------------------------


def _unsigned(claims: dict[str, Any]) -> str:
    import base64
    import json

    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none'})}.{b64(claims)}."


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("alg-none", "bad-alg"),  # I1
        ("hs256", "bad-alg"),  # I2
        ("wrong-iss", "wrong-issuer"),  # I3
        ("wrong-aud", "wrong-audience"),  # I4
        ("multi-aud-no-azp", "wrong-audience"),
        ("expired", "expired"),  # I5
        ("future-iat", "bad-iat"),
        ("nonce", "bad-nonce"),  # I6
        ("unknown-kid", "unknown-key"),  # I7
        ("foreign-fhir-user", "foreign-fhir-user"),  # I8
        ("organization", "bad-fhir-user"),  # I9
        ("dotdot", "bad-fhir-user"),
        ("jku", "bad-header"),
    ],
)
def test_id_token_that_does_not_prove_the_user_ends_the_launch(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr, case: str, code: str
) -> None:
    now = int(time.time())
    if case == "alg-none":
        ehr.id_token_override = _unsigned(
            {"iss": "https://ehr.example.com/oauth", "sub": "u", "aud": CLIENT_ID, "exp": now + 60}
        )
    elif case == "hs256":
        secret = OctKey.import_key(b"k" * 32)
        ehr.id_token_override = jwt.encode(
            {"alg": "HS256"},
            {"iss": "https://ehr.example.com/oauth", "sub": "u", "aud": CLIENT_ID, "exp": now + 60},
            secret,
        )
    elif case == "wrong-iss":
        ehr.id_token_claims = {"iss": "https://evil.example"}
    elif case == "wrong-aud":
        ehr.id_token_claims = {"aud": "another-app"}
    elif case == "multi-aud-no-azp":
        ehr.id_token_claims = {"aud": [CLIENT_ID, "another-app"]}
    elif case == "expired":
        ehr.id_token_claims = {"exp": now - 3600}
    elif case == "future-iat":
        ehr.id_token_claims = {"iat": now + 3600}
    elif case == "nonce":
        ehr.id_token_claims = {"nonce": "not-the-one"}
    elif case == "unknown-kid":
        ehr.id_token_header = {"kid": "some-other-key"}
    elif case == "foreign-fhir-user":
        ehr.fhir_user = "https://evil.example/fhir/Practitioner/1"
    elif case == "organization":
        ehr.fhir_user = "Organization/1"
    elif case == "dotdot":
        ehr.fhir_user = "Practitioner/../Patient/2"
    elif case == "jku":
        ehr.id_token_header = {"jku": "https://evil.example/jwks"}
    response = finish(browser, start(browser, ehr))
    assert response.status_code == 400
    assert code in response.get_data(as_text=True)
    with smart.app_context(), services.current().db.transaction() as session:
        assert session.scalars(select(SmartLaunch)).all() == []
    jwks_fetches = [u for u in calls(ehr) if u == JWKS]
    if case in {"wrong-iss", "alg-none", "hs256", "jku"}:
        assert jwks_fetches == []  # keys are only fetched for the pinned issuer
    if case == "unknown-kid":
        assert len(jwks_fetches) == 2  # one forced reload, then refuse
    assert not any("evil.example" in u for u in calls(ehr))


def test_identity_is_the_tenant_issuer_and_subject(smart: Flask, browser: FlaskClient, ehr: FakeEhr) -> None:
    launch_id = full_launch(browser, ehr)  # I10: the same sub at another tenant is another identity
    with smart.app_context(), services.current().db.transaction() as session:
        row = session.get(SmartLaunch, launch_id)
        assert row is not None
        assert row.user_key == "https://ehr.example.com/oauth|user-1"
        assert row.fhir_user == "Practitioner/dr1"


# -- private_key_jwt --------------------------------------------------------------------------


def test_confidential_tenant_authenticates_with_a_fresh_short_lived_assertion(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr
) -> None:
    with smart.app_context(), services.current().db.transaction() as session:
        tenant = session.get(Tenant, "t1")
        assert tenant is not None
        tenant.smart_client_auth = "private_key_jwt"
    full_launch(browser, ehr)
    full_launch(browser, ehr)
    with smart.app_context():
        keys = KeySet.import_key_set({"keys": services.current().keyring.jwks()["keys"]})
    jtis = set()
    for form in ehr.token_requests:
        assert "client_id" not in form  # A26: confidential clients authenticate instead
        assert form["client_assertion_type"] == ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"]
        token = jwt.decode(form["client_assertion"][0], keys, algorithms=["RS384", "ES384"])
        claims = token.claims
        assert token.header["kid"] and token.header["typ"] == "JWT"
        assert claims["iss"] == claims["sub"] == CLIENT_ID
        assert claims["aud"] == TOKEN
        assert claims["exp"] - claims["iat"] <= 300
        jtis.add(claims["jti"])
    assert len(jtis) == 2


# -- S: session, headers, cookies -------------------------------------------------------------


def test_dashboard_headers_allow_only_the_tenants_ehr_to_frame_it(browser: FlaskClient, ehr: FakeEhr) -> None:
    launch_id = full_launch(browser, ehr)
    page = browser.get(f"/app/{launch_id}/", base_url=PUBLIC)
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce and f'nonce="{nonce.group(1)}"' in page.get_data(as_text=True)  # S1
    assert f"frame-ancestors {EHR_ORIGIN}" in csp  # S2
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["Strict-Transport-Security"].startswith("max-age=")
    assert (
        re.search(r"""(src|href)=["']https?://""", page.get_data(as_text=True)) is None
    )  # nothing third-party
    no_tokens_in(ehr, page)


def test_pages_before_a_tenant_is_known_cannot_be_framed(browser: FlaskClient, ehr: FakeEhr) -> None:
    response = launch(browser, "iss=https://evil.example/fhir&launch=abc")
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_session_cookie_is_host_only_secure_partitioned_and_holds_no_token(
    browser: FlaskClient, ehr: FakeEhr
) -> None:
    response = finish(browser, start(browser, ehr))
    cookie = response.headers["Set-Cookie"]  # S3
    assert cookie.startswith("__Host-fhir-bridge=")
    for attribute in ("Secure", "HttpOnly", "SameSite=None", "Partitioned", "Path=/"):
        assert attribute in cookie
    assert "Domain" not in cookie
    no_tokens_in(ehr, response)


def test_state_changing_requests_need_the_pages_csrf_token(
    smart: Flask, browser: FlaskClient, ehr: FakeEhr
) -> None:
    launch_id = full_launch(browser, ehr)
    url = f"/app/{launch_id}/api/follow-up"
    body = {"reason": "no-response", "request_id": "req-12345678"}
    assert browser.post(url, json=body, base_url=PUBLIC).status_code == 403  # S4
    page = browser.get(f"/app/{launch_id}/", base_url=PUBLIC).get_data(as_text=True)
    csrf = re.search(r'"csrf": "([0-9a-f]+)"', page)
    assert csrf
    headers = {"X-CSRF-Token": csrf.group(1)}
    foreign = browser.post(
        url, json=body, base_url=PUBLIC, headers=headers | {"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    ok = browser.post(url, json=body, base_url=PUBLIC, headers=headers | {"Origin": PUBLIC})
    assert ok.status_code == 202


def test_a_launch_id_is_useless_in_another_browser(smart: Flask, browser: FlaskClient, ehr: FakeEhr) -> None:
    launch_id = full_launch(browser, ehr)
    other = smart.test_client()
    for path in (f"/app/{launch_id}/", f"/app/{launch_id}/api/summary"):
        assert other.get(path, base_url=PUBLIC).status_code == 404


def test_no_token_code_or_patient_name_reaches_the_logs(
    browser: FlaskClient, ehr: FakeEhr, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    launch_id = full_launch(browser, ehr)
    browser.get(f"/app/{launch_id}/api/summary", base_url=PUBLIC)
    formatter = JsonFormatter()
    logs = "\n".join(formatter.format(record) for record in caplog.records)  # S7, as the log would print
    assert "smart launch completed" in logs
    for secret in [*ehr.issued, "the-code", "Rivera", "abc123", launch_id]:
        assert secret not in logs


def test_plain_http_is_refused_unless_the_loopback_exception_is_on(
    make_app: AppFactory, ehr: FakeEhr
) -> None:
    app = make_app(PUBLIC_URL="http://bridge.example.org")
    add_tenant(app)
    response = app.test_client().get(f"/launch?iss={BASE}&launch=abc")
    assert response.status_code == 400
    assert "insecure-deployment" in response.get_data(as_text=True)
    assert calls(ehr) == []
