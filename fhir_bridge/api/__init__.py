"""The vendor-facing API (described in openapi.yaml): token endpoint, enrollments, push, status, FHIR."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    from fhir_bridge.api import cds_hooks, enrollments, fhir, oauth, records, relationship

    oauth.init_app(app)
    cds_hooks.init_app(app)
    app.register_blueprint(enrollments.bp)
    app.register_blueprint(records.bp)
    app.register_blueprint(relationship.bp)
    app.register_blueprint(fhir.bp)
