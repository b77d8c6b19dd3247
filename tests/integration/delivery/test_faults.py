"""Faults on the way to the EHR. Each test ends the same way: every queued resource is in the EHR once.

The EHR is the third-party sekmet server with SMART Backend Services on; faults come from the server
itself (refusing an invalid resource, expiring tokens, being stopped), from a fault-injecting proxy in
front of it (429, 503, answers lost after the work was done), or from killing our worker with SIGKILL.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from sqlalchemy import func, select

from auth.backend import BackendTokenSource
from auth.keys import Keyring
from fhir_bridge.delivery import Worker, outbox
from fhir_bridge.fhir_client import FhirClient, outcome_text
from fhir_bridge.services import Services
from fhir_bridge.storage import Database
from fhir_bridge.storage.models import DeliveryAttempt, OutboxItem, Record, utcnow
from tests.integration.delivery.conftest import (
    CLIENT_ID,
    ServicesFactory,
    drain,
    pending,
    reader_for,
    start_sekmet,
)
from tests.support.fault_proxy import Delay, FaultProxy, ForwardThenDrop, Pass, Respond
from tests.support.outbox_seed import add_tenant, in_ehr, outbox_states, seed
from tests.support.postgres import PostgresServer
from tests.support.sekmet import SekmetServer
from tests.support.worker_proc import WorkerProcess

pytestmark = [pytest.mark.ehr]

QR_PUT = {"no_conditional_create": ["QuestionnaireResponse"]}


def new_patient() -> str:
    return f"p{uuid.uuid4().hex[:12]}"


def behind_proxy(services: Services, tenant: str, proxy: FaultProxy, ehr: SekmetServer) -> None:
    """A tenant whose FHIR requests go through the fault proxy and whose tokens come from the EHR."""
    add_tenant(
        services.db, tenant, proxy.base_url, client_id=CLIENT_ID, token_url=ehr.token_url, quirks=QR_PUT
    )


@pytest.fixture
def proxy(smart_ehr: SekmetServer) -> Iterator[FaultProxy]:
    server = FaultProxy(smart_ehr.base_url).start()
    yield server
    server.stop()


@pytest.mark.parametrize("strategy", ["transaction", "batch", "single"])
def test_an_invalid_entry_is_dead_lettered_with_its_outcome_and_the_rest_delivered(
    strategy: str,
    smart_ehr: SekmetServer,
    ehr_reader: FhirClient,
    make_services: ServicesFactory,
    sqlite_url: str,
) -> None:
    services = make_services(sqlite_url, worker_batch_size=50)
    tenant = f"bad-{strategy}"
    add_tenant(services.db, tenant, smart_ehr.base_url, client_id=CLIENT_ID, strategy=strategy, quirks=QR_PUT)
    patient = new_patient()
    # Record 2 is a questionnaire whose score Observation lacks its status; record 7 a lone step count.
    seeded = seed(services.db, tenant, patient=patient, records=20, invalid=[2, 7])
    drain(Worker(services), tenant)

    with services.db.sessions() as session:
        dead = list(session.scalars(select(OutboxItem).where(OutboxItem.status == "dead")))
        record_status = {r.id: r.status for r in session.scalars(select(Record))}
    bad_records = {seeded.records[2], seeded.records[7]}
    invalid_obs = [d for d in dead if d.resource_type == "Observation"]
    assert {d.record_id for d in invalid_obs} == bad_records
    for item in invalid_obs:
        assert item.last_status == 400
        assert item.outcome is not None and item.outcome["resourceType"] == "OperationOutcome"
        assert "status" in outcome_text(item.outcome), "the EHR's own words say what is wrong"
    assert {rid for rid, status in record_status.items() if status == "dead"} == bad_records
    assert {rid for rid, status in record_status.items() if status == "delivered"} == set(
        seeded.records
    ) - bad_records

    held = {(d.resource_type, d.ident_value) for d in dead}
    if strategy == "transaction":
        # A record is all-or-nothing in a transaction: its QuestionnaireResponse waits with it.
        assert ("QuestionnaireResponse", seeded.items[3][1]) in held
    expected = Counter(item for item in seeded.items if item not in held)
    assert in_ehr(ehr_reader, patient) == expected

    # Hospital IT fixes the data and replays the dead letters: now everything is there, once.
    with services.db.transaction() as session:
        for item in session.scalars(select(OutboxItem).where(OutboxItem.status == "dead")):
            body = orjson.loads(item.body)
            body.setdefault("status", "final")
            item.body = orjson.dumps(body)
    assert outbox.retry_dead(services.db, tenant=tenant) == len(dead)
    drain(Worker(services), tenant)
    assert in_ehr(ehr_reader, patient) == Counter(seeded.items)
    assert outbox_states(services.db, tenant) == Counter({"delivered": len(seeded.items)})


def test_429_with_retry_after_and_503s_delay_delivery_but_lose_nothing(
    smart_ehr: SekmetServer,
    ehr_reader: FhirClient,
    proxy: FaultProxy,
    make_services: ServicesFactory,
    sqlite_url: str,
) -> None:
    services = make_services(sqlite_url, worker_batch_size=20)
    behind_proxy(services, "busy", proxy, smart_ehr)
    patient = new_patient()
    seeded = seed(services.db, "busy", patient=patient, records=60)
    maintenance = Respond(503, body=b"<html>maintenance</html>", headers=(("Content-Type", "text/html"),))
    proxy.queue(
        Respond(429, (("Retry-After", "1"),)),
        Respond(503),
        Respond(503, (("Retry-After", "Wed, 21 Oct 2015 07:28:00 GMT"),)),  # a date in the past
        *[maintenance] * 6,
    )
    started = time.monotonic()
    drain(Worker(services), "busy", timeout=60)
    assert time.monotonic() - started >= 1.0, "the 429's Retry-After was honoured"
    assert proxy.injected == 9
    assert in_ehr(ehr_reader, patient) == Counter(seeded.items)
    assert outbox_states(services.db, "busy") == Counter({"delivered": len(seeded.items)})


def test_a_long_retry_after_reschedules_instead_of_retrying_in_a_loop(
    smart_ehr: SekmetServer, proxy: FaultProxy, make_services: ServicesFactory, sqlite_url: str
) -> None:
    services = make_services(sqlite_url, worker_retry_max_seconds=600)
    behind_proxy(services, "throttled", proxy, smart_ehr)
    seed(services.db, "throttled", patient=new_patient(), records=5)
    proxy.during(600, Respond(429, (("Retry-After", "120"),)))
    worker = Worker(services)
    before = utcnow()
    assert worker.run_once() > 0
    assert proxy.injected == 1, "one request, then the wait is handed to the queue"
    with services.db.sessions() as session:
        due = set(session.scalars(select(OutboxItem.next_attempt_at)))
    assert all(d >= before + timedelta(seconds=119) for d in due)
    assert worker.run_once() == 0, "nothing is due and the tenant is paused"
    assert proxy.injected == 1


def test_the_pipelined_loop_holds_back_the_batch_it_claimed_while_the_ehr_was_refusing(
    smart_ehr: SekmetServer, proxy: FaultProxy, make_services: ServicesFactory, sqlite_url: str
) -> None:
    """The delivery loop claims batch N+1 while batch N is with the EHR. When N comes back 429, the
    tenant is paused before N+1 would be sent: N+1 goes back to the queue untouched, and the EHR sees
    one request, not one per batch claimed. Stopping the loop leaves no lease behind."""
    services = make_services(sqlite_url, worker_batch_size=5, worker_retry_max_seconds=600)
    behind_proxy(services, "piped", proxy, smart_ehr)
    seed(services.db, "piped", patient=new_patient(), records=40)
    proxy.during(600, Respond(429, (("Retry-After", "120"),)))
    worker = Worker(services)
    loop = threading.Thread(target=worker.run, kwargs={"threads": 1})
    loop.start()
    try:
        _wait_for(lambda: proxy.injected >= 1, what="the first request")
        time.sleep(1.0)  # many fast polls: none may send while the tenant is paused
    finally:
        worker.stop.set()
        loop.join(30)
    assert proxy.injected == 1, "one request, then the tenant waits; the batch claimed meanwhile is not sent"
    with services.db.sessions() as session:
        rows = session.execute(select(OutboxItem.status, OutboxItem.attempts, OutboxItem.leased_by)).all()
        tried = session.scalar(select(func.count(func.distinct(DeliveryAttempt.outbox_id))))
    assert {status for status, _, _ in rows} == {"pending"}, "nothing dead-lettered or lost"
    assert {leased_by for _, _, leased_by in rows} == {None}, "stopping hands every claim back"
    assert max(attempts for _, attempts, _ in rows) == 1
    assert 0 < (tried or 0) <= 5, "only the batch that was sent counts an attempt"


def test_a_long_queue_is_claimed_ahead_even_when_whole_groups_leave_each_claim_short(
    smart_ehr: SekmetServer,
    proxy: FaultProxy,
    ehr_reader: FhirClient,
    make_services: ServicesFactory,
    sqlite_url: str,
) -> None:
    """With a backlog, the loop claims the next batch while the current one is with the EHR, so the
    EHR never waits for our claim. Claims take whole groups: with batches of 5 and records of 2
    items (a questionnaire and its score), each claim stops at 4 items although the queue is long.
    That short claim once read as "keeping up", and the next claim waited for the EHR's answer."""
    services = make_services(sqlite_url, worker_batch_size=5)
    behind_proxy(services, "ahead", proxy, smart_ehr)
    patient = new_patient()
    seeded = seed(services.db, "ahead", patient=patient, records=12, kinds=("phq9",))
    proxy.queue(Delay(3.0))  # the first Bundle stays with the "EHR" for 3 s

    def leased() -> int:
        with services.db.sessions() as session:
            count = session.scalar(
                select(func.count())
                .select_from(OutboxItem)
                .where(OutboxItem.status == "pending", OutboxItem.leased_by.is_not(None))
            )
        return int(count or 0)

    worker = Worker(services)
    loop = threading.Thread(target=worker.run, kwargs={"threads": 1})
    loop.start()
    try:
        _wait_for(lambda: leased() >= 4, what="the first claim")
        time.sleep(1.0)  # the first Bundle is still delayed at the proxy
        in_hand = leased()
        drain_deadline = time.monotonic() + 60
        while outbox_states(services.db, "ahead") != Counter({"delivered": len(seeded.items)}):
            assert time.monotonic() < drain_deadline, outbox_states(services.db, "ahead")
            time.sleep(0.1)
    finally:
        worker.stop.set()
        loop.join(30)
    assert in_hand == 8, "two claims of 4 in hand: the one with the EHR and the next, claimed meanwhile"
    held = in_ehr(ehr_reader, patient)
    assert len(held) == len(seeded.items) and set(held.values()) == {1}, "each resource once"


def test_an_ehr_failing_every_time_dead_letters_after_the_attempt_budget(
    smart_ehr: SekmetServer, proxy: FaultProxy, make_services: ServicesFactory, sqlite_url: str
) -> None:
    services = make_services(sqlite_url, worker_max_attempts=3, worker_retry_max_seconds=0.2)
    behind_proxy(services, "broken", proxy, smart_ehr)
    seeded = seed(services.db, "broken", patient=new_patient(), records=4)
    issue = {"severity": "fatal", "code": "exception", "diagnostics": "database unavailable"}
    outcome = {"resourceType": "OperationOutcome", "issue": [issue]}
    proxy.during(600, Respond(500, (("Content-Type", "application/fhir+json"),), orjson.dumps(outcome)))
    drain(Worker(services), "broken", timeout=60)
    with services.db.sessions() as session:
        items = list(session.scalars(select(OutboxItem).where(OutboxItem.tenant_id == "broken")))
        tries = session.scalar(select(func.count()).select_from(DeliveryAttempt))
    assert {i.status for i in items} == {"dead"} and len(items) == len(seeded.items)
    assert {i.attempts for i in items} == {3}
    assert tries == 3 * len(items), "one delivery attempt row per item per try"
    for item in items:
        assert item.last_status == 500
        assert "gave up after 3 attempts" in outcome_text(item.outcome)
        assert "database unavailable" in outcome_text(item.outcome), "the EHR's own words are kept"


@pytest.mark.parametrize("strategy", ["transaction", "single"])
def test_an_answer_lost_after_the_ehr_did_the_work_is_repeated_safely(
    strategy: str,
    smart_ehr: SekmetServer,
    ehr_reader: FhirClient,
    proxy: FaultProxy,
    make_services: ServicesFactory,
    sqlite_url: str,
) -> None:
    services = make_services(sqlite_url)
    tenant = f"lost-{strategy}"
    add_tenant(
        services.db,
        tenant,
        proxy.base_url,
        client_id=CLIENT_ID,
        token_url=smart_ehr.token_url,  # the faults are for FHIR requests, not discovery
        strategy=strategy,
        quirks=QR_PUT,
    )
    patient = new_patient()
    # Single: conditional creates only (PUT is idempotent anyway), so the lost answers are for POSTs.
    seeded = seed(
        services.db,
        tenant,
        patient=patient,
        records=6,
        kinds=["steps"] if strategy == "single" else ["phq9", "steps"],
    )
    # The EHR writes, the answer never arrives (for single: after the Device, two resources).
    lost = (ForwardThenDrop(), ForwardThenDrop())
    proxy.queue(*lost) if strategy == "transaction" else proxy.queue(Pass(), *lost)
    worker = Worker(services)
    worker.run_once()
    with services.db.sessions() as session:
        unheard = {
            (i.resource_type, i.ident_value)
            for i in session.scalars(
                select(OutboxItem).where(OutboxItem.status == "pending", OutboxItem.attempts == 1)
            )
        }
    assert unheard, "the lost answers were recorded as failed attempts"
    assert unheard <= set(in_ehr(ehr_reader, patient)), "yet the EHR had written them"

    drain(worker, tenant)
    assert in_ehr(ehr_reader, patient) == Counter(seeded.items), "the repeat created no duplicate"
    with services.db.sessions() as session:
        for item in session.scalars(select(OutboxItem)):
            if item.resource_type == "Observation":
                found = ehr_reader.read("Observation", str(item.ehr_id))
                assert found["identifier"][0]["value"] == item.ident_value


def test_token_expiry_and_a_key_rotation_mid_run_break_nothing(
    keys_dir: Path, make_services: ServicesFactory, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Tokens lapse every 5 s and our signing key changes half-way; delivery never notices.

    The new key is published before it signs (KEY_ROTATION_LEAD_SECONDS), so the EHR knows both when
    the switch happens, as it would after fetching our JWKS during the lead time.
    """
    keyring = Keyring(keys_dir)
    old_kid = keyring.signing_key().kid
    new_kid = keyring.rotate(lead=timedelta(seconds=5), grace=timedelta(minutes=10)).kid
    server = start_sekmet(keys_dir, token_lifetime=5)
    front = FaultProxy(server.base_url).start()
    caplog.set_level(logging.INFO, logger="auth.backend")
    try:
        services = make_services(sqlite_url, worker_batch_size=10, keys_dir=str(keys_dir))
        add_tenant(
            services.db,
            "short",
            front.base_url,
            client_id=CLIENT_ID,
            token_url=server.token_url,
            quirks=QR_PUT,
        )
        patient = new_patient()
        worker = Worker(services)
        expected: Counter[tuple[str, str]] = Counter()
        started = time.monotonic()
        while time.monotonic() - started < 12:  # records keep arriving for over two token lifetimes
            expected.update(seed(services.db, "short", patient=patient, records=2).items)
            worker.run_once()
            time.sleep(0.3)
        drain(worker, "short")
        runtime = worker.directory.get("short")
        assert runtime is not None and isinstance(runtime.client.auth, BackendTokenSource)
        assert runtime.client.auth.fetches >= 3, "new tokens were fetched as the old ones neared expiry"
        assert front.statuses[401] == 0, "no request went out with an expired token"
        # "kid" comes in through the log call's extra=, so LogRecord's type does not know it.
        kids = [r.__dict__["kid"] for r in caplog.records if r.getMessage() == "access token obtained"]
        assert kids[0] == old_kid and kids[-1] == new_kid, "the running worker switched keys by itself"
        assert in_ehr(reader_for(server, keys_dir), patient) == expected
        assert outbox_states(services.db, "short") == Counter({"delivered": sum(expected.values())})
    finally:
        front.stop()
        server.cleanup()


def test_the_ehr_stopped_mid_run_drains_by_itself_when_it_returns(
    session_keys: Path, make_services: ServicesFactory, sqlite_url: str
) -> None:
    server = start_sekmet(session_keys)
    try:
        services = make_services(
            sqlite_url, worker_batch_size=25, worker_retry_max_seconds=1.0, worker_max_attempts=3
        )
        add_tenant(
            services.db,
            "down",
            server.base_url,
            client_id=CLIENT_ID,
            token_url=server.token_url,
            quirks=QR_PUT,
        )
        patient = new_patient()
        seeded = seed(services.db, "down", patient=patient, records=400)
        total = len(seeded.items)
        worker = Worker(services)
        loop = threading.Thread(target=worker.run, kwargs={"threads": 2})
        loop.start()
        try:
            _wait_for(lambda: outbox_states(services.db, "down")["delivered"] > 50, what="first deliveries")
            server.stop()
            time.sleep(3)  # long enough for many failed probes: more than WORKER_MAX_ATTEMPTS
            stuck = outbox_states(services.db, "down")
            assert 0 < stuck["delivered"] < total
            server.start()
            _wait_for(lambda: not pending(services.db, "down"), what="the backlog to drain", timeout=90)
        finally:
            worker.stop.set()
            loop.join(30)
        assert outbox_states(services.db, "down") == Counter({"delivered": total}), "nothing dead-lettered"
        with services.db.sessions() as session:
            unreachable = session.scalar(
                select(func.count())
                .select_from(DeliveryAttempt)
                .where(DeliveryAttempt.error.like("%connect%"))
            )
        assert unreachable, "the outage is visible in the delivery attempts"
        assert in_ehr(reader_for(server, session_keys), patient) == Counter(seeded.items)
    finally:
        server.cleanup()


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    smart_ehr: SekmetServer,
    ehr_reader: FhirClient,
    make_services: ServicesFactory,
    tmp_path: Path,
    session_keys: Path,
) -> None:
    database = tmp_path / "kill.db"
    services = make_services(f"sqlite:///{database}")
    add_tenant(services.db, "kill", smart_ehr.base_url, client_id=CLIENT_ID, quirks=QR_PUT)
    settings = {
        "instance_path": tmp_path / "worker-instance",
        "keys_dir": session_keys,
        "database_url": f"sqlite:///{database}",
        "allow_insecure_loopback": "true",
        "worker_batch_size": 20,
        "worker_lease_seconds": 2,
        "worker_poll_seconds": 0.05,
        "worker_retry_base_seconds": 0.1,
        "worker_retry_max_seconds": 1,
        "log_level": "INFO",
    }
    seeds = range(5)
    mid_batch = 0  # kills that left claimed-but-unrecorded work behind
    for run in seeds:
        rng = random.Random(run)
        patient = new_patient()
        seeded = seed(services.db, "kill", patient=patient, records=rng.randint(120, 200))
        kills = hits = 0
        # Three kills per run, more (up to eight) until one of them lands in the middle of a batch:
        # where a kill lands depends on the machine's load, and that case is the one that matters.
        while (kills < 3 or (not hits and kills < 8)) and pending(services.db, "kill"):
            proc = WorkerProcess(settings, cwd=tmp_path, log=tmp_path / f"worker-{run}.log").start()
            try:
                before = outbox_states(services.db, "kill")["delivered"]
                _wait_for(
                    lambda before=before: (
                        outbox_states(services.db, "kill")["delivered"] > before
                        or not pending(services.db, "kill")
                    ),
                    what="the worker to start delivering",
                    timeout=30,
                )
                time.sleep(rng.uniform(0, 0.4))
            finally:
                proc.kill()
            kills += 1
            hits += held_by_dead_worker(services.db, "kill") > 0
        mid_batch += hits
        survivor = (
            WorkerProcess(settings, cwd=tmp_path, log=tmp_path / f"survivor-{run}.log").start().wait_ready()
        )
        try:
            _wait_for(lambda: not pending(services.db, "kill"), what="the backlog to drain", timeout=90)
        finally:
            assert survivor.terminate() == 0, "SIGTERM: the worker finishes its batch and exits cleanly"
        assert in_ehr(ehr_reader, patient) == Counter(seeded.items), f"seed {run}"
    assert set(outbox_states(services.db, "kill")) == {"delivered"}
    assert mid_batch >= 1, "no kill landed in the middle of a batch: the test did not test that case"


def held_by_dead_worker(db: Database, tenant: str) -> int:
    with db.sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(OutboxItem)
                .where(
                    OutboxItem.tenant_id == tenant,
                    OutboxItem.status == "pending",
                    OutboxItem.lease_until > utcnow(),
                )
            )
            or 0
        )


def test_two_worker_processes_on_postgresql_share_the_queue_and_the_schedule_without_duplicates(
    smart_ehr: SekmetServer,
    ehr_reader: FhirClient,
    pg_server: PostgresServer,
    make_services: ServicesFactory,
    tmp_path: Path,
    session_keys: Path,
) -> None:
    url = pg_server.create_database()
    services = make_services(url)
    add_tenant(services.db, "pair", smart_ehr.base_url, client_id=CLIENT_ID, quirks=QR_PUT)
    patient = new_patient()
    seeded = seed(services.db, "pair", patient=patient, records=500)
    settings = {
        "instance_path": tmp_path / "worker-instance",
        "keys_dir": session_keys,
        "database_url": url,
        "allow_insecure_loopback": "true",
        "worker_batch_size": 25,
        "worker_threads": 2,
        "worker_poll_seconds": 0.05,
        "log_level": "INFO",
        "log_format": "json",
        "scheduler_tick_seconds": 1,
    }
    logs = [tmp_path / f"w{n}.log" for n in range(2)]
    workers = [WorkerProcess(settings, cwd=tmp_path, log=log).start() for log in logs]
    for worker in workers:
        worker.wait_ready()
    try:
        _wait_for(lambda: not pending(services.db, "pair"), what="the backlog to drain", timeout=120)
        # Both workers offer every job at every 1-second tick; let at least four ticks pass.
        _wait_for(lambda: len({tick for _, tick in _job_runs(logs)}) >= 5, what="five ticks", timeout=30)
    finally:
        codes = [w.terminate() for w in workers]
    assert codes == [0, 0]
    runs = Counter(_job_runs(logs))
    assert {job for job, _ in runs} >= {"key-rotation", "retention-purge"}
    assert set(runs.values()) == {1}, f"a job ran twice in one tick: {runs}"
    # Each job kept running tick after tick. One tick may go by without it: when the worker holding
    # the job's lock runs late past a boundary (a loaded machine), the other finds the lock taken and
    # leaves that tick to it; the job runs at the next. A schedule that regularly skipped ticks (every
    # other one, say) fails here. The last tick may have been cut short by the SIGTERM.
    ticks = sorted({tick for _, tick in runs})[:-1]
    for job in ("key-rotation", "retention-purge"):
        ran = {t for j, t in runs if j == job}
        missed = [t for t in ticks if t not in ran]
        assert len(missed) <= 1 and len(ticks) >= 4, f"{job} missed ticks {missed} of {ticks}"
    with services.db.sessions() as session:
        by_process = Counter(
            name.rsplit(":", 1)[0] for name in session.scalars(select(DeliveryAttempt.worker))
        )
    assert len(by_process) == 2, "both processes delivered"
    assert in_ehr(ehr_reader, patient) == Counter(seeded.items)
    with services.db.sessions() as session:
        assert session.scalar(select(func.max(OutboxItem.attempts))) == 1, "no item was written twice"


def _job_runs(logs: list[Path]) -> list[tuple[str, int]]:
    """(job, tick) of every "scheduled job ran" line the worker processes logged."""
    runs = []
    for log in logs:
        for line in log.read_text().splitlines():
            if line.startswith("{") and '"scheduled job ran"' in line:
                entry = orjson.loads(line)
                runs.append((entry["job"], entry["tick"]))
    return runs


def _wait_for(check: object, *, what: str, timeout: float = 60) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
