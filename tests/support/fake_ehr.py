"""A SMART EHR faked at the HTTP transport (``responses``), for unit tests of the launch and dashboard.

It answers discovery, the token endpoint, the OpenID configuration and JWKS, and FHIR reads and
searches, and records every request so a test can assert what was (and was not) sent where. Its
behaviour is switchable per test (token errors, odd token responses, another patient's data).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import responses
from joserfc import jwt
from joserfc.jwk import RSAKey

BASE = "https://ehr.example.com/fhir"
AUTHORIZE = "https://ehr.example.com/oauth/authorize"
TOKEN = "https://ehr.example.com/oauth/token"
ISSUER = "https://ehr.example.com/oauth"
JWKS = "https://ehr.example.com/oauth/jwks"
CLIENT_ID = "fhir-bridge-app"


@dataclass
class FakeEhr:
    """Configure, then ``install(rsps)``; inspect ``token_requests`` and ``rsps.calls`` afterwards."""

    key: RSAKey
    base: str = BASE
    patient: str | None = "p1"
    encounter: str | None = "e1"
    scope: str | None = None  # None: echo what was asked for
    fhir_user: str = "Practitioner/dr1"
    token_status: int = 200
    token_body: dict[str, Any] | None = None  # replaces the whole token response when set
    token_extra: dict[str, Any] = field(default_factory=dict)
    id_token_claims: dict[str, Any] = field(default_factory=dict)
    id_token_header: dict[str, Any] = field(default_factory=dict)
    id_token_override: str | None = None
    discovery: dict[str, Any] | None = None
    observations: list[dict[str, Any]] = field(default_factory=list)
    flags: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    token_requests: list[dict[str, list[str]]] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    refresh_count: int = 0
    expires_in: Any = 3600
    last_nonce: str | None = None
    _rsps: responses.RequestsMock | None = field(default=None, init=False, repr=False)

    @property
    def rsps(self) -> responses.RequestsMock:
        """The transport mock ``install`` registered on: replace a route on it, or read its ``calls``."""
        assert self._rsps is not None, "install(rsps) first"
        return self._rsps

    def default_discovery(self) -> dict[str, Any]:
        return {
            "issuer": ISSUER,
            "authorization_endpoint": AUTHORIZE,
            "token_endpoint": TOKEN,
            "jwks_uri": JWKS,
            "code_challenge_methods_supported": ["S256"],
            "capabilities": ["launch-ehr", "launch-standalone", "permission-v2", "client-public"],
        }

    # -- id_token ----------------------------------------------------------------------------

    def id_token(self, nonce: str | None) -> str:
        if self.id_token_override is not None:
            return self.id_token_override
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": "user-1",
            "aud": CLIENT_ID,
            "exp": now + 300,
            "iat": now,
            "fhirUser": self.fhir_user,
        }
        if nonce is not None:
            claims["nonce"] = nonce
        claims.update(self.id_token_claims)
        header: dict[str, Any] = {"alg": "RS256", "kid": self.key.kid}
        header.update(self.id_token_header)
        return jwt.encode(header, claims, self.key, algorithms=[header["alg"]])

    # -- handlers ----------------------------------------------------------------------------

    def _token(self, request: Any) -> tuple[int, dict[str, str], bytes]:
        form = parse_qs(request.body if isinstance(request.body, str) else request.body.decode())
        self.token_requests.append(form)
        if self.token_status != 200:
            error = self.token_body or {"error": "invalid_grant", "error_description": "<b>nope</b>"}
            return self.token_status, {"Content-Type": "application/json"}, orjson.dumps(error)
        if self.token_body is not None:
            return 200, {"Content-Type": "application/json"}, orjson.dumps(self.token_body)
        grant = form.get("grant_type", [""])[0]
        access = f"at-{len(self.issued) + 1}-secret"
        self.issued.append(access)
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "refresh_token": f"rt-{len(self.issued)}-secret",
        }
        if grant == "refresh_token":
            self.refresh_count += 1
            body["scope"] = self.scope or self._asked_scope
        else:
            body["scope"] = self.scope if self.scope is not None else self._asked_scope
            if self.patient is not None:
                body["patient"] = self.patient
            if self.encounter is not None:
                body["encounter"] = self.encounter
            if "openid" in body["scope"].split():
                body["id_token"] = self.id_token(self.last_nonce)
        body.update(self.token_extra)
        return 200, {"Content-Type": "application/json", "Cache-Control": "no-store"}, orjson.dumps(body)

    _asked_scope: str = ""

    def _patient(self, request: Any) -> tuple[int, dict[str, str], bytes]:
        pid = urlsplit(request.url).path.rsplit("/", 1)[-1]
        family = {"p1": "Rivera", "p2": "Chen"}.get(pid, "Doe")
        patient = {
            "resourceType": "Patient",
            "id": pid,
            "name": [{"use": "official", "given": ["Alex"], "family": family}],
            "birthDate": "1990-04-01",
        }
        return 200, {"Content-Type": "application/fhir+json"}, orjson.dumps(patient)

    def authorize(self, location: str) -> dict[str, str]:
        """What the EHR's authorize endpoint received (the browser would follow ``location``)."""
        parts = urlsplit(location)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == AUTHORIZE
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self._asked_scope = params.get("scope", "")
        self.last_nonce = params.get("nonce")
        return params

    def _bundle(self, attribute: str) -> Callable[[Any], tuple[int, dict[str, str], bytes]]:
        def handler(_request: Any) -> tuple[int, dict[str, str], bytes]:
            resources: list[dict[str, Any]] = getattr(self, attribute)
            bundle = {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(resources),
                "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
            }
            return 200, {"Content-Type": "application/fhir+json"}, orjson.dumps(bundle)

        return handler

    def install(self, rsps: responses.RequestsMock) -> None:
        self._rsps = rsps
        rsps.add(
            responses.GET,
            f"{self.base}/.well-known/smart-configuration",
            json=self.discovery if self.discovery is not None else self.default_discovery(),
        )
        rsps.add_callback(responses.POST, TOKEN, callback=self._token)
        rsps.add(responses.GET, JWKS, json={"keys": [self.key.as_dict(private=False)]})
        rsps.add_callback(
            responses.GET, re.compile(re.escape(self.base) + r"/Patient/[^/?]+$"), callback=self._patient
        )
        rsps.add_callback(responses.GET, f"{self.base}/Observation", callback=self._bundle("observations"))
        rsps.add_callback(responses.GET, f"{self.base}/Flag", callback=self._bundle("flags"))
        rsps.add_callback(responses.GET, f"{self.base}/Task", callback=self._bundle("tasks"))


def observation(
    code: str, value: float, when: str, *, patient: str = "p1", system: str = "http://loinc.org"
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when,
        "valueQuantity": {
            "value": value,
            "unit": "{score}",
            "system": "http://unitsofmeasure.org",
            "code": "{score}",
        },
    }
