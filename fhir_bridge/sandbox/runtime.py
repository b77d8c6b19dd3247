"""What one sandbox process holds: its settings, database, FHIR store and keys (built once, per app)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import current_app
from joserfc.jwk import RSAKey

from fhir_bridge.sandbox.client_keys import ClientKeyResolver
from fhir_bridge.sandbox.db import SandboxDatabase
from fhir_bridge.sandbox.store import FhirStore

_KEY = "fhir_bridge.sandbox"


@dataclass(frozen=True)
class SandboxConfig:
    """How a sandbox EHR is set up. Every default works on one machine (development and demos only)."""

    data_dir: Path
    public_url: str = "http://127.0.0.1:9090"
    # Lifetimes in seconds.
    code_lifetime: int = 60
    launch_lifetime: int = 600
    access_token_lifetime: int = 3600
    backend_token_lifetime: int = 300
    refresh_token_lifetime: int = 30 * 86400
    # Bearer token of the admin API; empty means generate one into the data folder (mode 0600).
    admin_token: str = ""
    # Create the demo patients, practitioner and encounters when the store is empty.
    seed: bool = True

    @property
    def fhir_base(self) -> str:
        return self.public_url.rstrip("/") + "/fhir"

    @property
    def issuer(self) -> str:
        """The OpenID Connect issuer of id_tokens: the FHIR base, so apps find openid-configuration there."""
        return self.fhir_base

    def url(self, path: str) -> str:
        return self.public_url.rstrip("/") + "/" + path.lstrip("/")


@dataclass
class Sandbox:
    config: SandboxConfig
    db: SandboxDatabase
    store: FhirStore
    id_token_key: RSAKey
    client_keys: ClientKeyResolver
    admin_token: str
    secret_key: str
    # The Authlib AuthorizationServer (untyped library object), set by the app factory.
    oauth_server: Any = None


def install(extensions: dict[str, Any], sandbox: Sandbox) -> None:
    extensions[_KEY] = sandbox


def current() -> Sandbox:
    sandbox = current_app.extensions[_KEY]
    assert isinstance(sandbox, Sandbox)
    return sandbox


def load_or_create_signing_key(path: Path) -> RSAKey:
    """The RS256 key that signs id_tokens (OpenID Connect's mandatory algorithm), made on first start."""
    try:
        return RSAKey.import_key(json.loads(path.read_text()))
    except FileNotFoundError:
        pass
    key = RSAKey.generate_key(2048, parameters={"alg": "RS256", "use": "sig"}, private=True)
    data = key.as_dict(private=True) | {"kid": key.thumbprint(), "alg": "RS256", "use": "sig"}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return RSAKey.import_key(json.loads(path.read_text()))
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    return RSAKey.import_key(data)
