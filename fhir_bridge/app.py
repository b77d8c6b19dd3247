"""The Flask application factory: settings in, a configured app out, no import-time side effects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from fhir_bridge import api, errors, services
from fhir_bridge.ops import health, logs, metrics
from fhir_bridge.ops.proxy import TrustedProxies, parse_networks
from fhir_bridge.rules import engine as rules_engine
from fhir_bridge.settings import load_settings


def create_app(config: Mapping[str, Any] | None = None, *, svc: services.Services | None = None) -> Flask:
    """Build the service. ``config`` overrides settings (tests pass a dict); ``svc`` injects services."""
    from fhir_bridge.catalog import catalog_for

    settings = svc.settings if svc is not None else load_settings(config)
    logs.configure_logging(settings.log_level, settings.log_format)
    svc = svc or services.build_services(settings)

    app = Flask("fhir_bridge", instance_path=str(settings.instance_path.resolve()))
    app.config.update(settings.extra)
    app.config.update(
        SECRET_KEY=svc.secret_key,
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        JSON_SORT_KEYS=False,
    )
    services.install(app.extensions, svc)
    rules_engine.check_rules(settings.rules_dir)  # likewise every rule file (file and field named)
    catalog_for(settings)  # every mapping spec is checked now: a bad one stops start-up with file and line

    logs.init_app(app)
    errors.init_app(app)
    if settings.metrics_enabled:
        metrics.init_app(app, svc.db)
    app.register_blueprint(health.bp)
    api.init_app(app)

    import smart_app  # imported here: smart_app depends on fhir_bridge, not the other way round

    smart_app.init_app(app)
    if settings.worker_embedded:
        # Delivery in the same process (the single-machine default): daemon threads, see delivery.worker.
        from fhir_bridge.delivery import BackgroundWorker

        app.extensions["fhir_bridge.worker"] = BackgroundWorker(svc).start()
    app.wsgi_app = TrustedProxies(app.wsgi_app, parse_networks(settings.trusted_proxies))  # type: ignore[method-assign]
    return app
