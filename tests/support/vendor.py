"""A vendor as the tests play it: its own key pair, signed assertions, a token, and API calls."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flask.testing import FlaskClient
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from sqlalchemy import select

from fhir_bridge.storage import Database
from fhir_bridge.storage.models import Tenant, VendorClient

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_URL = "http://127.0.0.1:8080/oauth/token"
ALL_SCOPES = (
    "enrollments",
    "records.write",
    "records.read",
    "relationship.read",
    "messages.write",
    "tasks.write",
    "system/Observation.c",
    "system/QuestionnaireResponse.c",
)

_KEYS: dict[str, RSAKey | ECKey] = {}


def vendor_key(alg: str = "RS384", name: str = "default") -> RSAKey | ECKey:
    """A private key per (alg, name), generated once per test session (RSA generation is slow)."""
    cache_key = f"{alg}:{name}"
    if cache_key not in _KEYS:
        if alg.startswith("RS"):
            key: RSAKey | ECKey = RSAKey.generate_key(2048, private=True)
        else:
            key = ECKey.generate_key("P-384" if alg == "ES384" else "P-256", private=True)
        data = key.as_dict(private=True) | {"kid": f"{name}-{alg}-{uuid.uuid4().hex[:8]}"}
        _KEYS[cache_key] = RSAKey.import_key(data) if data["kty"] == "RSA" else ECKey.import_key(data)
    return _KEYS[cache_key]


def public_jwks(*keys: RSAKey | ECKey) -> dict[str, Any]:
    return {"keys": [k.as_dict(private=False) | {"kid": k.kid} for k in keys]}


@dataclass
class Vendor:
    client: FlaskClient
    client_id: str
    key: RSAKey | ECKey
    alg: str = "RS384"
    token_url: str = TOKEN_URL
    _token: str | None = field(default=None, repr=False)

    def assertion(
        self,
        *,
        claims: dict[str, Any] | None = None,
        header: dict[str, Any] | None = None,
        drop: tuple[str, ...] = (),
        key: Any = None,
        alg: str | None = None,
    ) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "exp": now + 240,
            "iat": now,
            "jti": uuid.uuid4().hex,
        }
        body.update(claims or {})
        for name in drop:
            body.pop(name, None)
        alg = alg or self.alg
        head: dict[str, Any] = {"alg": alg, "kid": self.key.kid, "typ": "JWT"}
        head.update(header or {})
        return jwt.encode(head, body, key or self.key, algorithms=[alg])

    def token_request(self, assertion: str | None = None, **form: str) -> Any:
        data = {
            "grant_type": "client_credentials",
            "scope": form.pop("scope", "enrollments records.write records.read system/Observation.c"),
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion if assertion is not None else self.assertion(),
        }
        data.update(form)
        return self.client.post("/oauth/token", data=data)

    @property
    def token(self) -> str:
        if self._token is None:
            response = self.token_request(scope=" ".join(ALL_SCOPES))
            assert response.status_code == 200, response.json
            self._token = response.json["access_token"]
        return self._token

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(path, headers=self.headers(), **kwargs)

    def post(
        self, path: str, *, json: Any = None, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> Any:
        return self.client.post(path, json=json, headers=self.headers(**(headers or {})), **kwargs)

    def delete(self, path: str) -> Any:
        return self.client.delete(path, headers=self.headers())

    def claim(self, code: str, app_user_id: str) -> Any:
        return self.post("/api/v1/enrollments/claim", json={"code": code, "app_user_id": app_user_id})


def add_tenant(db: Database, tenant_id: str = "general") -> str:
    with db.transaction() as session:
        if session.get(Tenant, tenant_id) is None:
            session.add(
                Tenant(
                    id=tenant_id,
                    name=f"{tenant_id} hospital",
                    fhir_base_url=f"https://{tenant_id}.example/fhir",
                )
            )
    return tenant_id


def vendor_row(db: Database, client_id: str) -> VendorClient:
    with db.sessions() as session:
        return session.execute(select(VendorClient).where(VendorClient.client_id == client_id)).scalar_one()


def register(
    app: Any,
    client_id: str = "acme-mood",
    *,
    alg: str = "RS384",
    key: RSAKey | ECKey | None = None,
    jwks: dict[str, Any] | None = None,
    jwks_url: str | None = None,
    scopes: list[str] | None = None,
) -> Vendor:
    """Register a vendor the way `fhir-bridge vendor add` does, and return it ready to call the API."""
    from fhir_bridge import services, vendors

    svc = services.from_app(app)
    key = key or vendor_key(alg, client_id)
    vendors.register(
        svc.db,
        client_id=client_id,
        name=f"{client_id} app",
        jwks=None if jwks_url else (jwks or public_jwks(key)),
        jwks_url=jwks_url,
        scopes=scopes,
        allowed_hosts=svc.settings.jwks_fetch_allowed_hosts,
        allow_insecure_loopback=svc.settings.allow_insecure_loopback,
        actor="test",
    )
    return Vendor(app.test_client(), client_id, key, alg, token_url=svc.settings.url("/oauth/token"))


def enroll(app: Any, vendor: Vendor, tenant: str, patient: str, app_user: str = "user-1") -> str:
    """A clinician's pairing code for ``patient`` (as "Prescribe app" makes it), claimed by ``vendor``
    for ``app_user`` through the API; returns the enrollment id."""
    from fhir_bridge import enrollment, services

    svc = services.from_app(app)
    code = enrollment.create(
        svc.db,
        secret=svc.secret_key,
        tenant_id=tenant,
        patient_id=patient,
        vendor_client_id=vendor.client_id,
        created_by="dr-test",
        ttl_seconds=600,
    ).code
    claimed = vendor.claim(code, app_user)
    assert claimed.status_code == 201, claimed.json
    return str(claimed.json["id"])


def phq9_record(record_id: str, app_user_id: str) -> dict[str, object]:
    return {"record_id": record_id, "app_user_id": app_user_id, "measure": "phq9", "data": phq9_now()}


def phq9_now() -> dict[str, object]:
    """A PHQ-9 filled in now: only data from after a task was assigned completes it."""
    return {
        "authored": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "answers": {
            "item1": 1, "item2": 1, "item3": "LA6569-3", "item4": 1, "item5": 0,
            "item6": 1, "item7": 1, "item8": 0, "item9": 0, "difficulty": "LA6573-5",
        },
    }  # fmt: skip
