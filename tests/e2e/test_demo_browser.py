"""The demo as a visitor sees it: `fhir-bridge demo`, its URL in Chromium, the non-responder's dashboard.

Issue 7's "done when": the demo runs as a subprocess; the browser opens the one URL it prints (the
sandbox EHR's chart), clicks "Launch fhir-bridge" for the non-responder (Alex Rivera), and finds the
dashboard with the app's data, written by the bridge's worker into the EHR and read back from it
through the SMART launch, and an alert. The alert is raised by the rules engine (issue 8).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.support.browser import chromium_context, require_chromium, screenshot
from tests.support.demo import DemoProcess, alive

pytestmark = [pytest.mark.browser]

NON_RESPONDER = "Alex Rivera"
ALERT_WAIT = 20.0  # seconds the rules engine gets after delivery before the alert counts as missing


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_chromium()
    root = tmp_path_factory.mktemp("demo")
    process = DemoProcess("--port", "0", "--days", "120", "--data-dir", str(root / "data"), cwd=root)
    try:
        [url] = process.stdout_lines()
        yield {"process": process, "url": url, "logs": root / "data" / "logs"}
    finally:
        if process.proc.poll() is None:
            process.kill_all()


def _launch_non_responder(context: Any, url: str, logs: Path) -> tuple[Any, Any]:
    page = context.new_page()
    page.goto(url)
    assert page.get_by_role("note").inner_text().startswith("SANDBOX EHR")
    page.get_by_role("button", name=f"Launch fhir-bridge for {NON_RESPONDER}").click()
    frame = page.wait_for_selector("iframe.app", timeout=30_000).content_frame()
    assert frame is not None
    try:
        frame.wait_for_selector("body[data-state=ready]", timeout=60_000)
    except PlaywrightTimeout:
        screenshot(page, "demo-launch-failed.png")
        pytest.fail(f"the dashboard did not get ready; it is at {frame.url}; logs in {logs}")
    return page, frame


def test_the_non_responder_launched_from_the_demo_chart_has_data_and_an_alert(demo: dict[str, Any]) -> None:
    with chromium_context() as context:
        page, frame = _launch_non_responder(context, demo["url"], demo["logs"])
        assert frame.inner_text("#patient-name") == NON_RESPONDER
        # The app's data, as the EHR holds it: baseline 15 and a flat course (12-16) afterwards.
        summary = frame.inner_text("#phq9-summary")
        assert "since baseline 15" in summary, summary
        data = frame.evaluate("async () => (await fetch('api/summary')).json()")
        phq9 = data["series"]["phq9"]["v"]
        assert len(phq9) >= 14 and all(12 <= v <= 16 for v in phq9)
        for chart in (
            "#chart-phq9",
            "#chart-gad7",
            "#chart-dwai",
            "#chart-dwai-themes",
            "#chart-sleep",
            "#chart-steps",
        ):
            assert frame.locator(f"{chart} svg.chart-svg").count() == 1, chart
        assert frame.locator(".notice").count() == 0, frame.inner_text("#notices")
        # "End enrollment" asks for confirmation only once clicked.
        assert frame.locator(".confirm-end").count() >= 1
        assert not frame.locator(".confirm-end").first.is_visible()

        # The same dashboard on its own page, every panel in one picture (README walkthrough).
        whole = context.new_page()
        whole.set_viewport_size({"width": 1300, "height": 900})
        whole.goto(frame.url)
        whole.wait_for_selector("body[data-state=ready]", timeout=60_000)
        shot = screenshot(whole, "demo-dashboard.png")
        screenshot(page, "demo-chart-launch.png")
        assert shot.exists()  # docs/demo-dashboard.png is a copy of it (README walkthrough)

        # The alert: "no response" (PHQ-9 down less than 50 % at 8 weeks), from the rules engine. It
        # may be raised a moment after delivery, so the summary is asked again for a little while.
        alerts = data["alerts"]
        deadline = time.monotonic() + ALERT_WAIT
        while not (alerts["bridge"] or alerts["ehr"]) and time.monotonic() < deadline:
            time.sleep(1)
            alerts = frame.evaluate("async () => (await fetch('api/summary')).json()")["alerts"]
        if not (alerts["bridge"] or alerts["ehr"]):
            pytest.xfail(
                reason="issue 8 (rules engine, branch `rules`) has not landed: no alert is raised yet; "
                "the lead removes this xfail at merge"
            )
        rules = {a["rule"] for a in alerts["bridge"]}
        assert "no-response" in rules or any("respon" in a.get("text", "").lower() for a in alerts["ehr"]), (
            alerts
        )
        assert not rules & {"safety-item9", "disengagement", "alliance-drop", "severe"}, rules
        whole.reload()
        whole.wait_for_selector("body[data-state=ready]", timeout=60_000)
        assert whole.locator("#alerts li.alert").count() >= 1, whole.inner_text("#alerts")
        screenshot(whole, "demo-dashboard-alert.png")


def test_ctrl_c_stops_the_demo_and_every_process_it_started(demo: dict[str, Any]) -> None:
    process: DemoProcess = demo["process"]
    started = process.descendants()
    assert len(started) >= 3
    assert process.stop() == 0
    assert alive(started) == set(), "processes outlived the demo"
