"""Claiming and bookkeeping on SQLite and PostgreSQL: whole groups, leases, ordering, dead letters, purge."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from datetime import timedelta

from sqlalchemy import func, select

from fhir_bridge.delivery import outbox
from fhir_bridge.delivery.outbox import Result
from fhir_bridge.storage import Database
from fhir_bridge.storage.models import DeliveryAttempt, OutboxItem, Record, utcnow
from tests.integration.delivery.conftest import ServicesFactory
from tests.support.outbox_seed import add_tenant, seed
from tests.support.postgres import PostgresServer

BASE = "https://ehr.example/fhir"


def groups_of(db: Database, tenant: str) -> dict[str, set[int]]:
    with db.sessions() as session:
        rows = session.execute(
            select(OutboxItem.group_key, OutboxItem.id).where(OutboxItem.tenant_id == tenant)
        )
        found: dict[str, set[int]] = defaultdict(set)
        for key, item_id in rows:
            found[key].add(item_id)
    return dict(found)


def test_claims_take_whole_groups_live_first(make_services: ServicesFactory, database_url: str) -> None:
    db = make_services(database_url).db
    add_tenant(db, "t1", BASE)
    backfill = seed(db, "t1", patient="old", records=4, priority=1)
    live = seed(db, "t1", patient="new", records=4, priority=0)
    groups = groups_of(db, "t1")

    first = outbox.claim(db, worker="w1", limit=3, lease_seconds=60, tenants=["t1"])
    assert first.items, "something is due"
    assert {i.record_id for i in first.items} <= set(live.records), "live data before backfill"
    claimed_groups = {i.group_key for i in first.items}
    assert {i.id for i in first.items} == set().union(*(groups[k] for k in claimed_groups)), "whole groups"
    record_id = first.items[0].record_id
    assert record_id is not None, "seeded items carry records"
    assert first.vendors[record_id].client_id == "acme-mood"

    rest: list[outbox.Item] = []
    while batch := outbox.claim(db, worker="w2", limit=3, lease_seconds=60, tenants=["t1"]).items:
        rest += batch
    assert {i.id for i in first.items} | {i.id for i in rest} == set().union(*groups.values())
    assert not {i.id for i in first.items} & {i.id for i in rest}, "a leased group is not claimed again"
    assert len(backfill.records) == 4


def test_a_group_bigger_than_the_batch_is_still_claimed_whole(
    make_services: ServicesFactory, database_url: str
) -> None:
    db = make_services(database_url).db
    add_tenant(db, "t1", BASE)
    seed(db, "t1", patient="p", records=1, kinds=["phq9"])  # one group of two resources
    claim = outbox.claim(db, worker="w", limit=1, lease_seconds=60, tenants=["t1"])
    assert len(claim.items) == 2


def test_an_expired_lease_lets_another_worker_take_over_and_fences_the_first(
    make_services: ServicesFactory, database_url: str
) -> None:
    db = make_services(database_url).db
    add_tenant(db, "t1", BASE)
    seed(db, "t1", patient="p", records=2)
    now = utcnow()
    slow = outbox.claim(db, worker="slow", limit=10, lease_seconds=30, tenants=["t1"], now=now)
    assert outbox.claim(db, worker="other", limit=10, lease_seconds=30, tenants=["t1"], now=now).items == []
    later = now + timedelta(seconds=31)
    fresh = outbox.claim(db, worker="fresh", limit=10, lease_seconds=30, tenants=["t1"], now=later)
    assert {i.id for i in fresh.items} == {i.id for i in slow.items}

    # The worker that lost its lease reports late: nothing it says is recorded.
    stale = [
        Result(i.id, "dead", error="late", outcome={"resourceType": "OperationOutcome"}) for i in slow.items
    ]
    assert outbox.record(db, "slow", stale) == 0
    done = [
        Result(i.id, "delivered", ehr_id=f"e{i.id}", ehr_version="1", http_status=201) for i in fresh.items
    ]
    assert outbox.record(db, "fresh", done) == len(fresh.items)
    with db.sessions() as session:
        assert set(session.scalars(select(OutboxItem.status))) == {"delivered"}
        assert set(session.scalars(select(Record.status))) == {"delivered"}
        assert session.scalar(select(DeliveryAttempt.worker).limit(1)) == "fresh"


def test_concurrent_claimers_never_share_an_item(make_services: ServicesFactory, database_url: str) -> None:
    db = make_services(database_url).db
    add_tenant(db, "t1", BASE)
    seed(db, "t1", patient="p", records=120)
    groups = groups_of(db, "t1")
    claimed: dict[str, list[int]] = defaultdict(list)

    def unclaimed() -> bool:
        with db.sessions() as session:
            return bool(
                session.scalar(
                    select(func.count()).select_from(OutboxItem).where(OutboxItem.leased_by.is_(None))
                )
            )

    def claimer(name: str) -> None:
        # An empty claim is not the end: on PostgreSQL a claimer whose locked rows all belong to groups
        # another claimer is taking whole comes back empty, and a group still held after the short
        # wait is left to the next poll. So poll until every item is leased, as the worker does.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            batch = outbox.claim(db, worker=name, limit=7, lease_seconds=60, tenants=["t1"]).items
            claimed[name] += [i.id for i in batch]
            if not batch:
                if not unclaimed():
                    return
                time.sleep(0.01)

    threads = [threading.Thread(target=claimer, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [item for items in claimed.values() for item in items]
    assert sorted(every) == sorted(set().union(*groups.values())), "each item claimed exactly once"
    owner = {item: name for name, items in claimed.items() for item in items}
    for members in groups.values():
        assert len({owner[m] for m in members}) == 1, "a group never split between workers"


def test_dead_letters_go_back_whole_and_purge_removes_old_items(
    make_services: ServicesFactory, database_url: str
) -> None:
    db = make_services(database_url).db
    add_tenant(db, "t1", BASE)
    seeded = seed(db, "t1", patient="p", records=3, kinds=["phq9"])
    claim = outbox.claim(db, worker="w", limit=100, lease_seconds=60, tenants=["t1"])
    bad_group = claim.items[0].group_key
    results = [
        Result(
            i.id,
            "dead",
            http_status=400,
            error="bad",
            outcome={"resourceType": "OperationOutcome", "issue": []},
        )
        if i.group_key == bad_group and i.resource_type == "Observation"
        else Result(i.id, "delivered", ehr_id=str(uuid.uuid4()), ehr_version="1", http_status=201)
        for i in claim.items
    ]
    outbox.record(db, "w", results)
    queue = outbox.status(db, tenant="t1")
    assert [(q.ready, q.delivered, q.dead) for q in queue] == [(0, 5, 1)]
    assert [d.last_status for d in outbox.dead_items(db)] == [400]
    with db.sessions() as session:
        statuses = {row.id: row.status for row in session.execute(select(Record.id, Record.status))}
    assert sorted(statuses.values()) == ["dead", "delivered", "delivered"]

    assert outbox.retry_dead(db, tenant="t1") == 1
    with db.sessions() as session:
        assert set(session.scalars(select(Record.status).where(Record.status == "dead"))) == set()
    again = outbox.claim(db, worker="w2", limit=100, lease_seconds=60, tenants=["t1"])
    assert {i.group_key for i in again.items} == {bad_group}
    assert {i.attempts for i in again.items if i.resource_type == "Observation"} == {0}

    # Purge: only delivered items older than the cut-off, never pending ones.
    assert outbox.purge(db, statuses=["delivered"], older_than=timedelta(days=1)) == 0
    removed = outbox.purge(
        db, statuses=["delivered"], older_than=timedelta(0), now=utcnow() + timedelta(seconds=1)
    )
    assert removed == 5  # the bad group's QuestionnaireResponse was delivered; its Observation waits
    with db.sessions() as session:
        left = set(session.scalars(select(OutboxItem.status)))
    assert left == {"pending"}
    assert len(seeded.records) == 3


def test_a_group_split_between_two_claimers_goes_whole_to_the_one_holding_its_first_row(
    make_services: ServicesFactory, pg_server: PostgresServer
) -> None:
    """PostgreSQL only (row locks; SQLite serialises claimers): claimer B's candidate rows may end
    inside a group whose first row claimer A locked. Before, both left the group for a later poll;
    now A waits for B to let go and takes it whole, while B (not holding the first row) leaves it
    without waiting."""
    db = make_services(pg_server.create_database()).db
    add_tenant(db, "t1", BASE)
    seed(db, "t1", patient="p", records=1, kinds=["phq9"])  # one group of two resources
    (members,) = groups_of(db, "t1").values()
    first, second = sorted(members)

    def hold(row_id: int, seconds: float, ready: threading.Event) -> None:
        """Another claimer's open transaction holding one row of the group, then leaving it."""
        with db.engine.connect() as conn, conn.begin():
            conn.execute(select(OutboxItem.id).where(OutboxItem.id == row_id).with_for_update())
            ready.set()
            time.sleep(seconds)

    # The other claimer holds the second row: we hold the first, so we wait and take both.
    ready = threading.Event()
    other = threading.Thread(target=hold, args=(second, 0.2, ready))
    other.start()
    ready.wait(5)
    claim = outbox.claim(db, worker="a", limit=1, lease_seconds=60, tenants=["t1"])
    other.join()
    assert sorted(i.id for i in claim.items) == [first, second], "taken whole, not left for later"

    # Released, then the other claimer holds the first row: we do not wait, and do not split it.
    outbox.record(db, "a", [Result(i, "release", attempted=False) for i in (first, second)])
    ready = threading.Event()
    other = threading.Thread(target=hold, args=(first, 1.0, ready))
    other.start()
    ready.wait(5)
    try:
        assert outbox.claim(db, worker="b", limit=10, lease_seconds=60, tenants=["t1"]).items == []
    finally:
        other.join()
    again = outbox.claim(db, worker="b", limit=10, lease_seconds=60, tenants=["t1"])
    assert sorted(i.id for i in again.items) == [first, second]

    # The other claimer holds the second row longer than we wait: we give the group up (the
    # savepoint keeps the rest of the claim usable) and take it whole once it is free.
    outbox.record(db, "b", [Result(i, "release", attempted=False) for i in (first, second)])
    ready = threading.Event()
    other = threading.Thread(target=hold, args=(second, 2.0, ready))
    other.start()
    ready.wait(5)
    try:
        assert outbox.claim(db, worker="c", limit=1, lease_seconds=60, tenants=["t1"]).items == []
    finally:
        other.join()
    last = outbox.claim(db, worker="c", limit=1, lease_seconds=60, tenants=["t1"])
    assert sorted(i.id for i in last.items) == [first, second]
