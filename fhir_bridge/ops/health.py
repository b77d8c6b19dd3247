"""Liveness and readiness for load balancers and orchestrators, and the public JWKS."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from fhir_bridge import services
from fhir_bridge.storage import migrate

bp = Blueprint("ops", __name__)
log = logging.getLogger(__name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is up and answering. Says nothing about its dependencies, on purpose."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Ready for traffic: the database answers and its schema is at the migration head."""
    db = services.current().db
    checks: dict[str, str] = {}
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
        current = migrate.current_revision(db)
        head = migrate.head_revision()
        checks["migrations"] = "ok" if current == head else f"at {current or 'none'}, expected {head}"
    except SQLAlchemyError as exc:
        log.warning("readiness check failed", extra={"exception": type(exc).__name__})
        checks["database"] = "unreachable"
    ready = all(value == "ok" for value in checks.values())
    return jsonify(status="ready" if ready else "not-ready", checks=checks), 200 if ready else 503


@bp.get("/.well-known/jwks.json")
def jwks() -> Response:
    """Our public keys: EHRs verify our backend-services assertions with them, vendors our webhooks."""
    response = jsonify(services.current().keyring.jwks())
    # EHRs SHOULD honour this; short enough that a rotation's lead time covers it.
    response.headers["Cache-Control"] = "public, max-age=300"
    return response
