"""Prometheus metrics: request counters here, queue figures read from the database at scrape time.

Queue depth and age are computed when Prometheus scrapes, from the outbox table itself, so every
web and worker process reports the same truth without sharing memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from fhir_bridge.storage import Database
from fhir_bridge.storage.models import OutboxItem, VendorClient, WebhookEvent

# Created unregistered: registry_for() decides where they are exposed (one process or many).
REQUESTS = Counter(
    "fhir_bridge_http_requests_total", "HTTP requests served", ["method", "route", "status"], registry=None
)
LATENCY = Histogram(
    "fhir_bridge_http_request_seconds",
    "Time to answer an HTTP request",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=None,
)
RECORDS = Counter(
    "fhir_bridge_records_total", "Vendor records received, by outcome", ["outcome"], registry=None
)
DELIVERED = Counter(
    "fhir_bridge_delivered_total", "Resources written to an EHR, by tenant", ["tenant"], registry=None
)
DELIVERY_FAILURES = Counter(
    "fhir_bridge_delivery_failures_total",
    "Failed delivery attempts, by tenant and kind",
    ["tenant", "kind"],
    registry=None,
)
EHR_LATENCY = Histogram(
    "fhir_bridge_ehr_request_seconds",
    "Time an EHR took to answer a write",
    ["tenant"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=None,
)


class OutboxCollector(Collector):
    """Queue depth and the age of the oldest pending item, per tenant, read at scrape time."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "fhir_bridge_outbox_items", "Outbox items by status", labels=["tenant", "status"]
        )
        age = GaugeMetricFamily(
            "fhir_bridge_outbox_oldest_pending_seconds",
            "Age of the oldest pending outbox item",
            labels=["tenant"],
        )
        now = datetime.now(UTC)
        with self.db.sessions() as session:
            rows = session.execute(
                select(
                    OutboxItem.tenant_id, OutboxItem.status, func.count(), func.min(OutboxItem.created_at)
                ).group_by(OutboxItem.tenant_id, OutboxItem.status)
            ).all()
        for tenant, status, count, oldest in rows:
            depth.add_metric([tenant, status], count)
            if status == "pending" and oldest is not None:
                if oldest.tzinfo is None:
                    oldest = oldest.replace(tzinfo=UTC)
                age.add_metric([tenant], (now - oldest).total_seconds())
        yield depth
        yield age


class WebhookCollector(Collector):
    """Vendors' webhook events by status, read at scrape time: ``dead`` ones need a person."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        events = GaugeMetricFamily(
            "fhir_bridge_webhook_events", "Webhook events by vendor and status", labels=["vendor", "status"]
        )
        with self.db.sessions() as session:
            rows = session.execute(
                select(VendorClient.client_id, WebhookEvent.status, func.count())
                .join(VendorClient, VendorClient.id == WebhookEvent.vendor_id)
                .group_by(VendorClient.client_id, WebhookEvent.status)
            ).all()
        for vendor, status, count in rows:
            events.add_metric([vendor, status], count)
        yield events


def registry_for(db: Database) -> CollectorRegistry:
    """The registry /metrics serves: multi-process aware under gunicorn, plus the outbox collector."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        for collector in (REQUESTS, LATENCY, RECORDS, DELIVERED, DELIVERY_FAILURES, EHR_LATENCY):
            registry.register(collector)
    registry.register(OutboxCollector(db))
    registry.register(WebhookCollector(db))
    return registry


def init_app(app: Flask, db: Database) -> None:
    registry = registry_for(db)

    @app.before_request
    def _start() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "<unmatched>"
        REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        started = g.get("metrics_started")
        if started is not None:
            LATENCY.labels(route).observe(time.perf_counter() - started)
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
