"""Helpers for tests and benchmarks of the SMART dashboard against real servers.

* :func:`patient_history` makes a realistic record of app data as FHIR Observations (what the
  delivery worker would have written), for a patient, with an exact count;
* :func:`load_into` writes them into a FHIR server with transaction Bundles;
* :func:`seed_launch` creates a completed launch directly in the database (the OAuth dance is tested
  elsewhere), so a benchmark can open the dashboard with a known session handle;
* :class:`ThreadedServer` serves a Flask app on a free loopback port in this process.
"""

from __future__ import annotations

import math
import random
import secrets
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from flask import Flask
from werkzeug.serving import make_server

from tests.support.procs import free_port

LOINC = "http://loinc.org"
OURS = "https://fhir-bridge.org/fhir/CodeSystem/fhir-bridge"
UCUM = "http://unitsofmeasure.org"


def _obs(
    patient: str, code: tuple[str, str], when: datetime, value: float, unit: str, **extra: Any
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "survey"}
                ]
            }
        ],
        "code": {"coding": [{"system": code[0], "code": code[1]}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when.isoformat(timespec="seconds"),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }
    resource.update(extra)
    return resource


def patient_history(
    patient: str, *, count: int, end: datetime | None = None, seed: int = 7
) -> list[dict[str, Any]]:
    """``count`` Observations: daily steps, sleep and app use, weekly PHQ-9/GAD-7/item 9 and D-WAI.

    A responder's story: PHQ-9 falls from 19 towards remission while alliance rises; steps and sleep
    carry day-to-day noise. Days are added backwards from ``end`` until ``count`` is reached.
    """
    rng = random.Random(seed)
    end = end or (datetime.now(UTC) - timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
    out: list[dict[str, Any]] = []
    day = 0
    while len(out) < count:
        when = end - timedelta(days=day)
        weeks_ago = day / 7
        progress = max(0.0, 1 - weeks_ago / 26)  # 0 half a year ago, 1 today
        daily = [
            _obs(
                patient,
                (LOINC, "41950-7"),
                when,
                round(6500 + 2500 * math.sin(day / 5) + rng.gauss(0, 900)),
                "/d",
            ),
            _obs(patient, (LOINC, "93832-4"), when, round(rng.gauss(420, 45)), "min"),
            {
                **_obs(patient, (OURS, "app-engagement"), when, 0, "min"),
                "valueQuantity": None,
                "component": [
                    {
                        "code": {"coding": [{"system": OURS, "code": "active-minutes"}]},
                        "valueQuantity": {
                            "value": max(1, round(rng.gauss(14, 6))),
                            "unit": "min",
                            "system": UCUM,
                            "code": "min",
                        },
                    }
                ],
            },
        ]
        for resource in daily:
            if resource.get("valueQuantity") is None:
                resource.pop("valueQuantity", None)
        out.extend(daily)
        if day % 7 == 0:
            phq = max(0, round(19 - 15 * progress + rng.gauss(0, 1.2)))
            out.append(_obs(patient, (LOINC, "44261-6"), when, phq, "{score}"))
            out.append(_obs(patient, (LOINC, "44260-8"), when, 0, "{score}"))
            out.append(
                _obs(
                    patient,
                    (LOINC, "70274-6"),
                    when,
                    max(0, round(14 - 9 * progress + rng.gauss(0, 1))),
                    "{score}",
                )
            )
            items = [min(5, max(1, round(2 + 2.5 * progress + rng.gauss(0, 0.5)))) for _ in range(6)]
            out.append(_obs(patient, (OURS, "dwai-total"), when, sum(items), "{score}"))
            # The theme sub-totals the dwai mapping derives (items 1+4 goal, 2+5 task, 3+6 bond).
            for theme, (a, b) in (("goal", (0, 3)), ("task", (1, 4)), ("bond", (2, 5))):
                out.append(_obs(patient, (OURS, f"dwai-{theme}"), when, items[a] + items[b], "{score}"))
        day += 1
    return out[:count]


def load_into(
    base_url: str, resources: list[dict[str, Any]], *, batch: int = 500, headers: dict[str, str] | None = None
) -> None:
    """POST the resources to a FHIR server in transaction Bundles of ``batch``."""
    session = requests.Session()
    for start in range(0, len(resources), batch):
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
                for r in resources[start : start + batch]
            ],
        }
        response = session.post(
            base_url,
            json=bundle,
            headers={"Content-Type": "application/fhir+json", **(headers or {})},
            timeout=300,
        )
        response.raise_for_status()


def put_patient(base_url: str, patient: str, *, given: str = "Alex", family: str = "Rivera") -> None:
    response = requests.put(
        f"{base_url}/Patient/{patient}",
        json={
            "resourceType": "Patient",
            "id": patient,
            "name": [{"given": [given], "family": family}],
            "birthDate": "1990-04-01",
        },
        headers={"Content-Type": "application/fhir+json"},
        timeout=30,
    )
    response.raise_for_status()


def seed_launch(
    app: Flask, *, tenant_id: str, patient_id: str, access_token: str, scope: str | None = None
) -> tuple[str, str]:
    """A completed launch for ``patient_id``; returns (launch id, browser session handle)."""
    from fhir_bridge import services
    from fhir_bridge.storage.models import SmartLaunch
    from smart_app import web

    handle = web.new_handle()
    launch_id = secrets.token_urlsafe(24)
    now = datetime.now(UTC)
    with app.app_context():
        svc = services.current()
        with svc.db.transaction() as session:
            session.add(
                SmartLaunch(
                    id=launch_id,
                    browser_hash=web.handle_hash(handle),
                    tenant_id=tenant_id,
                    patient_id=patient_id,
                    fhir_user="Practitioner/bench",
                    user_key="bench|clinician",
                    scope=scope
                    or "launch openid fhirUser patient/Patient.rs patient/Observation.rs patient/Flag.rs"
                    " patient/Task.rs",
                    token_url="http://127.0.0.1:9/token",
                    access_token_enc=svc.cipher.encrypt(access_token.encode()),
                    refresh_token_enc=None,
                    access_expires_at=now + timedelta(hours=6),
                    need_patient_banner=True,
                    status="active",
                    token_version=0,
                    created_at=now,
                    last_used_at=now,
                    expires_at=now + timedelta(hours=6),
                )
            )
    return launch_id, handle


class ThreadedServer:
    """A Flask app on 127.0.0.1:<free port>, served by werkzeug's threaded server in this process."""

    def __init__(self, app: Flask, port: int | None = None) -> None:
        self.port = port or free_port()
        self.server = make_server("127.0.0.1", self.port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)
