"""Per-EHR delivery runtime: a FHIR client with its token source, write strategy, quirks and health.

Tenant rows are re-read every few seconds, so `fhir-bridge ehr add` takes effect in a running
worker without a restart; a runtime is rebuilt only when its row changed, so the cached access
token survives otherwise. Each runtime keeps a small circuit breaker: after a failure that concerns
the whole EHR (unreachable, no token, 429, 503) this worker leaves the tenant alone until the pause
ends, so an outage costs one probe per pause instead of one failed attempt per queued item.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import requests
from sqlalchemy import select

from auth.backend import BackendTokenSource, SmartConfigurationCache, UnsafeUrlError, require_secure_url
from auth.keys import Keyring
from fhir_bridge.delivery.writers import PROVENANCE_MODES, ProvenanceMode
from fhir_bridge.fhir_client import FhirClient, RequestLimiter, StackedLimiter
from fhir_bridge.ops import metrics
from fhir_bridge.settings import Settings
from fhir_bridge.storage import Database
from fhir_bridge.storage.models import Tenant

log = logging.getLogger(__name__)

# Types a tenant's EHR refuses conditional create for; they are written with PUT to their identifier.
QUIRK_NO_CONDITIONAL_CREATE = "no_conditional_create"
# How the batch Provenance is written: plain (default), conditional (on its batch tag) or off.
QUIRK_PROVENANCE = "provenance"
KNOWN_QUIRKS = frozenset({QUIRK_NO_CONDITIONAL_CREATE, QUIRK_PROVENANCE})


def validate_quirks(quirks: Any) -> dict[str, Any]:
    """The quirks object hospital IT may set; raises ValueError naming what is wrong."""
    if not isinstance(quirks, dict):
        raise ValueError("quirks must be a JSON object")
    unknown = sorted(set(quirks) - KNOWN_QUIRKS)
    if unknown:
        raise ValueError(f"unknown quirk(s): {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_QUIRKS))})")
    types = quirks.get(QUIRK_NO_CONDITIONAL_CREATE, [])
    if not isinstance(types, list) or not all(isinstance(t, str) and t.isalpha() for t in types):
        raise ValueError(f"{QUIRK_NO_CONDITIONAL_CREATE} must be a list of FHIR resource type names")
    if quirks.get(QUIRK_PROVENANCE, "plain") not in PROVENANCE_MODES:
        raise ValueError(f"{QUIRK_PROVENANCE} must be one of {', '.join(PROVENANCE_MODES)}")
    return quirks


@dataclass
class TenantRuntime:
    tenant_id: str
    updated_at: datetime | None
    strategy: str
    put_types: frozenset[str]
    client: FhirClient
    provenance: ProvenanceMode = "plain"
    # Backfill (priority >= 1) goes through this client: the tenant's backfill limit on top of its
    # overall one. None: the tenant set no backfill limit; backfill uses ``client``.
    backfill_client: FhirClient | None = None
    device_ids: dict[str, str] = field(default_factory=dict)
    failures: int = 0
    paused_until: float = 0.0  # time.monotonic()
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def paused(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) < self.paused_until

    def trip(self, *, base: float, cap: float, retry_after: float | None) -> float:
        """Record an EHR-wide failure; returns the seconds this worker now leaves the tenant alone."""
        with self._lock:
            self.failures += 1
            backoff = min(cap, base * 2.0 ** (self.failures - 1)) * random.uniform(0.5, 1.0)  # noqa: S311
            pause = min(cap, max(backoff, retry_after or 0.0))
            self.paused_until = max(self.paused_until, time.monotonic() + pause)
            return pause

    def reset(self) -> None:
        with self._lock:
            self.failures = 0
            self.paused_until = 0.0


class TenantDirectory:
    """Tenant runtimes for one worker process, shared by its delivery threads."""

    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        settings: Settings,
        *,
        refresh_seconds: float = 5.0,
        session_factory: Callable[[], requests.Session] = requests.Session,
    ) -> None:
        self.db = db
        self.keyring = keyring
        self.settings = settings
        self.refresh_seconds = refresh_seconds
        self.session_factory = session_factory
        self.discovery = SmartConfigurationCache(
            session=session_factory(),
            timeout=min(10.0, settings.http_timeout_seconds),
            allow_insecure_loopback=settings.allow_insecure_loopback,
        )
        self._lock = threading.Lock()
        self._runtimes: dict[str, TenantRuntime] = {}
        self._broken: dict[str, str] = {}
        self._loaded_at = float("-inf")

    def refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._loaded_at < self.refresh_seconds:
            return
        with self._lock:
            if not force and now - self._loaded_at < self.refresh_seconds:
                return
            with self.db.sessions() as session:
                rows = list(session.scalars(select(Tenant).where(Tenant.status == "active")))
            fresh: dict[str, TenantRuntime] = {}
            broken: dict[str, str] = {}
            for row in rows:
                current = self._runtimes.get(row.id)
                if current is not None and current.updated_at == row.updated_at:
                    fresh[row.id] = current
                    continue
                try:
                    fresh[row.id] = self._build(row)
                except (ValueError, UnsafeUrlError) as exc:
                    broken[row.id] = str(exc)
                    if self._broken.get(row.id) != str(exc):
                        log.error(
                            "tenant cannot be delivered to", extra={"tenant": row.id, "error_code": "config"}
                        )
            self._runtimes, self._broken, self._loaded_at = fresh, broken, now

    def deliverable(self) -> list[str]:
        """Tenants this worker should claim for now: active, well configured, not paused."""
        self.refresh()
        now = time.monotonic()
        return sorted(tid for tid, rt in self._runtimes.items() if not rt.paused(now))

    def get(self, tenant_id: str) -> TenantRuntime | None:
        return self._runtimes.get(tenant_id)

    def problems(self) -> dict[str, str]:
        return dict(self._broken)

    def _build(self, row: Tenant) -> TenantRuntime:
        settings = self.settings
        base = require_secure_url(
            row.fhir_base_url, allow_insecure_loopback=settings.allow_insecure_loopback, what="FHIR base"
        )
        strategy = row.write_strategy or "transaction"
        if strategy not in ("transaction", "batch", "single"):
            raise ValueError(f"unknown write strategy {strategy!r}")
        quirks = validate_quirks(row.quirks or {})
        put_types = frozenset(quirks.get(QUIRK_NO_CONDITIONAL_CREATE, []))
        provenance: ProvenanceMode = quirks.get(QUIRK_PROVENANCE, "plain")
        session = self.session_factory()
        auth: BackendTokenSource | None = None
        if row.backend_client_id:
            token_url: str | Callable[[], str]
            if row.token_url:
                token_url = require_secure_url(
                    row.token_url, allow_insecure_loopback=settings.allow_insecure_loopback, what="token URL"
                )
            else:
                discovery = self.discovery

                def token_url() -> str:
                    return discovery.token_endpoint(base)

            auth = BackendTokenSource(
                client_id=row.backend_client_id,
                scopes=row.backend_scopes,
                token_url=token_url,
                keyring=self.keyring,
                session=session,
                timeout=settings.http_timeout_seconds,
            )
        latency = metrics.EHR_LATENCY.labels(row.id)

        def observe(_method: str, status: int | None, seconds: float) -> None:
            if status is not None:
                latency.observe(seconds)

        overall = RequestLimiter(
            per_second=row.max_requests_per_second, max_concurrent=row.max_concurrent_requests or None
        )

        def make_client(limiter: RequestLimiter) -> FhirClient:
            return FhirClient(
                base,
                auth=auth,
                session=session,
                timeout=settings.http_timeout_seconds,
                limiter=limiter,
                retry_after_cap=settings.worker_retry_max_seconds,
                on_response=observe,
            )

        backfill_client = None
        if row.backfill_requests_per_second or row.backfill_max_concurrent:
            backfill_limit = RequestLimiter(
                per_second=row.backfill_requests_per_second, max_concurrent=row.backfill_max_concurrent
            )
            backfill_client = make_client(StackedLimiter(backfill_limit, overall))
        return TenantRuntime(
            tenant_id=row.id,
            updated_at=row.updated_at,
            strategy=strategy,
            put_types=put_types,
            client=make_client(overall),
            provenance=provenance,
            backfill_client=backfill_client,
        )
