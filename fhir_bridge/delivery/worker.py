"""The outbox worker: claim groups, write them to their EHR, record what happened, repeat.

It runs as `fhir-bridge worker` (until SIGTERM/SIGINT; the batch in hand is finished first) or as a
background thread of the web service when ``WORKER_EMBEDDED`` is on. Any number of workers may run
against one database: claims are leased (see :mod:`fhir_bridge.delivery.outbox`), and writes are
conditional, so a worker killed at any instant leaves nothing half-done that a repeat cannot fix.

Retry policy, per item: a temporary failure is retried after ``WORKER_RETRY_BASE_SECONDS`` doubling
per attempt up to ``WORKER_RETRY_MAX_SECONDS`` (equal jitter, and never before a ``Retry-After``);
after ``WORKER_MAX_ATTEMPTS`` attempts, or at once on a permanent refusal, the item is dead-lettered
with the EHR's OperationOutcome. A try counts as an attempt only when the request may have reached
the EHR: an EHR that is switched off, or a token endpoint that is down, delays the queue but never
dead-letters it.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError

from fhir_bridge.delivery import outbox
from fhir_bridge.delivery.outbox import Claim, Item, Result, Vendor
from fhir_bridge.delivery.tenants import TenantDirectory, TenantRuntime
from fhir_bridge.delivery.writers import (
    Group,
    TransactionWriter,
    Writer,
    Written,
    make_outcome,
    make_writer,
)
from fhir_bridge.ops import metrics
from fhir_bridge.relationship import webhooks
from fhir_bridge.services import Services
from fhir_bridge.storage.models import utcnow
from mappings import MappedResource
from mappings.identity import device_resource, full_url

log = logging.getLogger(__name__)

# First idle pause after a batch (doubling up to WORKER_POLL_SECONDS): records pushed a moment after
# the last claim are picked up at once, and an idle worker still looks only once per poll interval.
FAST_POLL_SECONDS = 0.02


def worker_name() -> str:
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Policy:
    batch_size: int
    backfill_batch_size: int
    lease_seconds: float
    poll_seconds: float
    max_attempts: int
    retry_base: float
    retry_cap: float

    @classmethod
    def from_services(cls, services: Services) -> Policy:
        s = services.settings
        return cls(
            batch_size=s.worker_batch_size,
            backfill_batch_size=s.worker_backfill_batch_size,
            lease_seconds=float(s.worker_lease_seconds),
            poll_seconds=s.worker_poll_seconds,
            max_attempts=s.worker_max_attempts,
            retry_base=s.worker_retry_base_seconds,
            retry_cap=s.worker_retry_max_seconds,
        )

    def backoff(self, attempts: int) -> float:
        """Pause after the ``attempts``-th failed attempt: exponential, capped, equal jitter."""
        ceiling = min(self.retry_cap, self.retry_base * 2.0 ** max(0, attempts - 1))
        return ceiling * random.uniform(0.5, 1.0)  # noqa: S311


@dataclass
class _Job:
    """One tenant's share of a claim: one Bundle (or one round of writes), from claim to record."""

    claim: Claim
    tenant_id: str
    items: list[Item]
    runtime: TenantRuntime | None
    groups: list[Group]
    guard: Callable[[], bool]
    writer: Writer | None = None  # made (and its first request built) at claim time; None: no runtime
    elapsed: float | None = None  # seconds the write took; None while unsent (or released unsent)


class _InFlight:
    """One job being sent on its own daemon thread (a thread per Bundle costs microseconds; unlike an
    executor's thread, it neither holds up interpreter exit nor refuses work once exit has begun,
    which would strand the embedded worker's claimed jobs until their leases ran out)."""

    def __init__(
        self, send: Callable[[_Job], tuple[dict[int, Written] | None, float]], job: _Job, name: str
    ) -> None:
        self.job = job
        self._send = send
        self._value: tuple[dict[int, Written] | None, float] = (None, 0.0)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._send(self.job)
        except BaseException as exc:  # handed to the loop, which decides
            self._error = exc

    def result(self) -> tuple[dict[int, Written] | None, float]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class Worker:
    """One delivery loop (or several, sharing tenant runtimes and token caches, with ``threads``)."""

    def __init__(
        self,
        services: Services,
        *,
        name: str | None = None,
        policy: Policy | None = None,
        directory: TenantDirectory | None = None,
    ) -> None:
        self.services = services
        self.db = services.db
        self.name = name or worker_name()
        self.policy = policy or Policy.from_services(services)
        self.directory = directory or TenantDirectory(services.db, services.keyring, services.settings)
        self.stop = threading.Event()
        self._webhooks_due = 0.0

    # -- one batch ------------------------------------------------------------------------------

    def run_once(self, *, loop: int = 0) -> int:
        """Claim and deliver one batch (and the vendors' due webhook events); how many were handled.

        Webhooks are looked at whenever the outbox is idle, and at most once a second while it is busy
        (each look is a transaction, and on SQLite a transaction takes the write lock).
        """
        handled = self._outbox_once(loop)
        if handled == 0 or time.monotonic() >= self._webhooks_due:
            self._webhooks_due = time.monotonic() + 1.0
            handled += self._webhooks()
        return handled

    def _webhooks(self) -> int:
        """Vendors' webhook events (issue 10), signed, at least once: fhir_bridge.relationship.webhooks."""
        settings = self.services.settings
        return webhooks.deliver_due(
            self.db,
            self.services.keyring,
            issuer=settings.public_url,
            timeout=settings.http_timeout_seconds,
            max_attempts=self.policy.max_attempts,
            backoff=self.policy.backoff,
            allow_insecure_loopback=settings.allow_insecure_loopback,
        )

    def _outbox_once(self, loop: int) -> int:
        jobs = self._claim_jobs(loop)
        for job in jobs:
            self._record(job, self._finish(job, *self._send(job)))
        return sum(len(job.items) for job in jobs)

    def _claim(self, loop: int) -> Claim | None:
        """Claim the next batch: live data first, always; backfill only when no live item is due."""
        tenants = self.directory.deliverable()
        if not tenants:
            return None
        # Backfill is claimed in large batches; its tenant's backfill rate limit applies when it is
        # written.
        claim = outbox.claim(
            self.db,
            worker=f"{self.name}/{loop}",
            limit=self.policy.batch_size,
            lease_seconds=self.policy.lease_seconds,
            tenants=tenants,
            backfill=False,
        )
        if not claim.items:
            claim = outbox.claim(
                self.db,
                worker=f"{self.name}/{loop}",
                limit=self.policy.backfill_batch_size,
                lease_seconds=self.policy.lease_seconds,
                tenants=tenants,
                backfill=True,
            )
        return claim if claim.items else None

    def _claim_jobs(self, loop: int) -> list[_Job]:
        """The next claim as one job per tenant (one Bundle each), ready to send."""
        claim = self._claim(loop)
        if claim is None:
            return []
        return [self._prepare(claim, tenant_id, items) for tenant_id, items in claim.by_tenant().items()]

    def _prepare(self, claim: Claim, tenant_id: str, items: list[Item]) -> _Job:
        """Everything before the request: the tenant's runtime, the groups, a writer with its guard."""
        runtime = self.directory.get(tenant_id)
        ids = [item.id for item in items]

        def keep_lease() -> bool:
            left = (claim.lease_until - utcnow()).total_seconds()
            if left > self.policy.lease_seconds / 2:
                return True
            return outbox.extend_lease(self.db, claim, ids, self.policy.lease_seconds)

        job = _Job(claim, tenant_id, items, runtime, self._groups(claim, items), keep_lease)
        if runtime is not None:
            job.writer = self._writer(job, runtime)
            if isinstance(job.writer, TransactionWriter):
                # While the previous Bundle is with the EHR (see TransactionWriter.prepare).
                job.writer.prepare(job.groups)
        return job

    def _writer(self, job: _Job, runtime: TenantRuntime) -> Writer:
        known = {
            full_url(system, value): f"{resource_type}/{ehr_id}"
            for (tenant, resource_type, system, value), ehr_id in job.claim.delivered.items()
            if tenant == job.tenant_id
        }
        backfill = all(item.priority >= 1 for item in job.items)
        client = runtime.backfill_client if backfill and runtime.backfill_client else runtime.client
        return make_writer(
            runtime.strategy,
            client,
            put_types=runtime.put_types,
            device_ids=runtime.device_ids,
            guard=job.guard,
            known=known,
            provenance=runtime.provenance,
        )

    def _send(self, job: _Job) -> tuple[dict[int, Written] | None, float]:
        """The request(s) to the EHR (no database work but a lease extension in a long write).

        None when nothing was sent: the tenant is unknown or paused (checked now, not when the job
        was claimed, so a pause tripped by the previous batch holds this one back).
        """
        runtime = job.runtime
        if runtime is None or job.writer is None or runtime.paused():
            return None, 0.0
        started = time.perf_counter()
        written = job.writer.write(job.groups)
        return written, time.perf_counter() - started

    def _finish(self, job: _Job, written: dict[int, Written] | None, elapsed: float) -> list[Result]:
        """Outbox results for a sent job; trips or resets the tenant's health (no database work)."""
        if written is None or job.runtime is None:
            now = utcnow()
            return [Result(i.id, "release", attempted=False, next_attempt_at=now) for i in job.items]
        job.elapsed = elapsed
        return self._results(job.runtime, job.items, written, elapsed)

    def _record(self, job: _Job, results: list[Result]) -> None:
        """One transaction: the results of a job (executemany per shape, see outbox.record)."""
        stored = outbox.record(self.db, job.claim.worker, results)
        if job.elapsed is None:
            return  # released unsent
        fates = Counter(r.fate for r in results)
        if stored < len(results):
            log.warning(
                "lease lost before results were recorded; another worker repeats these",
                extra={"tenant": job.tenant_id, "count": len(results) - stored, "worker": job.claim.worker},
            )
        metrics.DELIVERED.labels(job.tenant_id).inc(fates["delivered"])
        log.info(
            "batch written",
            extra={
                "tenant": job.tenant_id,
                "outbox_items": len(job.items),
                "delivered": fates["delivered"],
                "failed": fates["retry"] + fates["release"],
                "dead": fates["dead"],
                "seconds": round(job.elapsed, 3),
                "worker": job.claim.worker,
            },
        )

    def _groups(self, claim: Claim, items: Sequence[Item]) -> list[Group]:
        groups: OrderedDict[str, Group] = OrderedDict()
        devices: dict[Vendor, MappedResource] = {}
        for item in items:
            group = groups.get(item.group_key)
            if group is None:
                vendor = claim.vendors.get(item.record_id) if item.record_id is not None else None
                device = None
                if vendor is not None:
                    device = devices.get(vendor)
                    if device is None:
                        device = devices[vendor] = device_resource(vendor.client_id, vendor.name)
                group = groups[item.group_key] = Group(item.group_key, [], device)
            group.items.append(item)
        return list(groups.values())

    def _results(
        self, runtime: TenantRuntime, items: Sequence[Item], written: dict[int, Written], elapsed: float
    ) -> list[Result]:
        now = utcnow()
        per_item_ms = int(elapsed * 1000 / max(1, len(items)))
        # Did the EHR as a whole fail (rather than one resource)? Then pause this tenant here.
        outcomes = [written.get(item.id) for item in items]
        failures = [w for w in outcomes if w is not None and w.state == "failed"]
        ehr_wide = [w for w in failures if not w.reached or w.auth_problem or w.status in {429, 503}]
        pause_until: datetime | None = None
        if ehr_wide or (failures and len(failures) == len(items)):
            retry_after = max((w.retry_after or 0.0 for w in failures), default=0.0) or None
            pause = runtime.trip(
                base=self.policy.retry_base, cap=self.policy.retry_cap, retry_after=retry_after
            )
            pause_until = now + timedelta(seconds=pause)
            kind = (
                "auth"
                if any(w.auth_problem for w in ehr_wide)
                else "unreachable"
                if ehr_wide
                else "temporary"
            )
            log.warning(
                "EHR failing; pausing delivery to it",
                extra={"tenant": runtime.tenant_id, "error_code": kind, "seconds": round(pause, 1)},
            )
        elif any(w is not None and w.state == "delivered" for w in outcomes):
            runtime.reset()

        results: list[Result] = []
        for item, w in zip(items, outcomes, strict=True):
            if w is None:
                w = Written("held", message="not handled")
            results.append(self._result(item, w, now, pause_until, per_item_ms, runtime.tenant_id))
        return results

    def _result(
        self,
        item: Item,
        w: Written,
        now: datetime,
        pause_until: datetime | None,
        duration_ms: int,
        tenant_id: str,
    ) -> Result:
        if w.state == "delivered":
            return Result(
                item.id,
                "delivered",
                ehr_id=w.ehr_id,
                ehr_version=w.ehr_version,
                http_status=w.status,
                duration_ms=duration_ms,
            )
        if w.state == "held":
            return Result(item.id, "release", attempted=False, next_attempt_at=now, error=None)
        if w.state == "rejected":
            metrics.DELIVERY_FAILURES.labels(tenant_id, "rejected").inc()
            return Result(
                item.id,
                "dead",
                http_status=w.status,
                error=w.message,
                outcome=w.outcome or make_outcome(w.message or "refused by the EHR"),
                duration_ms=duration_ms,
            )
        # Temporary failure.
        attempts = item.attempts + (1 if w.reached else 0)
        kind = "auth" if w.auth_problem else ("temporary" if w.reached else "unreachable")
        metrics.DELIVERY_FAILURES.labels(tenant_id, kind).inc()
        if w.reached and attempts >= self.policy.max_attempts:
            message = f"gave up after {attempts} attempts; last: {w.message}"
            return Result(
                item.id,
                "dead",
                attempted=True,
                http_status=w.status,
                error=message,
                outcome=make_outcome(message, extra=w.outcome),
                duration_ms=duration_ms,
            )
        delay = self.policy.backoff(attempts) if w.reached else 0.0
        due = now + timedelta(seconds=max(delay, min(w.retry_after or 0.0, self.policy.retry_cap)))
        if pause_until is not None:
            due = max(due, pause_until)
        return Result(
            item.id,
            "retry",
            attempted=w.reached,
            http_status=w.status,
            error=w.message,
            outcome=w.outcome,
            next_attempt_at=due,
            duration_ms=duration_ms,
        )

    # -- the loop -------------------------------------------------------------------------------

    def run(self, *, threads: int = 1, schedule: bool = False) -> None:
        """Deliver until :attr:`stop` is set; each loop finishes the batch it holds before returning.

        With ``schedule``, this process also offers the scheduled jobs (:mod:`fhir_bridge.scheduler`);
        locks make sure one worker among all of them runs each job once per tick.
        """
        scheduler_thread = None
        if schedule:
            from fhir_bridge.scheduler import Scheduler

            scheduler = Scheduler(self.services, holder=self.name)
            scheduler.stop = self.stop
            scheduler_thread = scheduler.start()
        log.info("delivery worker started", extra={"worker": self.name, "count": threads})
        loops = [
            threading.Thread(target=self._loop, args=(n,), name=f"delivery-{n}", daemon=True)
            for n in range(1, threads)
        ]
        for thread in loops:
            thread.start()
        self._loop(0)
        for thread in loops:
            thread.join()
        if scheduler_thread is not None:
            scheduler_thread.join(min(30.0, self.policy.lease_seconds))
        log.info("delivery worker stopped", extra={"worker": self.name})

    def run_until_idle(self, *, threads: int = 1) -> None:
        """The delivery loops of :meth:`run` until the outbox has nothing due (benchmarks, tests)."""
        loops = [
            threading.Thread(target=self._loop, args=(n,), kwargs={"until_idle": True})
            for n in range(threads)
        ]
        for thread in loops:
            thread.start()
        for thread in loops:
            thread.join()

    def _loop(self, number: int, *, until_idle: bool = False) -> None:
        """One delivery loop, pipelined: while one Bundle is with the EHR, the loop records the one
        before it, so the EHR does not wait for our database work. Still at most one request in
        flight per loop, so tenant rate and concurrency limits mean what they meant.

        When to claim the next batch adapts to the load. After a full claim (a backlog: the next
        Bundle will be full whenever it is claimed) the next claim is taken while the current Bundle
        is with the EHR, so the EHR never waits for it. After a partial claim (keeping up) the next
        claim waits for the EHR's answer, so that it takes everything that arrived meanwhile: one
        larger Bundle instead of several small ones, each of which costs the EHR a request, the
        Device lookup and a Provenance.

        Idle, the loop polls quickly at first (work often comes in bursts: the next push is a few
        milliseconds away) and backs off to ``WORKER_POLL_SECONDS``. ``until_idle`` returns at the
        first empty claim instead (benchmarks, tests).
        """
        if number and not until_idle:
            # Stagger the loops so they do not claim in step.
            self.stop.wait(self.policy.poll_seconds * number / 2)
        fast = min(FAST_POLL_SECONDS, self.policy.poll_seconds)
        idle_wait = fast
        queue: deque[_Job] = deque()
        inflight: _InFlight | None = None
        backlog = False  # the last claim was full
        try:
            while True:
                stopping = self.stop.is_set()
                if stopping and inflight is None:
                    break
                done: tuple[_Job, list[Result]] | None = None
                try:
                    if not queue and not stopping and (inflight is None or backlog):
                        backlog = self._claim_into(queue, number)
                    if inflight is not None:
                        sent, inflight = inflight, None
                        # Results first (a failure may pause the tenant), then the next request.
                        done = (sent.job, self._finish(sent.job, *sent.result()))
                        if not queue and not stopping:
                            backlog = self._claim_into(queue, number)
                    if queue and not stopping:
                        inflight = _InFlight(self._send, queue.popleft(), f"delivery-{number}-send")
                    if done is not None:
                        self._record(*done)
                except SQLAlchemyError as exc:
                    # The database is down or busy: nothing is lost (the outbox is the database, and
                    # a batch written but not recorded is repeated harmlessly once its lease ends).
                    log.error(
                        "outbox unavailable", extra={"exception": type(exc).__name__, "worker": self.name}
                    )
                    self.stop.wait(max(self.policy.poll_seconds, 5.0))
                    continue
                busy = inflight is not None or bool(queue) or done is not None
                if not busy or time.monotonic() >= self._webhooks_due:
                    self._webhooks_due = time.monotonic() + 1.0
                    try:
                        busy = self._webhooks() > 0 or busy
                    except SQLAlchemyError as exc:
                        log.error(
                            "outbox unavailable",
                            extra={"exception": type(exc).__name__, "worker": self.name},
                        )
                if busy:
                    idle_wait = fast
                    continue
                if until_idle:
                    break
                self.stop.wait(idle_wait)
                idle_wait = min(self.policy.poll_seconds, idle_wait * 2)
        finally:
            self._drain(inflight, queue)

    def _claim_into(self, queue: deque[_Job], loop: int) -> bool:
        """Claim the next batch into ``queue``; whether the claim was full (a backlog is waiting)."""
        jobs = self._claim_jobs(loop)
        queue.extend(jobs)
        return bool(jobs) and jobs[0].claim.full

    def _drain(self, inflight: _InFlight | None, queue: deque[_Job]) -> None:
        """On the way out: record the batch with the EHR, hand back the ones claimed but not sent."""
        try:
            if inflight is not None:
                self._record(inflight.job, self._finish(inflight.job, *inflight.result()))
            while queue:
                job = queue.popleft()
                self._record(job, self._finish(job, None, 0.0))
        except SQLAlchemyError as exc:
            # Their leases run out and another loop repeats them.
            log.error("outbox unavailable", extra={"exception": type(exc).__name__, "worker": self.name})


class BackgroundWorker:
    """The embedded worker: the delivery loops on daemon threads inside the web process."""

    def __init__(self, services: Services) -> None:
        self.worker = Worker(services)
        self.thread = threading.Thread(
            target=self.worker.run,
            kwargs={"threads": services.settings.worker_threads, "schedule": True},
            name="delivery-embedded",
            daemon=True,
        )

    def start(self) -> BackgroundWorker:
        self.thread.start()
        atexit.register(self.shutdown)
        return self

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop after the batches in hand are recorded (bounded: a lease expiry covers the rest)."""
        self.worker.stop.set()
        wait = timeout if timeout is not None else min(30.0, self.worker.policy.lease_seconds)
        self.thread.join(wait)
