"""The dashboard in headless Chromium, reading a real third-party FHIR server (sekmet) as a clinician.

The OAuth launch is proven against the sandbox EHR (test_smart_launch_e2e.py) and, case by case, in
the unit tests; here the launch is seeded so the test can look at what a clinician sees: the values,
the markers, keyboard access to the charts, the accessibility rules, and that nothing is fetched
from anywhere but fhir-bridge.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from tests.conftest import AppFactory
from tests.support.browser import axe_violations, chromium_context, require_chromium, screenshot
from tests.support.sekmet import SekmetServer
from tests.support.smart_seed import ThreadedServer, load_into, patient_history, put_patient, seed_launch

pytestmark = [pytest.mark.browser, pytest.mark.ehr]


@pytest.fixture(scope="module")
def patient(sekmet: SekmetServer) -> dict[str, Any]:
    """A patient with 8 months of app data in the EHR, and another patient's data next to it."""
    pid = f"e2e-{uuid.uuid4().hex[:12]}"
    put_patient(sekmet.base_url, pid, given="Jordan", family="Okafor")
    history = patient_history(pid, count=600, seed=11)
    load_into(sekmet.base_url, history)
    load_into(sekmet.base_url, patient_history(f"other-{pid}", count=30, seed=5))
    phq9 = sorted(
        (r["effectiveDateTime"], r["valueQuantity"]["value"])
        for r in history
        if r["code"]["coding"][0]["code"] == "44261-6"
    )
    return {"id": pid, "phq9": phq9}


@pytest.fixture
def dashboard(
    make_app: AppFactory, sekmet: SekmetServer, patient: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    require_chromium()
    from tests.support.procs import free_port

    port = free_port()
    app: Flask = make_app(PUBLIC_URL=f"http://127.0.0.1:{port}", ALLOW_INSECURE_LOOPBACK=True)
    from fhir_bridge import services
    from fhir_bridge.storage.models import Tenant

    with app.app_context(), services.current().db.transaction() as session:
        session.add(Tenant(id="sek", name="Sekmet EHR", fhir_base_url=sekmet.base_url, smart_client_id="c"))
    launch_id, handle = seed_launch(app, tenant_id="sek", patient_id=patient["id"], access_token="unused")
    with ThreadedServer(app, port) as server, chromium_context() as context:
        context.add_cookies([{"name": "fhir-bridge-dev", "value": handle, "url": server.url}])
        page = context.new_page()
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(f"{server.url}/app/{launch_id}/")
        page.wait_for_selector("body[data-state=ready]", timeout=60_000)
        yield {"page": page, "server": server, "requested": requested, "launch": launch_id}


def test_dashboard_shows_the_launched_patients_data(
    dashboard: dict[str, Any], patient: dict[str, Any]
) -> None:
    page = dashboard["page"]
    assert page.inner_text("#patient-name") == "Jordan Okafor"
    baseline, latest = patient["phq9"][0][1], patient["phq9"][-1][1]
    summary = page.inner_text("#phq9-summary")
    assert f"Latest PHQ-9 {latest}" in summary
    assert f"since baseline {baseline}" in summary
    assert page.locator("#chart-phq9 path.line").count() == 1
    assert (
        page.locator(
            "#chart-phq9 .marker.baseline, #chart-phq9 .marker.response, #chart-phq9 .marker.remission"
        ).count()
        >= 1
    )
    for chart in ("#chart-gad7", "#chart-dwai", "#chart-dwai-themes", "#chart-sleep", "#chart-steps"):
        assert page.locator(f"{chart} svg.chart-svg").count() == 1, chart
    assert (
        page.locator("#calendar rect.day.use-1, #calendar rect.day.use-2, #calendar rect.day.use-3").count()
        > 100
    )
    assert "Last data from the app" in page.inner_text("#engagement-summary")
    # Text alternative: the data table holds the same values.
    page.click("#chart-phq9 details summary")
    first_row = page.locator("#chart-phq9 table tbody tr").first.inner_text()
    assert str(latest) in first_row
    screenshot(page, "dashboard-sekmet.png")


def test_charts_are_usable_with_the_keyboard_and_follow_the_time_range(dashboard: dict[str, Any]) -> None:
    page = dashboard["page"]
    page.focus("#chart-phq9 svg")
    page.keyboard.press("End")
    tip = page.inner_text("#chart-phq9 .tooltip")
    assert re.search(r"PHQ-9: \d+", tip)
    page.keyboard.press("ArrowLeft")
    assert page.inner_text("#chart-phq9 .tooltip") != tip
    assert page.inner_text("#chart-phq9 .sr-only[aria-live]") == page.inner_text("#chart-phq9 .tooltip")
    six_months = page.inner_text("#chart-steps .chart-desc")
    page.click("button[data-days='90']")
    assert page.get_attribute("button[data-days='90']", "aria-pressed") == "true"
    assert page.inner_text("#chart-steps .chart-desc") != six_months


def test_dashboard_passes_axe_and_fetches_nothing_from_elsewhere(dashboard: dict[str, Any]) -> None:
    page = dashboard["page"]
    violations = axe_violations(page)
    assert violations == [], violations
    origin = dashboard["server"].url
    assert all(url.startswith((origin, "data:")) for url in dashboard["requested"]), dashboard["requested"]


def test_request_follow_up_from_the_page(dashboard: dict[str, Any]) -> None:
    page = dashboard["page"]
    page.click(".follow-up summary")
    page.select_option("#fu-reason", "no-response")
    page.fill("#fu-note", "Flat PHQ-9 for 8 weeks")
    page.click("#follow-up-form button[type=submit]")
    page.locator("#follow-up-form .form-status").filter(has_text="Follow-up requested").wait_for(
        timeout=10_000
    )
