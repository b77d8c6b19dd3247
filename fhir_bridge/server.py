"""Running the WSGI app under gunicorn, from `fhir-bridge serve` (no separate gunicorn config needed)."""

from __future__ import annotations

import contextlib
import gc
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

        app = create_app()
        settle_heap(app)
        return app


# Generation-0 collection threshold for web workers (CPython's default is 700 allocations).
GC_GEN0_THRESHOLD = 20_000


def settle_heap(app: Any) -> None:
    """Load the mapping catalogue, then take everything alive so far out of the cyclic GC's view.

    Why: a push of 1,000 records allocates tens of thousands of containers that live until the
    transaction ends, so CPython's default thresholds run a collection every 700 allocations and
    each older-generation pass walks the whole heap again: the app, SQLAlchemy, ``fhir.resources``
    and the compiled catalogue. Profiling a batch push showed a third of its CPU in those passes.
    ``gc.freeze()`` (made for forking servers) moves what exists at startup, which lives as long as
    the process, out of every future pass; a larger generation-0 threshold lets a batch's short-lived
    objects die by reference count before a pass starts. Cycles are still collected, just less often.
    """
    from fhir_bridge import services
    from fhir_bridge.catalog import catalog_for
    from mappings import MappingSpecError

    # A broken catalogue is reported where it is used, as it would be without this warm-up.
    with app.app_context(), contextlib.suppress(MappingSpecError):
        catalog_for(services.current().settings)
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


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
        # Scheme headers from the same proxies fhir_bridge.ops.proxy believes (one list, one truth).
        "forwarded_allow_ips": ",".join(settings.trusted_proxies),
        # gunicorn 27's control socket has one path per user; two services on a host would fight over it.
        "control_socket_disable": True,
    }
    _Gunicorn(options).run()
