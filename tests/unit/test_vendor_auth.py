"""Vendor authentication at our token endpoint: SMART Backend Services rules, hostile assertions (V1-V20)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import responses
from flask import Flask
from joserfc import jwt

from fhir_bridge import services
from fhir_bridge.storage.models import UsedAssertion
from tests.conftest import AppFactory
from tests.support.http import json_of
from tests.support.openapi import assert_matches_spec
from tests.support.vendor import Vendor, public_jwks, register, vendor_key

JWKS_URL = "https://keys.vendor.example/jwks.json"


@pytest.fixture
def app(make_app: AppFactory) -> Flask:
    return make_app(JWKS_FETCH_ALLOWED_HOSTS="keys.vendor.example")


@pytest.fixture
def vendor(app: Flask) -> Vendor:
    return register(app, "acme-mood")


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _invalid_client(response: Any, fragment: str = "") -> None:
    assert_matches_spec(response, "POST", "/oauth/token")
    assert response.status_code in (400, 401), response.json
    assert response.json["error"] == "invalid_client", response.json
    assert fragment.lower() in response.json["error_description"].lower(), response.json
    assert response.headers["Cache-Control"] == "no-store"


def _jtis(app: Flask) -> int:
    with services.from_app(app).db.sessions() as session:
        return session.query(UsedAssertion).count()


# -- success ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_signed_assertion_gets_a_short_lived_token_without_refresh(app: Flask, alg: str) -> None:
    vendor = register(app, f"v-{alg.lower()}", alg=alg)
    response = vendor.token_request(scope="records.write enrollments")
    assert response.status_code == 200, response.json
    assert_matches_spec(response, "POST", "/oauth/token")
    body = response.json
    assert body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= 300
    assert "refresh_token" not in body
    assert body["scope"] == "records.write enrollments"
    # V16: token responses are never cached
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"
    claims = jwt.decode(
        body["access_token"], services.from_app(app).keyring.signing_key().key, algorithms=["RS384", "ES384"]
    ).claims
    assert claims["sub"] == vendor.client_id
    assert claims["exp"] - claims["iat"] == body["expires_in"]


def test_discovery_advertises_what_the_token_endpoint_accepts(client: Any) -> None:
    response = client.get("/.well-known/smart-configuration")
    assert_matches_spec(response, "GET", "/.well-known/smart-configuration")
    config = response.json
    assert config["token_endpoint"] == "http://127.0.0.1:8080/oauth/token"
    assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert set(config["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    assert config["grant_types_supported"] == ["client_credentials"]
    assert "client-confidential-asymmetric" in config["capabilities"]


def test_public_url_drives_the_audience(make_app: AppFactory) -> None:
    app = make_app(PUBLIC_URL="https://bridge.hospital.example")
    vendor = register(app)
    assert vendor.token_request().status_code == 200
    wrong = vendor.assertion(claims={"aud": "http://127.0.0.1:8080/oauth/token"})
    _invalid_client(vendor.token_request(wrong), "aud")


# -- V1-V4: algorithms and embedded keys -----------------------------------------------------------


def test_v1_alg_none_is_refused(vendor: Vendor) -> None:
    now = int(time.time())
    claims = {
        "iss": vendor.client_id,
        "sub": vendor.client_id,
        "aud": vendor.token_url,
        "exp": now + 60,
        "jti": "n1",
    }
    unsigned = f"{_b64({'alg': 'none', 'kid': vendor.key.kid})}.{_b64(claims)}."
    _invalid_client(vendor.token_request(unsigned))


def test_v2_hs256_signed_with_the_public_key_is_refused(vendor: Vendor) -> None:
    import hashlib
    import hmac

    now = int(time.time())
    claims = {
        "iss": vendor.client_id,
        "sub": vendor.client_id,
        "aud": vendor.token_url,
        "exp": now + 60,
        "jti": "h",
    }
    signing_input = f"{_b64({'alg': 'HS256', 'kid': vendor.key.kid})}.{_b64(claims)}"
    mac = hmac.new(vendor.key.as_pem(private=False), signing_input.encode(), hashlib.sha256).digest()
    forged = signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    _invalid_client(vendor.token_request(forged), "RS384 or ES384")


def test_v3_rs256_is_refused_and_rs384_accepted(vendor: Vendor) -> None:
    _invalid_client(vendor.token_request(vendor.assertion(alg="RS256")), "RS384 or ES384")
    assert vendor.token_request(vendor.assertion(alg="RS384")).status_code == 200


def test_v4_embedded_jwk_header_is_refused(app: Flask) -> None:
    vendor = register(app, "ec-vendor", alg="ES384")
    attacker = vendor_key("ES384", "attacker")
    forged = vendor.assertion(key=attacker, header={"jwk": attacker.as_dict(private=False)})
    _invalid_client(vendor.token_request(forged), "jwk")


# -- V5-V7: key resolution ---------------------------------------------------------------------


@responses.activate
def test_v5_foreign_jku_is_refused_without_fetching(vendor: Vendor) -> None:
    forged = vendor.assertion(header={"jku": "https://evil.example/jwks.json"})
    _invalid_client(vendor.token_request(forged), "jku")
    assert len(responses.calls) == 0


def test_v6_unknown_kid_is_refused(vendor: Vendor) -> None:
    _invalid_client(vendor.token_request(vendor.assertion(header={"kid": "nope"})), "no registered key")


def test_v7_ec_key_for_rs384_is_refused(app: Flask) -> None:
    ec = vendor_key("ES384", "mixed")
    vendor = register(app, "mixed", key=ec, alg="ES384")
    # The header claims RS384 but names the EC key: no key of the right type matches.
    forged = vendor.assertion(alg="ES384", header={"alg": "ES384"})
    assert vendor.token_request(forged).status_code == 200
    rs = vendor_key("RS384", "mixed-rs")
    lying = vendor.assertion(key=rs, alg="RS384", header={"kid": ec.kid})
    _invalid_client(vendor.token_request(lying), "key type RSA")


def test_v7_duplicate_kid_is_refused_at_registration(app: Flask) -> None:
    from fhir_bridge.errors import BadRequest

    a, b = vendor_key("RS384", "dup-a"), vendor_key("RS384", "dup-b")
    jwks = public_jwks(a, b)
    jwks["keys"][1]["kid"] = jwks["keys"][0]["kid"]
    with pytest.raises(BadRequest, match="more than one"):
        register(app, "dup", key=a, jwks=jwks)


# -- V8: expiry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "drop", "fragment"),
    [
        ({}, ("exp",), "exp"),
        ({"exp": int(time.time()) - 3600}, (), "expired"),
        ({"exp": int(time.time()) + 3600}, (), "5 minutes"),
        ({"exp": str(int(time.time()) + 60)}, (), "integer"),
    ],
    ids=["missing", "past", "an-hour-ahead", "string"],
)
def test_v8_exp_missing_past_or_too_far(
    vendor: Vendor, claims: dict[str, Any], drop: tuple[str, ...], fragment: str
) -> None:
    _invalid_client(vendor.token_request(vendor.assertion(claims=claims, drop=drop)), fragment)


# -- V9: replay -------------------------------------------------------------------------------


def test_v9_replayed_assertion_is_refused_but_the_jti_is_per_issuer(app: Flask, vendor: Vendor) -> None:
    assertion = vendor.assertion(claims={"jti": "same-jti"})
    assert vendor.token_request(assertion).status_code == 200
    _invalid_client(vendor.token_request(assertion), "used before")
    other = register(app, "other-vendor")
    assert other.token_request(other.assertion(claims={"jti": "same-jti"})).status_code == 200


def test_jti_is_required(vendor: Vendor) -> None:
    _invalid_client(vendor.token_request(vendor.assertion(drop=("jti",))), "jti")


# -- V10-V12: identity, audience, crit ---------------------------------------------------------------


def test_v10_iss_sub_client_id_must_agree(app: Flask, vendor: Vendor) -> None:
    _invalid_client(vendor.token_request(vendor.assertion(claims={"sub": "someone-else"})), "iss")
    _invalid_client(vendor.token_request(vendor.assertion(), client_id="someone-else"), "client_id")
    stranger = Vendor(vendor.client, "unknown-client", vendor.key, token_url=vendor.token_url)
    _invalid_client(stranger.token_request(), "unknown")
    assert _jtis(app) == 0  # nothing was remembered for refused assertions


@pytest.mark.parametrize(
    "aud",
    ["https://elsewhere.example/token", ["http://127.0.0.1:8080/oauth/token", "https://elsewhere.example"]],
    ids=["other-url", "array-with-ours"],
)
def test_v11_audience_must_be_exactly_our_token_url(vendor: Vendor, aud: Any) -> None:
    _invalid_client(vendor.token_request(vendor.assertion(claims={"aud": aud})), "aud")


def test_v12_crit_header_is_refused(vendor: Vendor) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    now = int(time.time())
    claims = {
        "iss": vendor.client_id,
        "sub": vendor.client_id,
        "aud": vendor.token_url,
        "exp": now + 60,
        "jti": "c",
    }
    signing_input = f"{_b64({'alg': 'RS384', 'kid': vendor.key.kid, 'crit': ['x'], 'x': 1})}.{_b64(claims)}"
    private = vendor.key.private_key
    assert isinstance(private, rsa.RSAPrivateKey)  # the default vendor key is RS384
    signature = private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA384())
    forged = signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    _invalid_client(vendor.token_request(forged), "crit")


# -- V13-V15: sizes, grant types, scopes --------------------------------------------------------


def test_v13_huge_assertion_and_body_are_refused_before_crypto(vendor: Vendor) -> None:
    big = vendor.assertion(claims={"padding": "x" * 9_000})
    _invalid_client(vendor.token_request(big), "exceeds")
    response = vendor.client.post(
        "/oauth/token", data={"grant_type": "client_credentials", "x": "y" * 1_000_000}
    )
    assert response.status_code == 413
    assert json_of(response)["error"] == "payload-too-large"
    assert "16384" in json_of(response)["message"]


def test_v14_wrong_assertion_type_and_grant_types(vendor: Vendor) -> None:
    response = vendor.token_request(client_assertion_type="urn:example:other")
    assert response.status_code == 400
    assert response.json["error"] == "invalid_request"
    for grant in ("password", "authorization_code", "refresh_token"):
        response = vendor.token_request(grant_type=grant)
        assert response.status_code == 400
        assert response.json["error"] == "unsupported_grant_type"


def test_v15_scopes_are_mediated_within_the_registration(app: Flask) -> None:
    vendor = register(app, "narrow", scopes=["records.write"])
    response = vendor.token_request(scope="records.write system/*.cruds enrollments")
    assert response.status_code == 200
    assert response.json["scope"] == "records.write"
    response = vendor.token_request(scope="system/*.cruds")
    assert response.status_code == 400
    assert response.json["error"] == "invalid_scope"


# -- V17-V18: JWKS by URL ---------------------------------------------------------------------


@responses.activate
def test_jwks_url_is_fetched_once_and_cached(app: Flask) -> None:
    key = vendor_key("ES384", "by-url")
    responses.get(JWKS_URL, json=public_jwks(key), headers={"Cache-Control": "max-age=600"})
    _public_dns(app)
    vendor = register(app, "by-url", key=key, alg="ES384", jwks_url=JWKS_URL)
    assert vendor.token_request().status_code == 200
    assert vendor.token_request().status_code == 200
    assert len(responses.calls) == 1


@responses.activate
def test_v18_oversized_jwks_fails_closed(app: Flask) -> None:
    key = vendor_key("ES384", "big-jwks")
    responses.get(JWKS_URL, body="{" + " " * 200_000 + "}", content_type="application/json")
    _public_dns(app)
    vendor = register(app, "big-jwks", key=key, alg="ES384", jwks_url=JWKS_URL)
    _invalid_client(vendor.token_request(), "larger than")


@responses.activate
def test_v17_redirecting_jwks_url_is_not_followed(app: Flask) -> None:
    key = vendor_key("ES384", "redirect")
    responses.get(JWKS_URL, status=302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
    _public_dns(app)
    vendor = register(app, "redirect", key=key, alg="ES384", jwks_url=JWKS_URL)
    _invalid_client(vendor.token_request(), "redirects")
    assert [c.request.url for c in responses.calls] == [JWKS_URL]


@responses.activate
def test_v17_jwks_host_resolving_to_a_private_address_is_blocked(app: Flask) -> None:
    key = vendor_key("ES384", "rebind")
    _public_dns(app, address="10.0.0.7")
    vendor = register(app, "rebind", key=key, alg="ES384", jwks_url=JWKS_URL)
    _invalid_client(vendor.token_request(), "private or reserved")
    assert len(responses.calls) == 0


def test_jwks_url_host_must_be_allowed_at_registration(app: Flask) -> None:
    from fhir_bridge.errors import BadRequest

    with pytest.raises(BadRequest, match="JWKS_FETCH_ALLOWED_HOSTS"):
        register(app, "nope", jwks_url="https://evil.example/jwks.json")


def _public_dns(app: Flask, address: str = "93.184.216.34") -> None:
    """Resolve every JWKS host to ``address`` (the unit tests have no DNS)."""
    from fhir_bridge.api.oauth import SERVER_KEY

    server = app.extensions[SERVER_KEY]
    server._client_auth._methods["private_key_jwt"].fetcher.resolver = lambda host, port: [address]


# -- V19-V20: tokens at the resource server, floods ------------------------------------------------------


def test_v19_disabled_vendor_token_stops_working_at_once(app: Flask, vendor: Vendor) -> None:
    from fhir_bridge import vendors

    assert vendor.get("/api/v1/enrollments").status_code == 200
    vendors.disable(services.from_app(app).db, client_id=vendor.client_id, actor="test")
    response = vendor.get("/api/v1/enrollments")
    assert response.status_code == 401
    assert response.json["error"] == "invalid_token"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    _invalid_client(vendor.token_request(), "disabled")


def test_v19_expired_forged_and_missing_tokens(app: Flask, vendor: Vendor) -> None:
    import time_machine

    token = vendor.token
    with time_machine.travel(time.time() + 301, tick=False):
        response = vendor.client.get("/api/v1/enrollments", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401
        assert "expired" in json_of(response)["message"]
    forged = jwt.encode(
        {"alg": "RS384", "kid": vendor.key.kid, "typ": "at+jwt"},
        {"client_id": vendor.client_id},
        vendor.key,
        algorithms=["RS384"],
    )
    for value in (f"Bearer {forged}", "Bearer not-a-token", "Basic abc", ""):
        response = vendor.client.get("/api/v1/enrollments", headers={"Authorization": value})
        assert response.status_code == 401, value
        assert json_of(response)["error"] in ("invalid_token",)


def test_v19_token_without_the_scope_is_forbidden(app: Flask) -> None:
    vendor = register(app, "pusher", scopes=["records.write"])
    response = vendor.token_request(scope="records.write")
    token = response.json["access_token"]
    response = vendor.client.get("/api/v1/enrollments", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    assert json_of(response)["error"] == "insufficient_scope"


def test_v20_token_flood_gets_429_with_retry_after(app: Flask, vendor: Vendor) -> None:
    statuses = [vendor.token_request(vendor.assertion()).status_code for _ in range(125)]
    assert statuses[:120] == [200] * 120
    limited = vendor.token_request()
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json["error"] == "too-many-requests"
