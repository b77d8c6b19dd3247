"""The whole SMART EHR launch in headless Chromium: sandbox EHR chart -> Launch -> fhir-bridge in the iframe.

Real processes on loopback: the sandbox EHR (SMART authorization server + FHIR store + chart page)
and ``fhir-bridge serve``. The browser clicks "Launch fhir-bridge" on a patient's chart; the app in
the iframe goes through /launch, the sandbox's authorize endpoint (PKCE, state, aud), /callback,
and lands on the dashboard, which must show that patient's values. With the sandbox's
``search_foreign_patient`` fault on, the EHR slips another patient's resource into every search:
the dashboard must not show it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc.jwk import RSAKey
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from auth.backend import sign_assertion
from auth.keys import KeyEntry
from tests.support.browser import axe_violations, chromium_context, require_chromium, screenshot
from tests.support.procs import free_port, port_open, stop, wait_until
from tests.support.sandbox import SandboxServer
from tests.support.smart_seed import patient_history

pytestmark = [pytest.mark.browser]

VENDOR = "acme-mood"


def _python_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FHIR_BRIDGE_CONFIG", None)
    env.update(extra)
    return env


class Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as handle:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fhir_bridge", *args],
                env=env,
                cwd=log.parent,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


@pytest.fixture(scope="module")
def clinic(
    sandbox_server: SandboxServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """fhir-bridge registered with the sandbox EHR (and the other way round), with data for two patients."""
    require_chromium()
    root = tmp_path_factory.mktemp("clinic")
    bridge_port = free_port()
    ehr_url, bridge_url = sandbox_server.url, f"http://127.0.0.1:{bridge_port}"
    fhir_base = sandbox_server.fhir_base
    suffix = uuid.uuid4().hex[:8]
    app_id, writer_id = f"fhir-bridge-{suffix}", f"writer-{suffix}"
    patient, other = f"e2e-{suffix}", f"e2e-other-{suffix}"
    sandbox_server.register(
        app_id,
        name=f"fhir-bridge {suffix}",
        auth_method="public",
        redirect_uris=[f"{bridge_url}/callback/sandbox"],
        launch_url=f"{bridge_url}/launch",
        standalone_url=f"{bridge_url}/launch/standalone?tenant=sandbox",
        scopes=[
            "launch",
            "launch/patient",
            "openid",
            "fhirUser",
            "online_access",
            "offline_access",
            "patient/*.rs",
        ],
    )
    writer_key = RSAKey.generate_key(2048, parameters={"kid": "writer-1", "alg": "RS384"}, private=True)
    sandbox_server.register(
        writer_id,
        name="test data writer",
        auth_method="private_key_jwt",
        jwks={"keys": [writer_key.as_dict(private=False)]},
        scopes=["system/*.cruds"],
    )
    token = _writer_token(fhir_base, writer_id, writer_key)
    _put(
        fhir_base,
        token,
        {
            "resourceType": "Patient",
            "id": patient,
            "name": [{"given": ["Jordan"], "family": f"Blake {suffix}"}],
            "birthDate": "1975-11-02",
            "gender": "male",
        },
    )
    _put(
        fhir_base,
        token,
        {
            "resourceType": "Patient",
            "id": other,
            "name": [{"given": ["Sam"], "family": f"Okafor {suffix}"}],
            "birthDate": "1992-07-21",
            "gender": "male",
        },
    )
    history = patient_history(patient, count=400, seed=21)
    _write(fhir_base, token, history)
    # An alert the EHR holds of its own (not raised by fhir-bridge): the alerts panel lists it.
    _put(
        fhir_base,
        token,
        {
            "resourceType": "Flag",
            "id": f"fall-risk-{suffix}",
            "status": "active",
            "category": [
                {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/flag-category", "code": "safety"}
                    ]
                }
            ],
            "code": {"text": "Fall risk: uses a walking aid"},
            "subject": {"reference": f"Patient/{patient}"},
            "period": {"start": "2026-11-01"},
        },
    )
    _write(
        fhir_base,
        token,
        [
            {**r, "valueQuantity": {**r["valueQuantity"], "value": 27}}
            for r in patient_history(other, count=60, seed=4)
            if r["code"]["coding"][0]["code"] == "44261-6"
        ],
    )
    phq9 = sorted(
        (r["effectiveDateTime"], r["valueQuantity"]["value"])
        for r in history
        if r["code"]["coding"][0]["code"] == "44261-6"
    )

    procs = Processes()
    try:
        instance = root / "bridge"
        bridge_env = _python_env(
            FHIR_BRIDGE_INSTANCE_PATH=str(instance),
            FHIR_BRIDGE_PUBLIC_URL=bridge_url,
            FHIR_BRIDGE_ALLOW_INSECURE_LOOPBACK="true",
            FHIR_BRIDGE_LOG_FORMAT="json",
        )
        _register_tenant(instance, bridge_url, fhir_base, ehr_url, app_id)
        vendor_key = RSAKey.generate_key(2048, parameters={"kid": "vendor-1", "alg": "RS384"}, private=True)
        jwks_file = root / "vendor-jwks.json"
        jwks_file.write_text(json.dumps({"keys": [vendor_key.as_dict(private=False)]}))
        added = subprocess.run(
            [
                sys.executable,
                "-m",
                "fhir_bridge",
                "vendor",
                "add",
                VENDOR,
                "--name",
                "Acme Mood",
                "--jwks",
                str(jwks_file),
            ],
            env=bridge_env,
            cwd=root,
            capture_output=True,
            timeout=120,
        )
        assert added.returncode == 0, added.stderr.decode()[-2000:]
        bridge = procs.start(
            ["serve", "--port", str(bridge_port), "--workers", "1"], env=bridge_env, log=root / "bridge.log"
        )
        wait_until(lambda: port_open(bridge_port), timeout=60, what="fhir-bridge", proc=bridge)
        yield {
            "sandbox": sandbox_server,
            "ehr": ehr_url,
            "bridge": bridge_url,
            "fhir": fhir_base,
            "app": app_id,
            "patient": patient,
            "other": other,
            "name": f"Jordan Blake {suffix}",
            "phq9": phq9,
            "vendor_key": vendor_key,
            "logs": root,
        }
    finally:
        procs.stop_all()


def _register_tenant(instance: Path, bridge_url: str, fhir_base: str, ehr_url: str, client_id: str) -> None:
    """What `fhir-bridge ehr add` does for hospital IT, done directly: the sandbox as a tenant."""
    from fhir_bridge.services import build_services
    from fhir_bridge.settings import load_settings
    from fhir_bridge.storage import migrate
    from fhir_bridge.storage.models import Tenant

    settings = load_settings(
        {"INSTANCE_PATH": str(instance), "PUBLIC_URL": bridge_url, "ALLOW_INSECURE_LOOPBACK": True},
        environ={},
    )
    svc = build_services(settings)
    try:
        migrate.upgrade(svc.db)
        with svc.db.transaction() as session:
            session.add(
                Tenant(
                    id="sandbox",
                    name="Sandbox EHR",
                    fhir_base_url=fhir_base,
                    smart_client_id=client_id,
                    frame_ancestors=[ehr_url],
                )
            )
    finally:
        svc.db.dispose()


def _writer_token(fhir_base: str, client_id: str, key: RSAKey) -> str:
    config = requests.get(f"{fhir_base}/.well-known/smart-configuration", timeout=10).json()
    token_url = config["token_endpoint"]
    assertion = sign_assertion(_entry(key), client_id=client_id, token_url=token_url)
    response = requests.post(
        token_url,
        data={
            "grant_type": "client_credentials",
            "scope": "system/*.cruds",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
        timeout=10,
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


def _entry(key: RSAKey) -> KeyEntry:
    now = datetime.now(UTC)
    return KeyEntry(key=key, alg="RS384", created_at=now, activates_at=now)


def _put(fhir_base: str, token: str, resource: dict[str, Any]) -> None:
    response = requests.put(
        f"{fhir_base}/{resource['resourceType']}/{resource['id']}",
        json=resource,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
        timeout=30,
    )
    assert response.status_code in (200, 201), response.text[:500]


def _write(fhir_base: str, token: str, resources: list[dict[str, Any]]) -> None:
    for start in range(0, len(resources), 200):
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": r, "request": {"method": "POST", "url": "Observation"}}
                for r in resources[start : start + 200]
            ],
        }
        response = requests.post(
            fhir_base,
            json=bundle,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
            timeout=60,
        )
        assert response.status_code == 200, response.text[:500]


def _faults(clinic: dict[str, Any], faults: dict[str, Any]) -> None:
    response = clinic["sandbox"].admin("PUT", f"/clients/{clinic['app']}/faults", faults)
    assert response.status_code in (200, 204), response.text


def _launch_from_chart(context: Any, clinic: dict[str, Any], patient: str) -> Any:
    page = context.new_page()
    page.goto(f"{clinic['ehr']}/")
    form = f"form[action='/chart/{patient}/launch']:has(input[name=client_id][value='{clinic['app']}'])"
    page.locator(f"{form} button").click()
    frame_element = page.wait_for_selector("iframe.app", timeout=30_000)
    frame = frame_element.content_frame()
    assert frame is not None
    try:
        frame.wait_for_selector("body[data-state=ready]", timeout=60_000)
    except PlaywrightTimeout:
        screenshot(page, "ehr-launch-failed.png")
        pytest.fail(
            f"the app in the EHR frame did not get ready; it is at {frame.url}; logs in {clinic['logs']}"
        )
    return page, frame


def test_ehr_launch_from_the_chart_opens_the_dashboard_on_that_patient(clinic: dict[str, Any]) -> None:
    _faults(clinic, {})
    with chromium_context() as context:
        requested: list[str] = []
        context.on("request", lambda r: requested.append(r.url))
        page, frame = _launch_from_chart(context, clinic, clinic["patient"])
        assert frame.url.startswith(f"{clinic['bridge']}/app/")
        assert "code=" not in frame.url and "state=" not in frame.url
        assert frame.inner_text("#patient-name") == clinic["name"]
        baseline, latest = clinic["phq9"][0][1], clinic["phq9"][-1][1]
        summary = frame.inner_text("#phq9-summary")
        assert f"Latest PHQ-9 {latest}" in summary and f"since baseline {baseline}" in summary
        for chart in (
            "#chart-phq9",
            "#chart-gad7",
            "#chart-dwai",
            "#chart-dwai-themes",
            "#chart-sleep",
            "#chart-steps",
        ):
            assert frame.locator(f"{chart} svg.chart-svg").count() == 1, chart
        assert "Fall risk: uses a walking aid" in frame.inner_text("#alerts")
        screenshot(page, "ehr-launch-chart.png")
        assert frame.locator(".notice").count() == 0, frame.inner_text("#notices")  # every panel loaded
        # The same dashboard opened on its own, to capture every panel in one picture.
        whole = context.new_page()
        whole.set_viewport_size({"width": 1300, "height": 900})
        whole.goto(frame.url)
        whole.wait_for_selector("body[data-state=ready]", timeout=60_000)
        screenshot(whole, "ehr-launch-dashboard.png")
        assert axe_violations(frame) == []
        # Nothing but the EHR and fhir-bridge, both on loopback, was contacted.
        assert all(u.startswith((clinic["ehr"], clinic["bridge"], "data:")) for u in requested), requested
        # No token in any URL the browser saw.
        assert not any("access_token" in u or "code_verifier" in u for u in requested)


def test_two_launches_in_two_tabs_keep_their_own_patients(clinic: dict[str, Any]) -> None:
    _faults(clinic, {})
    with chromium_context() as context:
        _, first = _launch_from_chart(context, clinic, clinic["patient"])
        _, second = _launch_from_chart(context, clinic, clinic["other"])
        assert second.inner_text("#patient-name") != first.inner_text("#patient-name")
        first.click("button[data-days='0']")
        assert first.inner_text("#patient-name") == clinic["name"]
        first.goto(first.url)
        first.wait_for_selector("body[data-state=ready]", timeout=60_000)
        assert first.inner_text("#patient-name") == clinic["name"]  # tab 1 still shows its own patient


def test_the_dashboard_never_shows_another_patients_resource_the_ehr_slips_in(clinic: dict[str, Any]) -> None:
    _faults(clinic, {"search_foreign_patient": True})
    try:
        with chromium_context() as context:
            _, frame = _launch_from_chart(context, clinic, clinic["patient"])
            frame.click("button[data-days='0']")
            frame.click("#chart-phq9 details summary")
            values = frame.locator("#chart-phq9 table tbody td").all_inner_texts()
            assert values and "27" not in values
            data = frame.evaluate("async () => (await fetch('api/summary')).json()")
            assert data["dropped"]["other_patient"] >= 1
            assert 27 not in data["series"]["phq9"]["v"]
    finally:
        _faults(clinic, {})


def _vendor_token(bridge_url: str, key: RSAKey) -> str:
    token_url = f"{bridge_url}/oauth/token"
    assertion = sign_assertion(_entry(key), client_id=VENDOR, token_url=token_url)
    response = requests.post(
        token_url,
        data={
            "grant_type": "client_credentials",
            "scope": "enrollments",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def test_prescribe_app_then_the_vendor_claims_the_code_and_the_dashboard_shows_it(
    clinic: dict[str, Any],
) -> None:
    _faults(clinic, {})
    with chromium_context() as context:
        page, frame = _launch_from_chart(context, clinic, clinic["patient"])
        frame.select_option("#prescribe-vendor", VENDOR)
        frame.click(".prescribe button[type=submit]")
        code = frame.locator("#pairing-code").inner_text(timeout=10_000)
        assert re.fullmatch(r"[A-Z2-9]{5}-[A-Z2-9]{5}", code)
        assert frame.get_attribute(".pairing img.qr", "src").startswith("data:image/svg+xml")
        assert frame.locator("[data-status=pending]").count() == 1
        screenshot(page, "prescribe-code.png")

        # The patient types the code into the vendor's app; the app claims it through the vendor API.
        token = _vendor_token(clinic["bridge"], clinic["vendor_key"])
        claimed = requests.post(
            f"{clinic['bridge']}/api/v1/enrollments/claim",
            json={"code": code, "app_user_id": "user-42"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert claimed.status_code in (200, 201), claimed.text
        frame.locator("[data-status=active]").wait_for(timeout=15_000)  # the page notices by itself
        assert "claimed the code" in frame.inner_text(".enroll-status")

        frame.click("[data-status=active] button")  # End enrollment, then confirm in the page
        frame.click("[data-status=active] .confirm-end")
        frame.locator("[data-status=ended]").wait_for(timeout=10_000)
        mine = requests.get(
            f"{clinic['bridge']}/api/v1/enrollments", headers={"Authorization": f"Bearer {token}"}, timeout=10
        ).json()
        assert "ended" in json.dumps(mine)
