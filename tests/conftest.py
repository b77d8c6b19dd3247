"""Fixtures shared by every layer: apps built by the factory, databases on both backends, real servers.

Servers (PostgreSQL, the third-party FHIR server) start once per session on free loopback ports and
stop by their own PID at the end. With CI=true a missing component fails the test instead of skipping.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_bridge import create_app, services
from fhir_bridge.settings import load_settings
from fhir_bridge.storage import Database, migrate
from tests.support.postgres import PostgresServer, find_bin_dir
from tests.support.procs import missing
from tests.support.sandbox import SandboxServer
from tests.support.sekmet import SekmetServer, sekmet_executable


@pytest.fixture(scope="session")
def session_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One signing key for the whole session: generating RSA keys per test would dominate run time."""
    from auth.keys import Keyring

    folder = tmp_path_factory.mktemp("keys")
    Keyring(folder).ensure()
    return folder


@pytest.fixture
def keys_dir(session_keys: Path, tmp_path: Path) -> Path:
    """A private copy of the session key folder, so a test may rotate keys without affecting others."""
    folder = tmp_path / "keys"
    shutil.copytree(session_keys, folder)
    return folder


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        missing("PostgreSQL", "apt-get install -y postgresql (or `make test`, which installs it)")
    assert bin_dir is not None
    server = PostgresServer(bin_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend in turn (the same test runs on both)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.create_database()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


AppFactory = Callable[..., Flask]


@pytest.fixture
def make_app(tmp_path: Path, keys_dir: Path, sqlite_url: str) -> Iterator[AppFactory]:
    """Build an app on a migrated database; keyword arguments override settings. Each app's database
    connections are closed when the test ends (no connection left to the garbage collector)."""
    built: list[Flask] = []

    def build(**overrides: Any) -> Flask:
        config: dict[str, Any] = {
            "TESTING": True,
            "INSTANCE_PATH": str(tmp_path / "instance"),
            "KEYS_DIR": str(keys_dir),
            "DATABASE_URL": sqlite_url,
            "LOG_FORMAT": "json",
        }
        config.update({k.upper(): v for k, v in overrides.items()})
        settings = load_settings(config, environ={})
        db = Database(settings.effective_database_url)
        migrate.upgrade(db)
        db.dispose()
        app = create_app(config)
        built.append(app)
        return app

    yield build
    for app in built:
        services.from_app(app).db.dispose()


@pytest.fixture
def app(make_app: AppFactory) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="session")
def sekmet() -> Iterator[SekmetServer]:
    """The third-party FHIR server, auth off (tests of the write path with auth start their own)."""
    if sekmet_executable() is None:
        missing("the sekmet FHIR server", "pip install 'sekmet-fhir==0.1.1' (part of the dev extra)")
    server = SekmetServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    """The sandbox EHR (`fhir-bridge sandbox serve`) as a real process; tests register their own apps."""
    server = SandboxServer()
    server.start()
    yield server
    server.cleanup()
