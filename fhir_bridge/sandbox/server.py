"""Serving the sandbox EHR under gunicorn on its own port (`fhir-bridge sandbox serve`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from fhir_bridge.sandbox.runtime import SandboxConfig


class _SandboxGunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any], factory_kwargs: dict[str, Any]) -> None:
        self.options = options
        self.factory_kwargs = factory_kwargs
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from fhir_bridge.sandbox.app import create_sandbox_app

        return create_sandbox_app(**self.factory_kwargs)


def run_sandbox(
    config: SandboxConfig,
    *,
    host: str,
    port: int,
    clients_file: Path | None,
    bridge_url: str | None,
    bridge_tenants: Sequence[str] = ("sandbox",),
    log_level: str = "INFO",
    log_format: str = "json",
) -> None:
    """One process (the database is one SQLite file), several threads; stops cleanly on SIGINT/SIGTERM."""
    options = {
        "bind": f"{host}:{port}",
        "workers": 1,
        "worker_class": "gthread",
        "threads": 8,
        "accesslog": None,  # our access log leaves out query strings
        "errorlog": "-",
        "loglevel": log_level.lower(),
        "timeout": 120,
        "graceful_timeout": 10,
        # gunicorn's control socket has one default path per user: the bridge's own gunicorn may need it.
        "control_socket_disable": True,
    }
    _SandboxGunicorn(
        options,
        {
            "config": config,
            "clients_file": clients_file,
            "bridge_url": bridge_url,
            "bridge_tenants": tuple(bridge_tenants),
            "log_level": log_level,
            "log_format": log_format,
        },
    ).run()
