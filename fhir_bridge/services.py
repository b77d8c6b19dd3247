"""What one process shares: settings, database, signing keys, data cipher. Built once, passed around.

Views reach it with :func:`current`; the CLI and the worker build it with :func:`build_services`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app

from auth.keys import Keyring
from fhir_bridge.crypto import DataCipher
from fhir_bridge.instance import ensure_folder, read_or_create_secret
from fhir_bridge.settings import Settings
from fhir_bridge.storage import Database

_KEY = "fhir_bridge"


@dataclass
class Services:
    settings: Settings
    db: Database
    keyring: Keyring
    cipher: DataCipher
    secret_key: str


def build_services(settings: Settings) -> Services:
    """Open the database, load (or generate on first start) keys and secrets from the instance folder."""
    instance = ensure_folder(settings.instance_path)
    secret_key = settings.secret_key or read_or_create_secret(instance / "secret_key")
    data_key = settings.data_key or read_or_create_secret(instance / "data_key", kind="fernet")
    keyring = Keyring(settings.keys_path, alg=settings.signing_alg)
    keyring.ensure()
    return Services(
        settings=settings,
        db=Database(settings.effective_database_url),
        keyring=keyring,
        cipher=DataCipher(data_key),
        secret_key=secret_key,
    )


def install(app_extensions: dict[str, object], services: Services) -> None:
    app_extensions[_KEY] = services


def from_app(app: Flask) -> Services:
    services = app.extensions[_KEY]
    assert isinstance(services, Services)
    return services


def current() -> Services:
    services = current_app.extensions[_KEY]
    assert isinstance(services, Services)
    return services
