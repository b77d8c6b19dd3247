"""Webhooks: tell a vendor's server, signed and at least once, that something changed for an app user.

Events are rows of ``webhook_events`` queued with the change (:mod:`.events`); the delivery worker
sends them, never the request that made the change. Each is a POST of a compact JWS (a JWT,
``Content-Type: application/jwt``) signed with our current key: the vendor checks it against
``/.well-known/jwks.json`` by its ``kid``, and ``iss`` (our public URL) and ``aud`` (its client id).
``jti`` and the ``Webhook-Id`` header carry the event id, the same on every retry: a vendor that
sees an id twice ignores the repeat (at-least-once delivery).

Claiming pushes an event's ``next_attempt_at`` a lease ahead, so a worker that dies mid-send lets
the event come due again; a failed send waits an exponential backoff; after the worker's attempt
budget the event is ``dead`` (kept for hospital IT). An event whose enrollment has ended is dropped
unsent: ending an enrollment stops every flow. A URL whose host resolves to a private, reserved or
(outside development) loopback address is never called (SSRF), and the connection goes to the address
that was checked (:mod:`auth.pinned_http`), so DNS cannot answer the check and the connection differently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import requests
from joserfc import jwt
from sqlalchemy import func, select, update

from auth.backend import UnsafeUrlError, is_loopback, require_secure_url
from auth.jwks_fetch import system_resolver
from auth.keys import Keyring
from auth.pinned_http import PinnedConnection, Resolver, allowed_address
from fhir_bridge import audit
from fhir_bridge.errors import BadRequest, NotFound
from fhir_bridge.storage import Database
from fhir_bridge.storage.models import Enrollment, VendorClient, WebhookEvent, utcnow

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/jwt"
LEASE = timedelta(seconds=60)


def set_url(
    db: Database, *, client_id: str, url: str | None, allow_insecure_loopback: bool, actor: str
) -> None:
    """Register (or with None, remove) a vendor's webhook URL: https only (loopback http in dev/tests)."""
    if url is not None:
        try:
            require_secure_url(url, allow_insecure_loopback=allow_insecure_loopback, what="the webhook URL")
        except UnsafeUrlError as exc:
            raise BadRequest(str(exc), code="invalid-webhook-url") from None
        if len(url) > 2048:
            raise BadRequest("the webhook URL is longer than 2048 characters", code="invalid-webhook-url")
    with db.transaction() as session:
        vendor = session.execute(select(VendorClient).where(VendorClient.client_id == client_id)).scalar()
        if vendor is None:
            raise NotFound(f"no vendor {client_id!r}", code="vendor-not-found")
        vendor.webhook_url = url
        audit.record(
            session,
            actor_type="operator",
            actor_id=actor,
            action="vendor.webhook",
            target=f"vendor/{client_id}",
            detail={"set": url is not None},
        )


def sign(
    keyring: Keyring, *, issuer: str, audience: str, event: WebhookEvent, now: float | None = None
) -> str:
    entry = keyring.signing_key()
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "iat": issued,
        "exp": issued + 3600,
        "jti": str(event.event_id),
        "event": event.kind,
        "data": event.payload,
        "created_at": event.created_at.isoformat().replace("+00:00", "Z"),
    }
    return jwt.encode(
        {"alg": entry.alg, "kid": entry.kid, "typ": "JWT"}, claims, entry.key, algorithms=[entry.alg]
    )


@dataclass(frozen=True)
class Due:
    id: int
    event: WebhookEvent
    url: str
    client_id: str
    vendor_id: int
    attempts: int


def claim(db: Database, *, limit: int, now: datetime | None = None) -> list[Due]:
    """Take up to ``limit`` due events (their lease: ``next_attempt_at`` a minute ahead)."""
    now = now or utcnow()
    query = (
        select(WebhookEvent, VendorClient.webhook_url, VendorClient.client_id)
        .join(VendorClient, VendorClient.id == WebhookEvent.vendor_id)
        .where(WebhookEvent.status == "pending", WebhookEvent.next_attempt_at <= now)
        .order_by(WebhookEvent.next_attempt_at, WebhookEvent.id)
        .limit(limit)
    )
    if db.dialect == "postgresql":
        query = query.with_for_update(skip_locked=True, of=WebhookEvent)
    with db.transaction() as session:
        rows = session.execute(query).all()
        due: list[Due] = []
        for event, url, client_id in rows:
            event.attempts += 1
            event.next_attempt_at = now + LEASE
            session.flush()
            session.expunge(event)
            if url:
                due.append(Due(event.id, event, url, client_id, event.vendor_id, event.attempts))
            else:
                session.execute(
                    update(WebhookEvent).where(WebhookEvent.id == event.id).values(status="dropped")
                )
    return due


def _still_enrolled(db: Database, due: Due) -> bool:
    app_user = due.event.payload.get("app_user_id")
    with db.sessions() as session:
        return (
            session.scalar(
                select(Enrollment.id).where(
                    Enrollment.vendor_id == due.vendor_id,
                    Enrollment.app_user_id == app_user,
                    Enrollment.status == "active",
                )
            )
            is not None
        )


def deliver_due(
    db: Database,
    keyring: Keyring,
    *,
    issuer: str,
    timeout: float,
    max_attempts: int,
    backoff: Callable[[int], float],
    limit: int = 20,
    allow_insecure_loopback: bool = False,
    resolver: Resolver = system_resolver,
) -> int:
    """Send the due events; returns how many were handled."""
    handled = claim(db, limit=limit)
    for due in handled:
        now = utcnow()
        values: dict[str, Any]
        if not _still_enrolled(db, due):
            values = {"status": "dropped"}
        else:
            status = _post(due, keyring, issuer, timeout, allow_insecure_loopback, resolver)
            if status is not None and 200 <= status < 300:
                values = {"status": "delivered", "delivered_at": now, "last_status": status}
            elif due.attempts >= max_attempts:
                values = {"status": "dead", "last_status": status}
            else:
                delay = backoff(due.attempts)
                values = {"next_attempt_at": now + timedelta(seconds=delay), "last_status": status}
        with db.transaction() as session:
            session.execute(update(WebhookEvent).where(WebhookEvent.id == due.id).values(**values))
    return len(handled)


def public_address(
    url: str, *, allow_insecure_loopback: bool, resolver: Resolver = system_resolver
) -> str | None:
    """The address to send a webhook to, if every address of the URL's host is public (loopback too when
    development allows it): a webhook must never be pointed at the hospital's own network (SSRF)."""
    loopback_ok = allow_insecure_loopback and is_loopback(urlsplit(url).hostname or "")
    return allowed_address(url, loopback_ok=loopback_ok, resolver=resolver)


def public_host(url: str, *, allow_insecure_loopback: bool) -> bool:
    return public_address(url, allow_insecure_loopback=allow_insecure_loopback) is not None


def _post(
    due: Due,
    keyring: Keyring,
    issuer: str,
    timeout: float,
    allow_insecure_loopback: bool,
    resolver: Resolver,
) -> int | None:
    try:
        require_secure_url(due.url, allow_insecure_loopback=allow_insecure_loopback, what="the webhook URL")
        address = public_address(due.url, allow_insecure_loopback=allow_insecure_loopback, resolver=resolver)
        if address is None:
            log.warning("webhook host not public", extra={"vendor": due.client_id})
            return None
        token = sign(keyring, issuer=issuer, audience=due.client_id, event=due.event)
        with PinnedConnection(due.url, address) as connection:
            response = connection.post(
                due.url,
                data=token.encode(),
                headers={
                    "Content-Type": MEDIA_TYPE,
                    "Webhook-Id": str(due.event.event_id),
                    "User-Agent": "fhir-bridge-webhooks",
                },
                timeout=(min(10.0, timeout), timeout),
            )
            response.close()
    except (requests.RequestException, UnsafeUrlError) as exc:
        log.warning("webhook not delivered", extra={"vendor": due.client_id, "exception": type(exc).__name__})
        return None
    if not 200 <= response.status_code < 300:
        log.warning("webhook refused", extra={"vendor": due.client_id, "http_status": response.status_code})
    return response.status_code


# -- what hospital IT sees and does (``fhir-bridge webhooks``) ---------------------------------------


@dataclass(frozen=True)
class VendorQueue:
    client_id: str
    counts: dict[str, int]  # by status: pending, delivered, dead, dropped
    oldest_pending: datetime | None


@dataclass(frozen=True)
class DeadEvent:
    id: int
    client_id: str
    kind: str
    attempts: int
    last_status: int | None
    created_at: datetime


def status(db: Database, *, client_id: str | None = None) -> list[VendorQueue]:
    """Events per vendor and status, with the age of the oldest one still waiting."""
    query = (
        select(
            VendorClient.client_id,
            WebhookEvent.status,
            func.count(),
            func.min(WebhookEvent.created_at).filter(WebhookEvent.status == "pending"),
        )
        .join(VendorClient, VendorClient.id == WebhookEvent.vendor_id)
        .group_by(VendorClient.client_id, WebhookEvent.status)
        .order_by(VendorClient.client_id)
    )
    if client_id is not None:
        query = query.where(VendorClient.client_id == client_id)
    queues: dict[str, VendorQueue] = {}
    with db.sessions() as session:
        for vendor, state, count, oldest in session.execute(query):
            queue = queues.setdefault(vendor, VendorQueue(vendor, {}, None))
            queue.counts[state] = count
            if oldest is not None:
                queues[vendor] = VendorQueue(vendor, queue.counts, oldest)
    return list(queues.values())


def dead_events(db: Database, *, client_id: str | None = None, limit: int = 10) -> list[DeadEvent]:
    """The newest events the worker gave up on (the vendor's endpoint kept failing)."""
    query = (
        select(WebhookEvent, VendorClient.client_id)
        .join(VendorClient, VendorClient.id == WebhookEvent.vendor_id)
        .where(WebhookEvent.status == "dead")
        .order_by(WebhookEvent.id.desc())
        .limit(limit)
    )
    if client_id is not None:
        query = query.where(VendorClient.client_id == client_id)
    with db.sessions() as session:
        return [
            DeadEvent(e.id, vendor, e.kind, e.attempts, e.last_status, e.created_at)
            for e, vendor in session.execute(query)
        ]


def retry_dead(
    db: Database, *, actor: str, client_id: str | None = None, event_ids: tuple[int, ...] = ()
) -> int:
    """Send dead events again with a fresh attempt budget, same event id (the vendor dedupes on it).

    For when a vendor's endpoint was down longer than the retries lasted and is back. An event whose
    enrollment has ended since is still dropped unsent.
    """
    query = update(WebhookEvent).where(WebhookEvent.status == "dead")
    if client_id is not None:
        vendor_ids = select(VendorClient.id).where(VendorClient.client_id == client_id)
        query = query.where(WebhookEvent.vendor_id.in_(vendor_ids.scalar_subquery()))
    if event_ids:
        query = query.where(WebhookEvent.id.in_(event_ids))
    with db.transaction() as session:
        result: Any = session.execute(
            query.values(status="pending", attempts=0, next_attempt_at=utcnow(), last_status=None)
        )
        count = int(result.rowcount)
        if count:
            audit.record(
                session,
                actor_type="operator",
                actor_id=actor,
                action="webhooks.retry",
                target=f"vendor/{client_id}" if client_id else None,
                detail={"count": count},
            )
    return count


__all__ = ["claim", "dead_events", "deliver_due", "retry_dead", "set_url", "sign", "status"]
