"""The wheel carries everything the service needs: built, installed in a fresh venv, and run from there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.support.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[2]


def _clean_env() -> dict[str, str]:
    """Nothing from this checkout may leak into the fresh venv (PYTHONPATH would make pip skip installing)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FHIR_BRIDGE_") and k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    # Built from a copy without setuptools' build/ folder: a stale one (a migration renamed since)
    # would otherwise slip old files into the wheel.
    source = work / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "*.egg-info",
            "__pycache__",
            "node_modules",
            "test-artifacts",
            "bench-results",
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(source)],
        check=True,
        timeout=600,
    )
    (wheel,) = (work / "dist").glob("fhir_bridge-*.whl")
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    subprocess.run(
        # The postgres extra too: the wheel must declare what `db upgrade` on PostgreSQL needs.
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[postgres]"],
        check=True,
        timeout=900,
        env=_clean_env(),
        cwd=work,
    )
    return env_dir


def _run(
    env_dir: Path, *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(env_dir / "bin" / "fhir-bridge"), *args],
        cwd=cwd,
        env={**_clean_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_help_runs_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    result = _run(installed, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout and "db" in result.stdout


def test_migrations_ship_in_the_wheel(installed: Path, tmp_path: Path) -> None:
    result = _run(installed, "db", "upgrade", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "instance" / "fhir-bridge.db").exists()
    # The package must come from the venv, not from this checkout.
    assert not (tmp_path / "fhir_bridge").exists()


@pytest.mark.postgres
def test_the_installed_wheel_migrates_postgresql(
    installed: Path, tmp_path: Path, pg_server: PostgresServer
) -> None:
    """`db upgrade` from the wheel on PostgreSQL (psycopg 3 from the extra), twice: it is idempotent."""
    env = {"FHIR_BRIDGE_DATABASE_URL": pg_server.create_database()}
    first = _run(installed, "db", "upgrade", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    again = _run(installed, "db", "upgrade", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    current = _run(installed, "db", "current", cwd=tmp_path, env=env)
    assert current.returncode == 0, current.stderr
    assert "up to date" in current.stdout, current.stdout
    assert not (tmp_path / "instance" / "fhir-bridge.db").exists()


def test_a_mapping_runs_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    """Specs, examples and the FHIR models ship in the wheel: `fhir-bridge map` works from it alone."""
    example = ROOT / "mappings" / "examples" / "phq9" / "item9-positive"
    shutil.copy(example.with_name(example.name + ".input.json"), tmp_path / "record.json")
    listed = _run(installed, "map", "--list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "phq9" in listed.stdout and "app-engagement" in listed.stdout
    result = _run(installed, "map", "phq9", "record.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = json.loads(example.with_name(example.name + ".expected.json").read_text())
    assert json.loads(result.stdout) == expected
    # The catalogue loaded is the installed one, with its golden examples beside it.
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c", "import mappings.catalog as c; print(c.DEFAULT_FOLDER)"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    folder = Path(where)
    assert str(installed) in where and (folder / "phq9.yaml").exists()
    assert (folder.parent / "examples" / "phq9" / "moderate.expected.json").exists()


def test_sandbox_ehr_ships_its_pages(installed: Path, tmp_path: Path) -> None:
    result = _run(installed, "sandbox", "serve", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    check = subprocess.run(
        [
            str(installed / "bin" / "python"),
            "-c",
            "import importlib.resources as r; t = r.files('fhir_bridge.sandbox') / 'templates';"
            "print((t / 'error.html').is_file(), (t / 'sandbox' / 'chart.html').is_file())",
        ],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.stdout.split() == ["True", "True"], check.stderr


def test_default_rules_ship_in_the_wheel(installed: Path, tmp_path: Path) -> None:
    result = _run(installed, "rules", "list", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ids = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert ids == ["safety-item9", "severe", "no-response", "disengagement", "alliance-drop"]
