"""Scheduled jobs: one worker runs each job once per tick, on PostgreSQL (advisory lock) and SQLite.

These drive :class:`fhir_bridge.scheduler.Scheduler` directly with explicit moments; the two-process
test in test_faults.py checks the same thing with real `fhir-bridge worker` processes.
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from auth.keys import Keyring
from fhir_bridge.scheduler import Job, Scheduler, default_jobs
from fhir_bridge.services import Services
from fhir_bridge.storage.models import OutboxItem
from tests.integration.delivery.conftest import ServicesFactory
from tests.support.outbox_seed import add_tenant, outbox_states, seed
from tests.support.postgres import PostgresServer

TICK = 60.0
T0 = datetime(2026, 3, 2, 10, 0, 5, tzinfo=UTC)  # 5 s into a tick


@pytest.fixture(params=["sqlite", "postgresql"])
def services(
    request: pytest.FixtureRequest, make_services: ServicesFactory, sqlite_url: str, tmp_path: Path
) -> Services:
    if request.param == "sqlite":
        return make_services(sqlite_url)
    pg: PostgresServer = request.getfixturevalue("pg_server")
    return make_services(pg.create_database())


def counting(runs: Counter[str], name: str = "count") -> Job:
    def run(_: Services) -> object:
        runs[name] += 1
        return None

    return Job(name, run)


def test_two_workers_offered_a_job_in_the_same_tick_run_it_once(services: Services) -> None:
    runs: Counter[str] = Counter()
    a = Scheduler(services, holder="a", jobs=[counting(runs)], tick_seconds=TICK)
    b = Scheduler(services, holder="b", jobs=[counting(runs)], tick_seconds=TICK)
    assert a.run_due(T0) == ["count"]
    assert b.run_due(T0 + timedelta(seconds=1)) == []
    assert a.run_due(T0 + timedelta(seconds=50)) == [], "still the same tick"
    assert runs["count"] == 1
    # Next tick: whoever comes first runs it, once.
    assert b.run_due(T0 + timedelta(seconds=TICK)) == ["count"]
    assert a.run_due(T0 + timedelta(seconds=TICK + 1)) == []
    assert runs["count"] == 2


def test_a_job_in_progress_is_not_started_by_a_second_worker(services: Services) -> None:
    """While one worker runs a job (slow: it outlasts the tick), another is refused, not queued."""
    started, release = threading.Event(), threading.Event()
    runs: Counter[str] = Counter()

    def slow(_: Services) -> object:
        runs["slow"] += 1
        started.set()
        release.wait(30)
        return None

    a = Scheduler(services, holder="a", jobs=[Job("slow", slow)], tick_seconds=TICK)
    b = Scheduler(services, holder="b", jobs=[Job("slow", slow)], tick_seconds=TICK)
    result: list[list[str]] = []
    thread = threading.Thread(target=lambda: result.append(a.run_due(T0)))
    thread.start()
    try:
        assert started.wait(30)
        # Even in the next tick, b must not start it while a still holds it.
        assert b.run_due(T0 + timedelta(seconds=TICK)) == []
    finally:
        release.set()
        thread.join(30)
    assert result == [["slow"]]
    assert runs["slow"] == 1
    assert b.run_due(T0 + timedelta(seconds=TICK + 1)) == ["slow"], "free again once a finished"


def test_a_failing_job_does_not_stop_the_others_and_is_retried(services: Services) -> None:
    runs: Counter[str] = Counter()

    def broken(_: Services) -> object:
        runs["broken"] += 1
        raise RuntimeError("boom")

    a = Scheduler(services, holder="a", jobs=[Job("broken", broken), counting(runs)], tick_seconds=TICK)
    assert a.run_due(T0) == ["count"]
    assert a.run_due(T0 + timedelta(seconds=1)) == [], "the failed job is retried in a later tick"
    assert a.run_due(T0 + timedelta(seconds=TICK)) == ["count"]
    assert runs == Counter({"broken": 2, "count": 2})


def test_retention_purges_old_delivered_items_and_keeps_recent_and_pending_ones(
    make_services: ServicesFactory, sqlite_url: str
) -> None:
    services = make_services(sqlite_url, retention_delivered_days=30, retention_dead_days=0)
    add_tenant(services.db, "ret", "http://127.0.0.1:9/fhir")
    seed(services.db, "ret", patient="p-old", records=6)
    now = datetime.now(UTC)
    with services.db.transaction() as session:
        ids = list(session.scalars(select(OutboxItem.id).order_by(OutboxItem.id)))
        old, recent, dead = ids[:3], ids[3:5], ids[5:6]
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id.in_(old))
            .values(status="delivered", delivered_at=now - timedelta(days=31))
        )
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id.in_(recent))
            .values(status="delivered", delivered_at=now - timedelta(days=1))
        )
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id.in_(dead))
            .values(status="dead", created_at=now - timedelta(days=400))
        )
    before = outbox_states(services.db, "ret")
    jobs = [j for j in default_jobs() if j.name == "retention-purge"]
    assert Scheduler(services, holder="a", jobs=jobs).run_due() == ["retention-purge"]
    after = outbox_states(services.db, "ret")
    assert after["delivered"] == 2, "only the items delivered more than 30 days ago went"
    assert after["dead"] == 1, "RETENTION_DEAD_DAYS=0 keeps dead letters"
    assert after["pending"] == before["pending"] > 0


def test_key_rotation_replaces_a_key_older_than_the_rotation_age(
    make_services: ServicesFactory, sqlite_url: str, tmp_path: Path
) -> None:
    keys = tmp_path / "rotating-keys"
    Keyring(keys).ensure(now=datetime.now(UTC) - timedelta(days=100))
    services = make_services(sqlite_url, keys_dir=str(keys), key_rotation_days=90)
    old = {e.kid for e in services.keyring.entries()}
    jobs = [j for j in default_jobs() if j.name == "key-rotation"]
    scheduler = Scheduler(services, holder="a", jobs=jobs, tick_seconds=TICK)
    assert scheduler.run_due() == ["key-rotation"]
    entries = services.keyring.entries()
    assert len(entries) == 2
    (new,) = [e for e in entries if e.kid not in old]
    (previous,) = [e for e in entries if e.kid in old]
    assert previous.retires_at is not None, "the old key stays published for its grace period"
    # A fresh key is not rotated again at the next tick.
    assert scheduler.run_due(datetime.now(UTC) + timedelta(seconds=TICK)) == ["key-rotation"]
    assert {e.kid for e in services.keyring.entries()} == {new.kid, previous.kid}


def test_claims_on_postgresql_lock_with_skip_locked(
    pg_server: PostgresServer, make_services: ServicesFactory
) -> None:
    """Claimers do not wait on each other on PostgreSQL: every locking SELECT of a claim skips
    rows another claimer holds (docs/deploy.md relies on this for N workers). The one exception, a
    group two claimers each locked part of, is test_outbox.py's split-group test."""
    from sqlalchemy import event

    from fhir_bridge.delivery import outbox

    services = make_services(pg_server.create_database())
    add_tenant(services.db, "skip", "http://127.0.0.1:9/fhir")
    seed(services.db, "skip", patient="p-skip", records=4)
    statements: list[str] = []

    def capture(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        statements.append(statement)

    event.listen(services.db.engine, "before_cursor_execute", capture)
    try:
        claim = outbox.claim(services.db, worker="w", limit=10, lease_seconds=30, tenants=["skip"])
    finally:
        event.remove(services.db.engine, "before_cursor_execute", capture)
    assert claim.items
    locking = [s for s in statements if "FOR UPDATE" in s]
    assert locking, statements
    assert all("FOR UPDATE SKIP LOCKED" in s for s in locking), locking
