"""Dashboard benchmark (TARGETS.md): server time for 10,000 Observations, and time to interactive.

1. The third-party FHIR server (sekmet) gets 10,000 Observations for one patient (plus a few for
   another patient, which the dashboard must skip).
2. fhir-bridge serves the dashboard on loopback with a launch for that patient.
3. Server time: ``GET /app/<launch>/api/summary`` (every search, parsing, series, markers, JSON),
   median of several runs, next to the **floor**: the same searches fetched with a bare
   ``requests`` client and parsed with orjson, in the same run. Target ratio <= 1.3.
4. Browser: headless Chromium opens the dashboard and shows "All" (every point drawn); the page's
   own Performance API marks give the time from data arrival to interactive. Target <= 1 s.

Run: ``python -m bench dashboard [--observations N] [--runs N] [--no-browser]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import requests

from tests.support.sekmet import SekmetServer
from tests.support.smart_seed import ThreadedServer, load_into, patient_history, put_patient, seed_launch

PATIENT = "bench-p1"


def floor_fetch(base: str, token: str) -> int:
    """The same requests the dashboard makes, with a bare client: paged search + orjson, nothing else."""
    session = requests.Session()
    session.headers.update({"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"})
    count = 0
    url: str | None = f"{base}/Observation?patient={PATIENT}&_count=1000"
    while url:
        page = orjson.loads(session.get(url, timeout=120).content)
        count += len(page.get("entry") or [])
        url = next((link["url"] for link in page.get("link") or [] if link.get("relation") == "next"), None)
    for path in (
        f"Flag?patient={PATIENT}&_count=100",
        f"Task?patient={PATIENT}&_count=100",
        f"Patient/{PATIENT}",
    ):
        orjson.loads(session.get(f"{base}/{path}", timeout=60).content)
    return count


def build_app(tmp: Path, fhir_base: str, port: int) -> Any:
    from fhir_bridge import create_app, services
    from fhir_bridge.settings import load_settings
    from fhir_bridge.storage import Database, migrate
    from fhir_bridge.storage.models import Tenant

    config = {
        "INSTANCE_PATH": str(tmp / "instance"),
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "ALLOW_INSECURE_LOOPBACK": "true",
        "LOG_LEVEL": "WARNING",
    }
    db = Database(load_settings(config, environ={}).effective_database_url)
    migrate.upgrade(db)
    db.dispose()
    app = create_app(config)
    with app.app_context(), services.current().db.transaction() as session:
        session.add(
            Tenant(
                id="bench",
                name="Bench EHR",
                fhir_base_url=fhir_base,
                smart_client_id="bench",
                frame_ancestors=[],
            )
        )
    return app


def browser_times(url: str, handle: str, runs: int) -> tuple[float, float, float]:
    """Medians in ms: data -> interactive, navigation -> interactive, redraw of "All" (every point)."""
    data_to_ready, nav_to_ready, redraw_all = browser_samples(url, handle, runs)
    return statistics.median(data_to_ready), statistics.median(nav_to_ready), statistics.median(redraw_all)


def browser_samples(url: str, handle: str, runs: int) -> tuple[list[float], list[float], list[float]]:
    """Every run's ms: data -> interactive, navigation -> interactive, redraw of "All" (every point)."""
    from playwright.sync_api import sync_playwright

    data_to_ready: list[float] = []
    nav_to_ready: list[float] = []
    redraw_all: list[float] = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path="/usr/bin/chromium",
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
            viewport={"width": 1400, "height": 1000},
        )
        context.add_cookies([{"name": "fhir-bridge-dev", "value": handle, "url": url}])
        page = context.new_page()
        for _ in range(runs):
            page.goto(url)
            page.wait_for_selector("body[data-state=ready]", timeout=120_000)
            marks = page.evaluate(
                """() => ({
                  data: performance.getEntriesByName('fb-data')[0].startTime,
                  ready: performance.getEntriesByName('fb-interactive')[0].startTime,
                })"""
            )
            data_to_ready.append(marks["ready"] - marks["data"])
            nav_to_ready.append(marks["ready"])
            # "All" redraws every chart with every point, synchronously in the click handler.
            redraw_all.append(
                page.evaluate(
                    """() => {
                      const t = performance.now();
                      document.querySelector("button[data-days='0']").click();
                      return performance.now() - t;
                    }"""
                )
            )
        context.close()
    return data_to_ready, nav_to_ready, redraw_all


def measure(observations: int, runs: int, browser: bool) -> dict[str, Any]:
    """Every run's figures (ms): ``server`` and ``floor`` for the summary, ``tti`` etc. for the browser."""
    out: dict[str, Any] = {"server": [], "floor": [], "points": 0}
    sekmet = SekmetServer()
    sekmet.start()
    try:
        started = time.perf_counter()
        put_patient(sekmet.base_url, PATIENT)
        load_into(sekmet.base_url, patient_history(PATIENT, count=observations))
        load_into(sekmet.base_url, patient_history("bench-other", count=50, seed=3))
        out["seed_seconds"] = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            from tests.support.procs import free_port

            port = free_port()
            app = build_app(Path(tmp), sekmet.base_url, port)
            launch_id, handle = seed_launch(
                app, tenant_id="bench", patient_id=PATIENT, access_token="bench-token"
            )
            with ThreadedServer(app, port) as server:
                client = requests.Session()
                client.cookies.set("fhir-bridge-dev", handle, domain="127.0.0.1")
                summary_url = f"{server.url}/app/{launch_id}/api/summary"
                for run in range(runs + 1):
                    t0 = time.perf_counter()
                    fetched = floor_fetch(sekmet.base_url, "bench-token")
                    t1 = time.perf_counter()
                    response = client.get(summary_url, timeout=300)
                    t2 = time.perf_counter()
                    response.raise_for_status()
                    body = response.json()
                    out["points"] = sum(len(s["t"]) for s in body["series"].values())
                    if run:  # the first run warms caches on both sides
                        out["floor"].append((t1 - t0) * 1000)
                        out["server"].append((t2 - t1) * 1000)
                assert fetched >= observations, fetched
                assert body["dropped"]["other_patient"] == 0
                if browser:
                    page_url = f"{server.url}/app/{launch_id}/"
                    out["tti"], out["nav"], out["redraw"] = browser_samples(
                        page_url, handle, max(3, runs // 2)
                    )
    finally:
        sekmet.cleanup()
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench dashboard")
    parser.add_argument("--observations", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args(argv)
    got = measure(args.observations, args.runs, not args.no_browser)
    print(f"seeded {args.observations} Observations in {got['seed_seconds']:.1f} s")
    ours, floor, points = got["server"], got["floor"], got["points"]
    ratio = statistics.median(ours) / statistics.median(floor)
    print()
    print(f"{'figure':58} {'value':>10} {'floor':>10} {'ratio':>7}")
    print(
        f"{'dashboard server time, ' + str(args.observations) + ' Observations (ms, median)':58} "
        f"{statistics.median(ours):10.0f} {statistics.median(floor):10.0f} {ratio:7.2f}"
    )
    print(f"{'points drawn':58} {points:10d}")
    if "tti" in got:
        render, total, redraw = (statistics.median(got[k]) for k in ("tti", "nav", "redraw"))
        print(f"{'browser: data arrived -> interactive, 6 months shown (ms)':58} {render:10.0f}")
        print(f"{'browser: navigation -> interactive (ms)':58} {total:10.0f}")
        print(f"{f'browser: redraw of All, {points} points (ms)':58} {redraw:10.0f}")
    return 0
