"""Headless Debian Chromium for browser tests, driven by playwright (never a downloaded browser)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.procs import missing

CHROMIUM = "/usr/bin/chromium"
# TESTING.md: without the background-networking flags Chromium tries to reach the internet.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
AXE = Path(__file__).resolve().parents[1] / "e2e" / "assets" / "axe-core" / "axe.min.js"


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        missing("Debian's chromium", "apt-get install -y chromium")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing("playwright (Python)", "pip install playwright (part of the dev extra)")


@contextmanager
def chromium_context(**options: Any) -> Iterator[Any]:
    """A fresh profile (user-data-dir) per context, deleted afterwards."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="fhir-bridge-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=FLAGS,
                viewport=options.pop("viewport", {"width": 1300, "height": 900}),
                **options,
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def axe_violations(page: Any) -> list[dict[str, Any]]:
    """Run axe-core (WCAG 2 A and AA rules) in the page; injected over DevTools, so our CSP still holds."""
    page.evaluate(AXE.read_text(encoding="utf-8"))
    result = page.evaluate(
        """async () => {
          const tags = ['wcag2a', 'wcag2aa', 'wcag21aa'];
          const r = await axe.run(document, {runOnly: {type: 'tag', values: tags}});
          return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                         nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))}));
        }"""
    )
    return list(result)
