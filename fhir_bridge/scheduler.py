"""Scheduled jobs: run by exactly one ``fhir-bridge worker`` at a time, once per tick.

Every worker process runs a :class:`Scheduler` thread; at each tick (``SCHEDULER_TICK_SECONDS``,
aligned on the epoch so every machine agrees which tick it is) each job is offered to all of them,
and only one runs it:

* On PostgreSQL the job runs under a session-level advisory lock (``pg_try_advisory_lock``) keyed by
  the job's name, taken on a connection held for the job's duration. The loser does not wait. If the
  holder dies, PostgreSQL drops its connection and with it the lock: nothing to expire or clean up.
* On SQLite (one machine; ``BEGIN IMMEDIATE`` serialises writers) a :class:`SchedulerLease` row is
  the lock: taken when free or expired, released when the job ends.

Either way the job's row in ``scheduler_leases`` records ``last_run_at``; a job whose last run falls
in the current tick is skipped, so two workers never run it twice in one tick, and a worker that
starts late in a tick does not repeat what another did at its beginning.

Jobs: signing-key rotation (``KEY_ROTATION_DAYS``) and purge of retired keys, the retention purge of
delivered and dead outbox items (their bodies hold PHI), and the absence-of-data rules
(:func:`fhir_bridge.rules.engine.maybe_run_scheduled`, at most every ``RULES_SCHEDULE_SECONDS``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from fhir_bridge.services import Services
from fhir_bridge.storage.models import SchedulerLease, utcnow

log = logging.getLogger(__name__)

JobFn = Callable[[Services], object]


@dataclass(frozen=True)
class Job:
    name: str
    run: JobFn


def rotate_keys(services: Services) -> object:
    """Rotate the signing key once it is ``KEY_ROTATION_DAYS`` old; forget keys past their grace.

    The keys folder must be shared by every machine that signs (see docs/deploy.md).
    """
    settings = services.settings
    keyring = services.keyring
    removed = keyring.purge_retired()
    rotated = None
    if settings.key_rotation_days:
        now = utcnow()
        newest = max(keyring.entries(), key=lambda e: e.created_at, default=None)
        if newest is None or now - newest.created_at >= timedelta(days=settings.key_rotation_days):
            rotated = keyring.rotate(
                lead=timedelta(seconds=settings.key_rotation_lead_seconds),
                grace=timedelta(seconds=settings.key_rotation_grace_seconds),
            ).kid
    return {"kid": rotated, "count": len(removed)}


def purge_outbox(services: Services) -> object:
    """Delete delivered/dead outbox items past their retention (``RETENTION_*_DAYS``; 0 keeps them)."""
    from fhir_bridge.delivery import outbox

    settings = services.settings
    purged = 0
    for status, days in (
        ("delivered", settings.retention_delivered_days),
        ("dead", settings.retention_dead_days),
    ):
        if days:
            purged += outbox.purge(services.db, statuses=[status], older_than=timedelta(days=days))
    return {"count": purged}


def scheduled_rules(services: Services) -> object:
    """Absence-of-data rules (e.g. disengagement). The engine keeps its own last run, so the rules'
    interval (``RULES_SCHEDULE_SECONDS``) holds whatever the scheduler's tick is: ``{"count": alerts
    fired}`` when they ran, ``{}`` when they were not due."""
    from fhir_bridge.rules import engine

    settings = services.settings
    fired = engine.maybe_run_scheduled(
        services.db,
        holder="scheduler",
        interval_seconds=settings.rules_schedule_seconds,
        rules_dir=settings.rules_dir,
    )
    return {} if fired is None else {"count": fired}


def default_jobs() -> list[Job]:
    return [
        Job("key-rotation", rotate_keys),
        Job("retention-purge", purge_outbox),
        Job("scheduled-rules", scheduled_rules),
    ]


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key per job (the audit chain uses its own constant)."""
    digest = hashlib.sha256(b"fhir-bridge.scheduler:" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


class Scheduler:
    """Offers every job once per tick; see the module docstring for who wins."""

    def __init__(
        self,
        services: Services,
        *,
        holder: str,
        jobs: list[Job] | None = None,
        tick_seconds: float | None = None,
    ) -> None:
        self.services = services
        self.db = services.db
        self.holder = holder[:128]
        self.jobs = default_jobs() if jobs is None else jobs
        self.tick_seconds = float(tick_seconds or services.settings.scheduler_tick_seconds)
        self.stop = threading.Event()

    def tick_of(self, moment: datetime) -> int:
        return int(moment.timestamp() // self.tick_seconds)

    # -- one tick --------------------------------------------------------------------------------

    def run_due(self, now: datetime | None = None) -> list[str]:
        """Run every job not yet run in this tick that no other worker is running; names of those run."""
        ran = []
        now = now or utcnow()  # one moment for all jobs: they belong to the same tick
        for job in self.jobs:
            if self.stop.is_set():
                break
            try:
                if self._offer(job, now):
                    ran.append(job.name)
            except Exception:
                # One failing job must not stop the others, nor the worker; it is retried next tick.
                log.exception("scheduled job failed", extra={"job": job.name, "worker": self.holder})
        return ran

    def _offer(self, job: Job, now: datetime) -> bool:
        if self.db.dialect == "postgresql":
            return self._offer_pg(job, now)
        return self._offer_lease(job, now)

    def _offer_pg(self, job: Job, now: datetime) -> bool:
        key = lock_key(job.name)
        with self.db.engine.connect() as conn:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            conn.commit()
            if not got:
                return False
            try:
                if not self._due(job, now):
                    return False
                try:
                    self._run(job, now)
                finally:  # a failed run also counts for this tick: the next tick retries it
                    with self.db.transaction() as session:
                        row = session.get(SchedulerLease, job.name)
                        if row is None:
                            row = SchedulerLease(name=job.name, holder=self.holder, lease_until=now)
                            session.add(row)
                        row.holder, row.lease_until, row.last_run_at = self.holder, now, now
                return True
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()

    def _offer_lease(self, job: Job, now: datetime) -> bool:
        lease = timedelta(seconds=max(300.0, 2 * self.tick_seconds))  # outlasts a slow job
        with self.db.transaction() as session:
            row = session.get(SchedulerLease, job.name)
            last = _aware(row.last_run_at) if row is not None else None
            if last is not None and self.tick_of(last) >= self.tick_of(now):
                return False
            if row is not None and row.holder != self.holder and (_aware(row.lease_until) or now) > now:
                return False  # another worker is running it
            if row is None:
                row = SchedulerLease(name=job.name, holder=self.holder, lease_until=now + lease)
                session.add(row)
            row.holder, row.lease_until = self.holder, now + lease
        try:
            self._run(job, now)
        finally:
            with self.db.transaction() as session:
                row = session.get(SchedulerLease, job.name)
                if row is not None and row.holder == self.holder:
                    row.lease_until = now  # released: free for any later moment
                    row.last_run_at = now
        return True

    def _due(self, job: Job, now: datetime) -> bool:
        with self.db.sessions() as session:
            row = session.get(SchedulerLease, job.name)
            last = _aware(row.last_run_at) if row is not None else None
        return last is None or self.tick_of(last) < self.tick_of(now)

    def _run(self, job: Job, now: datetime) -> None:
        started = time.perf_counter()
        outcome = job.run(self.services)
        # Jobs report counts and key ids only (log fields are an allow-list: no PHI).
        result = (
            {k: v for k, v in outcome.items() if k in {"kid", "count"}} if isinstance(outcome, dict) else {}
        )
        log.info(
            "scheduled job ran",
            extra={
                "job": job.name,
                "tick": self.tick_of(now),
                "worker": self.holder,
                "seconds": round(time.perf_counter() - started, 3),
            }
            | result,
        )

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        """Offer the jobs now, then just after every tick boundary, until :attr:`stop` is set."""
        while not self.stop.is_set():
            self.run_due()
            now = time.time()
            next_tick = (now // self.tick_seconds + 1) * self.tick_seconds
            self.stop.wait(max(0.01, next_tick - now + 0.01))

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="scheduler", daemon=True)
        thread.start()
        return thread
