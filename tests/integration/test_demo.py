"""`fhir-bridge demo` as a process: one URL on stdout, a working chart behind it, nothing left after a stop.

The browser walk through the demo (launch, dashboard, alert) is tests/e2e/test_demo_browser.py;
here are the process-level promises: Ctrl-C, SIGTERM and a closed terminal (SIGHUP) stop every process
the demo started, a kept data folder restarts without pushing the data again, a temporary one is
removed, and a busy port is a clear error.
"""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import requests

from tests.support.demo import DemoProcess, alive


def _start(tmp_path: Path, *args: str) -> tuple[DemoProcess, str]:
    demo = DemoProcess("--port", "0", "--patients", "1", "--days", "10", *args, cwd=tmp_path)
    try:
        [url] = demo.stdout_lines()
    except BaseException:
        demo.kill_all()
        raise
    return demo, url


def test_demo_prints_the_chart_url_and_sigterm_stops_every_process_it_started(tmp_path: Path) -> None:
    demo, url = _start(tmp_path, "--data-dir", str(tmp_path / "data"))
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
        chart = requests.get(url, timeout=10)
        assert chart.status_code == 200
        assert "Alex Rivera" in chart.text and "Launch fhir-bridge" in chart.text
        assert "Ready in" in demo.stderr() and "Alex Rivera" in demo.stderr()
        started = demo.descendants()
        assert len(started) >= 3  # the EHR, the bridge and the worker (and gunicorn's workers)
    except BaseException:
        demo.kill_all()
        raise
    assert demo.stop(signal.SIGTERM) == 0
    assert alive(started) == set(), "processes outlived the demo"
    assert "demo stopped" in demo.stderr()
    assert not list((tmp_path / "data").glob("*.pid"))

    # A kept data folder: started again (Ctrl-C this time), the app's data is not pushed twice.
    again, url_again = _start(tmp_path, "--data-dir", str(tmp_path / "data"))
    try:
        assert "data from an earlier run is kept" in again.stderr()
        assert requests.get(url_again, timeout=10).status_code == 200
        started = again.descendants()
    except BaseException:
        again.kill_all()
        raise
    assert again.stop(signal.SIGINT) == 0
    assert alive(started) == set()


def test_a_temporary_demo_leaves_no_folder_and_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        demo = DemoProcess("--port", str(port), cwd=tmp_path)
        assert demo.proc.wait(timeout=60) == 1
        demo.stop()
        assert f"port {port} is in use" in demo.stderr()
    folder = re.search(r"data in (\S+)", demo.stderr())
    assert folder is not None and not Path(folder.group(1)).exists()


def test_a_closed_terminal_stops_a_temporary_demo_and_removes_its_folder(tmp_path: Path) -> None:
    demo, url = _start(tmp_path)
    try:
        folder = re.search(r"data in (\S+)", demo.stderr())
        assert folder is not None and Path(folder.group(1)).is_dir()
        assert requests.get(url, timeout=10).status_code == 200
        started = demo.descendants()
    except BaseException:
        demo.kill_all()
        raise
    assert demo.stop(signal.SIGHUP) == 0
    assert alive(started) == set()
    assert not Path(folder.group(1)).exists()
