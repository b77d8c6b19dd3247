"""The sandbox EHR's application factory: its own Flask app, database file, keys and port.

It is not part of the product: nothing in the service imports it, and its tables live in their
own SQLite file created with ``create_all`` (no migrations). See the package docstring.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flask import Flask, Response, g

from fhir_bridge import errors
from fhir_bridge.errors import BridgeError
from fhir_bridge.instance import ensure_folder, read_or_create_secret
from fhir_bridge.ops import logs
from fhir_bridge.sandbox import admin, auth_views, chart, clients, fhir_api, oauth, runtime, seed, web
from fhir_bridge.sandbox.client_keys import ClientKeyResolver
from fhir_bridge.sandbox.db import SandboxDatabase
from fhir_bridge.sandbox.runtime import Sandbox, SandboxConfig
from fhir_bridge.sandbox.store import FhirStore

log = logging.getLogger("fhir_bridge.sandbox")

MAX_BODY_BYTES = 50 * 1024 * 1024


def bridge_clients(bridge_url: str, tenants: Sequence[str] = ("sandbox",)) -> list[dict[str, Any]]:
    """The registrations of a fhir-bridge at ``bridge_url``: its SMART app and its backend-services writer.

    The bridge's redirect URI is ``<PUBLIC_URL>/callback/<tenant id>`` (one per tenant, so a callback
    names the EHR it belongs to), hence one registered URI per tenant id this sandbox is known by.
    The standalone launch link names the first of them.
    """
    base = bridge_url.rstrip("/")
    if not tenants:
        raise BridgeError("the bridge needs at least one tenant id to register its redirect URI")
    return [
        {
            "client_id": "fhir-bridge",
            "name": "fhir-bridge",
            "auth_method": "public",
            "redirect_uris": [f"{base}/callback/{quote(t, safe='')}" for t in tenants],
            "launch_url": f"{base}/launch",
            "standalone_url": f"{base}/launch/standalone?tenant={quote(tenants[0], safe='')}",
        },
        {
            "client_id": "fhir-bridge-backend",
            "name": "fhir-bridge (backend services)",
            "auth_method": "private_key_jwt",
            "jwks_url": f"{base}/.well-known/jwks.json",
            "scopes": ["system/*.cruds"],
        },
    ]


def create_sandbox_app(
    config: SandboxConfig,
    *,
    clients_file: Path | None = None,
    bridge_url: str | None = None,
    bridge_tenants: Sequence[str] = ("sandbox",),
    log_level: str = "INFO",
    log_format: str = "json",
) -> Flask:
    """Build the sandbox EHR. On first start it creates its data folder, keys, secrets and demo data."""
    logs.configure_logging(log_level, log_format)
    data = ensure_folder(config.data_dir)
    database = SandboxDatabase(data / "sandbox.db")
    database.create_all()
    sandbox = Sandbox(
        config=config,
        db=database,
        store=FhirStore(config.fhir_base),
        id_token_key=runtime.load_or_create_signing_key(data / "id_token_key.json"),
        client_keys=ClientKeyResolver(),
        admin_token=config.admin_token or read_or_create_secret(data / "admin_token"),
        secret_key=read_or_create_secret(data / "secret_key"),
    )

    app = Flask(__name__, template_folder="templates")
    app.config.update(
        SECRET_KEY=sandbox.secret_key,
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        # Loopback ports share one cookie jar: a name of its own keeps it apart from the bridge's session.
        SESSION_COOKIE_NAME="fhir_bridge_sandbox_session",
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SECURE=config.public_url.startswith("https://"),
        # The authorize endpoint is a browser page: its refusals are pages too (errors.py).
        HTML_ERROR_PREFIXES=("/oauth/authorize",),
    )
    runtime.install(app.extensions, sandbox)
    logs.init_app(app, access_logger="fhir_bridge.sandbox.access")
    errors.init_app(app)
    _security_headers(app)

    app.register_blueprint(chart.bp)
    app.register_blueprint(auth_views.bp)
    app.register_blueprint(fhir_api.bp)
    app.register_blueprint(admin.bp)
    sandbox.oauth_server = oauth.build_server(app)

    with database.write() as session:
        if config.seed and seed.is_empty(session):
            count = seed.seed(session, sandbox.store)
            log.info("sandbox seeded with demo data", extra={"count": count})
        registrations = [
            ("--bridge-url", r) for r in (bridge_clients(bridge_url, bridge_tenants) if bridge_url else [])
        ]
        if clients_file is not None:
            registrations += [(str(clients_file), r) for r in clients.read_file(clients_file)]
        for source, registration in registrations:
            try:
                clients.register(session, registration["client_id"], registration)
            except BridgeError as exc:
                raise BridgeError(
                    f"{source}: client {registration['client_id'][:128]!r}: {exc.message}", code=exc.code
                ) from None
    log.warning(
        "SANDBOX EHR (development and demo only, synthetic data, never for real patients)",
        extra={"count": len(registrations)},
    )
    return app


def _security_headers(app: Flask) -> None:
    @app.context_processor
    def _template_globals() -> dict[str, Any]:
        return {"csp_nonce": web.csp_nonce, "banner": web.BANNER}

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers.setdefault("X-Sandbox-EHR", "development-and-demo-only")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if response.mimetype == "text/html":
            response.headers.setdefault("Content-Security-Policy", web.csp())
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.teardown_request
    def _forget_session(_exc: BaseException | None) -> None:
        g.pop("sandbox_db", None)
