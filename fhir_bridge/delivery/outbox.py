"""The outbox as the delivery worker sees it: claim whole groups under a lease, then record what happened.

Claiming is the part that must be right for "nothing lost, nothing duplicated":

* A group (``tenant_id``, ``group_key``) is claimed whole or not at all. On PostgreSQL a claimer
  locks due rows in claim order, then every row of their groups, both with ``FOR UPDATE SKIP
  LOCKED``, so claimers do not wait on each other. When two claimers each locked part of one group,
  the one holding the group's first pending row waits briefly (in a savepoint) for the rest and
  takes the group whole; the other leaves it. A group is never split. SQLite takes its write lock at
  ``BEGIN IMMEDIATE`` (see :mod:`fhir_bridge.storage.database`), which serialises claimers.
* A claim sets ``lease_until``/``leased_by``; a worker that dies simply lets its lease run out and
  another one takes the work. Results are written only for rows the worker still holds, so a worker
  that lost its lease (it was too slow) cannot overwrite the newer owner's state; the newer owner
  repeats the write, and conditional creates make that repeat harmless.
* Live data (priority 0) before backfill (1), then the earliest due, then the oldest.
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, cast

import orjson
from sqlalchemy import (
    CursorResult,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from fhir_bridge.storage import Database
from fhir_bridge.storage.models import (
    Alert,
    DeliveryAttempt,
    OutboxItem,
    Record,
    Tenant,
    VendorClient,
    utcnow,
)


@dataclass(frozen=True)
class Item:
    """One claimed outbox row: a resource to write."""

    id: int
    tenant_id: str
    record_id: uuid.UUID | None
    group_key: str
    resource_type: str
    ident_system: str
    ident_value: str
    body: bytes
    attempts: int
    priority: int
    # "create" (conditional create) or "upsert" (conditional update on the identifier).
    method: str = "create"


@dataclass(frozen=True)
class Vendor:
    client_id: str
    name: str


@dataclass
class Claim:
    """Groups one worker holds until ``lease_until``: items in claim order, and each record's vendor."""

    worker: str
    lease_until: datetime
    items: list[Item] = field(default_factory=list)
    vendors: dict[uuid.UUID, Vendor] = field(default_factory=dict)
    # Resources of the claimed groups already in the EHR (a retried dead letter's siblings), so that
    # references to them can be written as the EHR's ids: (tenant, type, system, value) -> ehr id.
    delivered: dict[tuple[str, str, str, str], str] = field(default_factory=dict)
    # The claim stopped at its limit: more due items were there (a backlog). Not the same as
    # len(items) >= limit: whole groups are taken, so a claim that ends before a group that does not
    # fit holds fewer items than the limit although the queue is long.
    full: bool = False

    def by_tenant(self) -> dict[str, list[Item]]:
        grouped: dict[str, list[Item]] = defaultdict(list)
        for item in self.items:
            grouped[item.tenant_id].append(item)
        return dict(grouped)


Fate = Literal["delivered", "dead", "retry", "release"]


@dataclass(frozen=True)
class Result:
    """What happened to one item.

    ``delivered``: in the EHR (``ehr_id``/``ehr_version``). ``dead``: dead-lettered with ``outcome``.
    ``retry``: try again at ``next_attempt_at``. ``release``: nothing was attempted (the tenant is
    paused, the lease ran short); hand it back untouched. ``attempted`` says whether this try counts
    against the item's attempts: it does whenever the request may have reached the EHR.
    """

    item_id: int
    fate: Fate
    attempted: bool = True
    ehr_id: str | None = None
    ehr_version: str | None = None
    http_status: int | None = None
    error: str | None = None
    outcome: dict[str, Any] | None = None
    next_attempt_at: datetime | None = None
    duration_ms: int = 0


_OUTBOX = cast(Table, OutboxItem.__table__)
_NULL = "__null"
_ATTEMPTS = cast(Table, DeliveryAttempt.__table__)

# Column order matches Item's fields.
_ITEM_COLUMNS = (
    OutboxItem.id,
    OutboxItem.tenant_id,
    OutboxItem.record_id,
    OutboxItem.group_key,
    OutboxItem.resource_type,
    OutboxItem.ident_system,
    OutboxItem.ident_value,
    OutboxItem.body,
    OutboxItem.attempts,
    OutboxItem.priority,
    OutboxItem.method,
)


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


def _claimable(now: datetime) -> Any:
    return and_(
        OutboxItem.status == "pending",
        OutboxItem.next_attempt_at <= now,
        or_(OutboxItem.lease_until.is_(None), OutboxItem.lease_until < now),
    )


def claim(
    db: Database,
    *,
    worker: str,
    limit: int,
    lease_seconds: float,
    tenants: Collection[str],
    now: datetime | None = None,
    backfill: bool | None = None,
) -> Claim:
    """Lease up to about ``limit`` items (whole groups; at least one group) of the given tenants.

    ``backfill``: False claims live items only (priority 0), True backfill only (priority >= 1),
    None both (live first). A group's items always share one priority (one push, one mode).
    """
    now = now or utcnow()
    lease_until = now + timedelta(seconds=lease_seconds)
    result = Claim(worker=worker, lease_until=lease_until)
    if not tenants:
        return result
    postgres = db.dialect == "postgresql"
    # Due items in claim order; the claim index serves the order, so this stays cheap however long
    # the queue is. On PostgreSQL rows another claimer is taking right now are skipped, not waited for.
    candidates_query = (
        select(OutboxItem.tenant_id, OutboxItem.group_key)
        .where(_claimable(now), OutboxItem.tenant_id.in_(sorted(tenants)))
        .order_by(OutboxItem.priority, OutboxItem.next_attempt_at, OutboxItem.id)
        .limit(limit)
    )
    if backfill is not None:
        candidates_query = candidates_query.where(
            OutboxItem.priority >= 1 if backfill else OutboxItem.priority == 0
        )
    if postgres:
        candidates_query = candidates_query.with_for_update(skip_locked=True)
    with db.transaction() as session:
        candidates = session.execute(candidates_query).all()
        if not candidates:
            return result
        result.full = len(candidates) >= limit
        keys = sorted({row.group_key for row in candidates})
        # Every row of those groups, found by group_key alone (its index; with a status condition
        # SQLite prefers the claim index and scans the queue). Pending rows are the members;
        # delivered ones are siblings already in the EHR.
        members_query = (
            select(*_ITEM_COLUMNS, OutboxItem.status, OutboxItem.ehr_id, OutboxItem.lease_until)
            .where(OutboxItem.group_key.in_(keys))
            .order_by(OutboxItem.id)
        )
        if postgres:
            members_query = members_query.with_for_update(skip_locked=True)
        groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
        seen: Counter[tuple[str, str]] = Counter()
        locked: set[int] = set()
        delivered: list[Any] = []
        for row in session.execute(members_query):
            key = (row.tenant_id, row.group_key)
            seen[key] += 1
            locked.add(row.id)
            if row.status == "pending":
                groups[key].append(row)
            elif row.status == "delivered" and row.ehr_id is not None:
                delivered.append(row)
        whole = set(groups)
        if postgres:
            # A group is ours outright if we locked every one of its rows. Rows skipped because
            # another claimer holds them mean two claimers each locked part of the group (their
            # candidate rows met inside it). Left to itself, each would leave it to the other; so
            # the one holding the group's first pending row takes it, waiting briefly for the rest
            # (the other claimer leaves the group and commits within milliseconds).
            totals = session.execute(
                select(
                    OutboxItem.tenant_id,
                    OutboxItem.group_key,
                    func.count(),
                    func.min(OutboxItem.id).filter(OutboxItem.status == "pending"),
                )
                .where(OutboxItem.group_key.in_(keys))
                .group_by(OutboxItem.tenant_id, OutboxItem.group_key)
            ).all()
            whole = set()
            for tenant_id, group_key, count, first in totals:
                key = (tenant_id, group_key)
                if seen[key] == count:
                    whole.add(key)
                elif first is not None and first in locked:
                    rows = _wait_for_group(session, tenant_id, group_key)
                    if rows is None:
                        continue  # still held (or a deadlock broken): the next round takes it
                    groups[key] = [row for row in rows if row.status == "pending"]
                    have = {row.id for row in delivered}
                    delivered += [
                        row
                        for row in rows
                        if row.status == "delivered" and row.ehr_id is not None and row.id not in have
                    ]
                    whole.add(key)
        chosen: list[Any] = []
        taken: set[tuple[str, str]] = set()
        for candidate in candidates:  # claim order; whole groups until the batch is full
            key = (candidate.tenant_id, candidate.group_key)
            if key in taken or key not in whole:
                continue
            members = groups[key]
            if any(m.lease_until is not None and m.lease_until >= now for m in members):
                continue  # another worker's live lease on part of it: that worker is delivering it
            if chosen and len(chosen) + len(members) > limit:
                break
            taken.add(key)
            chosen.extend(members)
        if not chosen:
            return result
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id.in_([row.id for row in chosen]))
            .values(lease_until=lease_until, leased_by=worker)
        )
        result.items = [Item(*row[: len(_ITEM_COLUMNS)]) for row in chosen]
        result.delivered = {
            (row.tenant_id, row.resource_type, row.ident_system, row.ident_value): row.ehr_id
            for row in delivered
            if (row.tenant_id, row.group_key) in taken
        }
        record_ids = sorted({item.record_id for item in result.items if item.record_id is not None})
        if record_ids:
            vendor_rows = session.execute(
                select(Record.id, VendorClient.client_id, VendorClient.name)
                .join(VendorClient, VendorClient.id == Record.vendor_id)
                .where(Record.id.in_(record_ids))
            ).all()
            result.vendors = {row.id: Vendor(row.client_id, row.name) for row in vendor_rows}
    return result


GROUP_WAIT = "500ms"


def _wait_for_group(session: Session, tenant_id: str, group_key: str) -> list[Any] | None:
    """Lock every row of one group, waiting at most ``GROUP_WAIT`` for another claimer to let go.

    PostgreSQL only. In a savepoint, so that a lock timeout (or a deadlock between two claimers each
    waiting for the other's group, which PostgreSQL breaks) costs this group only, not the claim.
    """
    previous = session.scalar(select(func.current_setting("lock_timeout")))
    try:
        with session.begin_nested():
            session.execute(select(func.set_config("lock_timeout", GROUP_WAIT, True)))
            rows = session.execute(
                select(*_ITEM_COLUMNS, OutboxItem.status, OutboxItem.ehr_id, OutboxItem.lease_until)
                .where(OutboxItem.tenant_id == tenant_id, OutboxItem.group_key == group_key)
                .order_by(OutboxItem.id)
                .with_for_update()
            ).all()
    except OperationalError:
        rows = None
    session.execute(select(func.set_config("lock_timeout", previous, True)))
    return list(rows) if rows is not None else None


def extend_lease(db: Database, claim: Claim, item_ids: Collection[int], seconds: float) -> bool:
    """Push our lease on ``item_ids`` further out; False if we no longer hold all of them."""
    until = utcnow() + timedelta(seconds=seconds)
    with db.transaction() as session:
        changed = _rowcount(
            session.execute(
                update(OutboxItem)
                .where(
                    OutboxItem.id.in_(sorted(item_ids)),
                    OutboxItem.leased_by == claim.worker,
                    OutboxItem.status == "pending",
                )
                .values(lease_until=until)
            )
        )
    if changed == len(item_ids):
        claim.lease_until = until
        return True
    return False


def record(db: Database, worker: str, results: Sequence[Result], *, now: datetime | None = None) -> int:
    """Write results for the items ``worker`` still holds; returns how many rows were updated.

    One transaction: item states, one ``DeliveryAttempt`` per attempted item, and the status of the
    records whose items are now all delivered (or one of which is dead).
    """
    if not results:
        return 0
    now = now or utcnow()
    by_id = {result.item_id: result for result in results}
    with db.transaction() as session:
        # By primary key only (the other conditions are checked here): a status condition invites
        # the planner to walk the claim index instead.
        owned_query = select(
            OutboxItem.id, OutboxItem.attempts, OutboxItem.record_id, OutboxItem.leased_by, OutboxItem.status
        ).where(OutboxItem.id.in_(sorted(by_id)))
        if db.dialect == "postgresql":
            owned_query = owned_query.with_for_update()
        owned = [
            row for row in session.execute(owned_query) if row.leased_by == worker and row.status == "pending"
        ]
        updates: list[dict[str, Any]] = []
        attempts_rows: list[dict[str, Any]] = []
        delivered_records: set[uuid.UUID] = set()
        dead_records: set[uuid.UUID] = set()
        for row in owned:
            result = by_id[row.id]
            attempts = row.attempts + (1 if result.attempted and result.fate != "release" else 0)
            change: dict[str, Any] = {
                "id": row.id,
                "attempts": attempts,
                "lease_until": None,
                "leased_by": None,
            }
            if result.fate == "delivered":
                change.update(
                    status="delivered",
                    ehr_id=result.ehr_id,
                    ehr_version=result.ehr_version,
                    delivered_at=now,
                    last_status=result.http_status,
                    outcome=None,
                )
                if row.record_id is not None:
                    delivered_records.add(row.record_id)
            elif result.fate == "dead":
                change.update(status="dead", last_status=result.http_status, outcome=result.outcome)
                if row.record_id is not None:
                    dead_records.add(row.record_id)
            else:
                change.update(
                    next_attempt_at=result.next_attempt_at or now,
                    last_status=result.http_status,
                    outcome=result.outcome,
                )
            if "outcome" in change and change["outcome"] is None:
                del change["outcome"]
                change["outcome" + _NULL] = True
            updates.append(change)
            if result.fate != "release" or result.error:
                attempts_rows.append(
                    {
                        "outbox_id": row.id,
                        "at": now,
                        "worker": worker[:128],
                        "http_status": result.http_status,
                        "error": (result.error or None) and str(result.error)[:500],
                        "duration_ms": result.duration_ms,
                    }
                )
        # Rows differ in the columns they change; one executemany per shape (Core: the ORM's bulk
        # update machinery costs more than the database here).
        shapes: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
        for change in updates:
            shapes[tuple(sorted(change))].append(change)
        table = _OUTBOX
        for columns, rows in shapes.items():
            values: dict[str, Any] = {}
            for column in columns:
                if column.endswith(_NULL):
                    values[column.removesuffix(_NULL)] = null()  # SQL NULL, not the JSON text 'null'
                elif column != "id":
                    values[column] = bindparam(f"_{column}")
            statement = update(table).where(table.c.id == bindparam("_id")).values(values)
            params = [{f"_{k}": v for k, v in row.items() if not k.endswith(_NULL)} for row in rows]
            session.connection().execute(statement, params)
        if attempts_rows:
            session.connection().execute(insert(_ATTEMPTS), attempts_rows)
        _settle_records(session, delivered_records, dead_records, now)
    return len(updates)


def _settle_records(session: Session, delivered: set[uuid.UUID], dead: set[uuid.UUID], now: datetime) -> None:
    if dead:
        session.execute(
            update(Record).where(Record.id.in_(sorted(dead))).values(status="dead", updated_at=now),
            execution_options={"synchronize_session": False},
        )
    candidates = sorted(delivered - dead)
    if candidates:
        unfinished = (
            select(OutboxItem.id)
            .where(OutboxItem.record_id == Record.id, OutboxItem.status != "delivered")
            .exists()
        )
        session.execute(
            update(Record)
            .where(Record.id.in_(candidates), Record.status != "dead", ~unfinished)
            .values(status="delivered", updated_at=now),
            execution_options={"synchronize_session": False},
        )


# -- resources the bridge itself writes and later changes (Consent, Goal, Task, Communication) -------


def put(
    session: Session,
    *,
    tenant_id: str,
    resource: dict[str, Any],
    ident_system: str,
    ident_value: str,
    method: Literal["create", "upsert"] = "upsert",
    now: datetime | None = None,
) -> int:
    """Queue ``resource`` for the EHR, or requeue its new version if it was queued before; the row id.

    One outbox row per (tenant, type, identifier), as for vendor data: the row's body is replaced and
    the row goes back to pending with a fresh attempt budget, written as an upsert (``PUT
    Type?identifier=...``, or ``PUT Type/<identifier value>`` under the no-conditional-create quirk),
    so the EHR ends up holding the latest version however many changes were queued before delivery.

    A worker may hold the row right now, sending the previous version. The lease is kept (so no other
    worker takes the row until that send is over) but the holder is cleared, so that worker's result
    is not recorded and the new version is sent once the lease runs out: the newer version always
    lands last.
    """
    now = now or utcnow()
    body = orjson.dumps(resource)
    resource_type = str(resource["resourceType"])
    existing = session.execute(
        select(OutboxItem.id, OutboxItem.lease_until).where(
            OutboxItem.tenant_id == tenant_id,
            OutboxItem.resource_type == resource_type,
            OutboxItem.ident_system == ident_system,
            OutboxItem.ident_value == ident_value,
        )
    ).first()
    if existing is None:
        row = OutboxItem(
            tenant_id=tenant_id,
            record_id=None,
            group_key=ident_value,
            resource_type=resource_type,
            ident_system=ident_system,
            ident_value=ident_value,
            body=body,
            method=method,
            priority=0,
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        session.add(row)
        session.flush()
        return row.id
    session.execute(
        update(OutboxItem)
        .where(OutboxItem.id == existing.id)
        .values(
            body=body,
            method="upsert",
            status="pending",
            attempts=0,
            next_attempt_at=now,
            leased_by=None,
            outcome=null(),
        )
    )
    return int(existing.id)


# -- what hospital IT sees and does (fhir-bridge outbox ...) ---------------------------------------


@dataclass(frozen=True)
class TenantQueue:
    tenant_id: str
    ready: int
    waiting: int
    leased: int
    delivered: int
    dead: int
    oldest_pending: datetime | None
    next_attempt: datetime | None


def status(db: Database, *, tenant: str | None = None, now: datetime | None = None) -> list[TenantQueue]:
    """Counts per tenant: ready now, waiting for a retry, being delivered, delivered, dead."""
    now = now or utcnow()
    leased = and_(OutboxItem.lease_until.is_not(None), OutboxItem.lease_until >= now)
    pending = OutboxItem.status == "pending"
    query = select(
        OutboxItem.tenant_id,
        func.count().filter(pending, ~leased, OutboxItem.next_attempt_at <= now),
        func.count().filter(pending, ~leased, OutboxItem.next_attempt_at > now),
        func.count().filter(pending, leased),
        func.count().filter(OutboxItem.status == "delivered"),
        func.count().filter(OutboxItem.status == "dead"),
        func.min(OutboxItem.created_at).filter(pending),
        func.min(OutboxItem.next_attempt_at).filter(pending, OutboxItem.next_attempt_at > now),
    ).group_by(OutboxItem.tenant_id)
    if tenant is not None:
        query = query.where(OutboxItem.tenant_id == tenant)
    with db.sessions() as session:
        rows = session.execute(query.order_by(OutboxItem.tenant_id)).all()
    return [TenantQueue(*row) for row in rows]


@dataclass(frozen=True)
class DeadItem:
    id: int
    tenant_id: str
    resource_type: str
    ident_value: str
    attempts: int
    last_status: int | None
    outcome: dict[str, Any] | None
    record_id: uuid.UUID | None


def dead_items(db: Database, *, tenant: str | None = None, limit: int = 50) -> list[DeadItem]:
    query = select(
        OutboxItem.id,
        OutboxItem.tenant_id,
        OutboxItem.resource_type,
        OutboxItem.ident_value,
        OutboxItem.attempts,
        OutboxItem.last_status,
        OutboxItem.outcome,
        OutboxItem.record_id,
    ).where(OutboxItem.status == "dead")
    if tenant is not None:
        query = query.where(OutboxItem.tenant_id == tenant)
    with db.sessions() as session:
        rows = session.execute(query.order_by(OutboxItem.id.desc()).limit(limit)).all()
    return [DeadItem(*row) for row in rows]


def retry_dead(
    db: Database, *, tenant: str | None = None, item_ids: Iterable[int] = (), now: datetime | None = None
) -> int:
    """Put dead items back in the queue with a fresh attempt budget; whole groups go back together.

    Returns how many items were requeued. Their records return to ``queued``.
    """
    now = now or utcnow()
    ids = sorted(set(item_ids))
    with db.transaction() as session:
        selector = select(OutboxItem.tenant_id, OutboxItem.group_key).where(OutboxItem.status == "dead")
        if tenant is not None:
            selector = selector.where(OutboxItem.tenant_id == tenant)
        if ids:
            selector = selector.where(OutboxItem.id.in_(ids))
        groups = session.execute(selector.distinct()).all()
        if not groups:
            return 0
        requeued = 0
        records: set[uuid.UUID] = set()
        for tenant_id, group_key in groups:
            in_group = and_(
                OutboxItem.tenant_id == tenant_id,
                OutboxItem.group_key == group_key,
                OutboxItem.status == "dead",
            )
            records.update(
                rid
                for rid in session.scalars(select(OutboxItem.record_id).where(in_group))
                if rid is not None
            )
            requeued += _rowcount(
                session.execute(
                    update(OutboxItem)
                    .where(in_group)
                    .values(
                        status="pending",
                        attempts=0,
                        next_attempt_at=now,
                        lease_until=None,
                        leased_by=None,
                    )
                )
            )
        if records:
            session.execute(
                update(Record).where(Record.id.in_(sorted(records))).values(status="queued", updated_at=now)
            )
    return requeued


def purge(
    db: Database,
    *,
    statuses: Collection[str],
    older_than: timedelta,
    tenant: str | None = None,
    now: datetime | None = None,
) -> int:
    """Delete delivered and/or dead items (their bodies hold PHI) older than ``older_than``.

    Age is measured from delivery for delivered items and from creation for dead ones. Items an alert
    still points to are kept. Their delivery attempts go with them.
    """
    allowed = {"delivered", "dead"}
    if not statuses or not set(statuses) <= allowed:
        raise ValueError("purge removes delivered and/or dead items only")
    cutoff = (now or utcnow()) - older_than
    age = []
    if "delivered" in statuses:
        age.append(and_(OutboxItem.status == "delivered", OutboxItem.delivered_at < cutoff))
    if "dead" in statuses:
        age.append(and_(OutboxItem.status == "dead", OutboxItem.created_at < cutoff))
    referenced = (
        select(Alert.id)
        .where(or_(Alert.flag_outbox_id == OutboxItem.id, Alert.task_outbox_id == OutboxItem.id))
        .exists()
    )
    condition = and_(or_(*age), ~referenced)
    if tenant is not None:
        condition = and_(condition, OutboxItem.tenant_id == tenant)
    with db.transaction() as session:
        ids = list(session.scalars(select(OutboxItem.id).where(condition)))
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            # Explicit: SQLite only honours ON DELETE CASCADE when foreign keys are on, and we do not
            # rely on that for correctness.
            session.execute(delete(DeliveryAttempt).where(DeliveryAttempt.outbox_id.in_(chunk)))
            session.execute(delete(OutboxItem).where(OutboxItem.id.in_(chunk)))
    return len(ids)


def active_tenant_ids(db: Database) -> list[str]:
    with db.sessions() as session:
        return list(session.scalars(select(Tenant.id).where(Tenant.status == "active").order_by(Tenant.id)))
