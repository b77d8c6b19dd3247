"""The sandbox EHR in headless Chromium: its chart launches an app inside an iframe, like a real EHR.

A tiny server-side SMART app (tests/support/tiny_smart_app.py) stands in for the client, so this
test is about the EHR side: the chart's launch button, the framed launch through the authorize
endpoint (CSP, iframe sandbox, redirects), and the standalone sign-in page with its patient picker.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.procs import missing
from tests.support.sandbox import SandboxServer
from tests.support.tiny_smart_app import TinySmartApp

if TYPE_CHECKING:  # imported when the fixture runs, so collection does not need playwright
    from playwright.sync_api import Browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        missing("Chromium", "apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield instance
        instance.close()


@pytest.fixture
def tiny_app(sandbox_server: SandboxServer) -> Iterator[TinySmartApp]:
    client_id = f"tiny-{uuid.uuid4().hex[:6]}"
    with TinySmartApp(client_id=client_id, iss=sandbox_server.fhir_base) as app:
        sandbox_server.register(
            client_id,
            name=f"Tiny app {client_id}",
            redirect_uris=[f"{app.url}/callback"],
            launch_url=f"{app.url}/launch",
            standalone_url=f"{app.url}/standalone",
        )
        yield app
        sandbox_server.admin("DELETE", f"/clients/{client_id}")


def test_launch_from_the_chart_runs_the_app_framed_for_that_patient(
    browser: Browser, sandbox_server: SandboxServer, tiny_app: TinySmartApp
) -> None:
    page = browser.new_page()
    page.goto(sandbox_server.url + "/")
    assert page.get_by_role("note").inner_text().startswith("SANDBOX EHR")
    page.get_by_role("button", name=f"Launch Tiny app {tiny_app.client_id} for Jordan Blake").click()
    frame = page.frame_locator("iframe.app")
    frame.get_by_role("heading", name="Patient: sbx-patient-2").wait_for(timeout=15_000)
    assert "Jordan Blake" in page.locator(".patient-banner").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "sandbox-chart-launch.png"), full_page=True)
    assert tiny_app.tokens[-1]["need_patient_banner"] is False
    page.close()


def test_standalone_launch_signs_in_and_picks_a_patient(
    browser: Browser, sandbox_server: SandboxServer, tiny_app: TinySmartApp
) -> None:
    page = browser.new_page()
    page.goto(sandbox_server.url + "/")
    with page.expect_popup() as popup_info:
        page.get_by_role("link", name=f"Standalone launch: Tiny app {tiny_app.client_id}").click()
    popup = popup_info.value
    popup.get_by_role("radio", name="Sam Okafor").check()
    ARTIFACTS.mkdir(exist_ok=True)
    popup.screenshot(path=str(ARTIFACTS / "sandbox-standalone-sign-in.png"), full_page=True)
    popup.get_by_role("button", name="Allow").click()
    popup.get_by_role("heading", name="Patient: sbx-patient-3").wait_for(timeout=15_000)
    assert tiny_app.tokens[-1]["need_patient_banner"] is True
    page.close()
