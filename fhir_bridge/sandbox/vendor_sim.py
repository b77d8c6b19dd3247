"""A synthetic app vendor: registers, is prescribed to sandbox patients, claims and pushes their stories.

DEVELOPMENT AND DEMO ONLY (``fhir-bridge demo``). Everything a real vendor does goes through the
real vendor HTTP API of a running bridge: an OAuth client-credentials token signed with its own
key (``private_key_jwt``), the pairing-code claim, and batched native pushes. Only the two steps
that are not the vendor's use the service layer the CLI uses: registering the vendor (hospital IT
runs ``fhir-bridge vendor add``) and creating the pairing codes (the clinician's "Prescribe app",
:func:`fhir_bridge.enrollment.create`).

Patient ``n`` of the sandbox (``sbx-patient-n``) gets story ``stories()[n % 5]``: patient 1, Alex
Rivera, first in the chart, is the non-responder the demo walkthrough points at.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from joserfc.jwk import RSAKey

from auth.backend import sign_assertion
from auth.keys import KeyEntry
from fhir_bridge import enrollment, vendors
from fhir_bridge.errors import BridgeError
from fhir_bridge.sandbox import seed
from fhir_bridge.sandbox.synthetic import Story, generate, stories
from fhir_bridge.services import Services

VENDOR_ID = "demo-mood-app"
VENDOR_NAME = "Demo Mood (synthetic app)"
VENDOR_SCOPES = ("enrollments", "records.write", "records.read")
ALG = "RS384"
BATCH = 500  # records per push: well under MAX_BATCH_RECORDS, and a visible step of the progress bar
TOKEN_MARGIN = 30  # seconds before expiry a token is renewed


class SimulationError(RuntimeError):
    """The bridge refused something a well-behaved vendor does; the message says what and why."""


@dataclass(frozen=True)
class SimPatient:
    """One sandbox patient and the app user the synthetic vendor plays for them."""

    patient_id: str
    name: str
    story: Story
    app_user_id: str


def cast(count: int) -> list[SimPatient]:
    """Patients 1..count of the sandbox with their stories (patient n: ``stories()[n % 5]``)."""
    if not 1 <= count <= len(seed.PATIENTS):
        raise ValueError(f"the sandbox has {len(seed.PATIENTS)} patients; ask for 1 to {len(seed.PATIENTS)}")
    cast_: list[SimPatient] = []
    for n in range(1, count + 1):
        given, family, _, _ = seed.PATIENTS[n - 1]
        s = stories()[n % len(stories())]
        cast_.append(SimPatient(seed.patient_id(n), f"{given} {family}", s, f"demo-user-{n}-{s.key}"))
    return cast_


def load_or_create_key(path: Path) -> RSAKey:
    """The vendor's private signing key, kept (mode 0600) so a restarted demo is the same vendor."""
    if path.exists():
        return RSAKey.import_key(json.loads(path.read_text()))
    key = RSAKey.generate_key(2048, private=True)
    data = key.as_dict(private=True) | {"kid": f"{VENDOR_ID}-1", "alg": ALG, "use": "sig"}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    return RSAKey.import_key(data)


def register_vendor(svc: Services, key: RSAKey, *, client_id: str = VENDOR_ID) -> None:
    """What ``fhir-bridge vendor add`` does; nothing when the vendor is registered already."""
    if any(v.client_id == client_id for v in vendors.list_all(svc.db)):
        return
    public = key.as_dict(private=False) | {"kid": key.kid, "alg": ALG, "use": "sig"}
    vendors.register(
        svc.db,
        client_id=client_id,
        name=VENDOR_NAME,
        jwks={"keys": [public]},
        jwks_url=None,
        scopes=list(VENDOR_SCOPES),
        allowed_hosts=svc.settings.jwks_fetch_allowed_hosts,
        allow_insecure_loopback=svc.settings.allow_insecure_loopback,
        actor="fhir-bridge demo",
    )


def prescribe(svc: Services, *, tenant_id: str, patient_id: str, vendor_client_id: str = VENDOR_ID) -> str:
    """A pairing code for the patient, made as the clinician's "Prescribe app" makes it."""
    created = enrollment.create(
        svc.db,
        secret=svc.secret_key,
        tenant_id=tenant_id,
        patient_id=patient_id,
        vendor_client_id=vendor_client_id,
        created_by="fhir-bridge demo (synthetic clinician)",
        ttl_seconds=svc.settings.pairing_code_ttl,
    )
    return enrollment.display(created.code)


class VendorApi:
    """The vendor's side of the HTTP API: a token when needed, claims and pushes; errors say what failed."""

    def __init__(self, bridge_url: str, key: RSAKey, *, client_id: str = VENDOR_ID) -> None:
        self.base = bridge_url.rstrip("/")
        self.key = key
        self.client_id = client_id
        self.http = requests.Session()
        self._token: str | None = None
        self._expires = 0.0

    def close(self) -> None:
        self.http.close()

    def token(self) -> str:
        if self._token is None or time.monotonic() > self._expires - TOKEN_MARGIN:
            token_url = f"{self.base}/oauth/token"
            now = datetime.now(UTC)
            entry = KeyEntry(key=self.key, alg=ALG, created_at=now, activates_at=now)
            response = self.http.post(
                token_url,
                data={
                    "grant_type": "client_credentials",
                    "scope": " ".join(VENDOR_SCOPES),
                    "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    "client_assertion": sign_assertion(entry, client_id=self.client_id, token_url=token_url),
                },
                timeout=30,
            )
            body = self._json(response, "token request", expect=(200,))
            self._token = str(body["access_token"])
            self._expires = time.monotonic() + float(body.get("expires_in", 60))
        return self._token

    def claim(self, code: str, app_user_id: str) -> dict[str, Any]:
        response = self.http.post(
            f"{self.base}/api/v1/enrollments/claim",
            json={"code": code, "app_user_id": app_user_id},
            headers={"Authorization": f"Bearer {self.token()}"},
            timeout=30,
        )
        return self._json(response, "pairing claim", expect=(200, 201))

    def push(self, records: Sequence[dict[str, Any]], *, idempotency_key: str) -> dict[str, Any]:
        """One batch; every record must come back accepted (or duplicate, when a push is replayed)."""
        response = self.http.post(
            f"{self.base}/api/v1/records",
            json={"records": list(records)},
            headers={"Authorization": f"Bearer {self.token()}", "Idempotency-Key": idempotency_key},
            timeout=120,
        )
        body = self._json(response, "push", expect=(200,))
        refused = [r for r in body.get("results", []) if r.get("status") not in ("accepted", "duplicate")]
        if refused:
            raise SimulationError(
                f"the bridge rejected {len(refused)} synthetic record(s), e.g. {refused[0]}"
            )
        return body

    @staticmethod
    def _json(response: requests.Response, what: str, *, expect: tuple[int, ...]) -> dict[str, Any]:
        if response.status_code not in expect:
            raise SimulationError(f"{what}: HTTP {response.status_code}: {response.text[:300]}")
        body = response.json()
        if not isinstance(body, dict):
            raise SimulationError(f"{what}: expected a JSON object")
        return body


@dataclass(frozen=True)
class Plan:
    """What the vendor will push: each patient with their records (computed before anything is sent)."""

    patients: list[tuple[SimPatient, list[dict[str, Any]]]]

    @property
    def total(self) -> int:
        return sum(len(records) for _, records in self.patients)


def plan(count: int, *, days: int, end: datetime | None = None, seed_: int = 0) -> Plan:
    end = end or datetime.now(UTC)
    return Plan(
        [
            (p, generate(p.story, app_user_id=p.app_user_id, days=days, end=end, seed=seed_))
            for p in cast(count)
        ]
    )


def run(
    svc: Services,
    api: VendorApi,
    the_plan: Plan,
    *,
    tenant_id: str,
    progress: Callable[[int], None] = lambda _: None,
) -> None:
    """Prescribe, claim and push for every patient of the plan; ``progress(n)`` after each batch."""
    for patient, records in the_plan.patients:
        try:
            code = prescribe(svc, tenant_id=tenant_id, patient_id=patient.patient_id)
        except BridgeError as exc:
            raise SimulationError(f"prescribing the app to {patient.patient_id}: {exc.message}") from None
        api.claim(code, patient.app_user_id)
        for start in range(0, len(records), BATCH):
            batch = records[start : start + BATCH]
            api.push(batch, idempotency_key=f"{patient.app_user_id}:{batch[0]['record_id']}")
            progress(len(batch))
