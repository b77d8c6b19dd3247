"""Running the WSGI app under gunicorn, from `fhir-bridge serve` (no separate gunicorn config needed)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from gunicorn.app.base import BaseApplication

from fhir_bridge.settings import Settings


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from fhir_bridge.app import create_app

        return create_app()


def run_gunicorn(settings: Settings, *, host: str, port: int, workers: int) -> None:
    """Serve with ``workers`` processes. Metrics are aggregated across them through a shared folder."""
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fhir-bridge-metrics-")
    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": 4,
        # Our own access log (fhir_bridge.ops.logs) leaves out query strings; gunicorn's would not.
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        "timeout": 120,
        "graceful_timeout": 20,
        "forwarded_allow_ips": "127.0.0.1",
        # gunicorn 27's control socket has one path per user; two services on a host would fight over it.
        "control_socket_disable": True,
    }
    _Gunicorn(options).run()
