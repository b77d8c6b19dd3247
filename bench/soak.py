"""Soak: sustained pushes for N minutes while the EHR is slow, then down, then back, and a worker is
killed with SIGKILL and restarted. Bounded in time and in request count.

Layout (all on loopback): ``fhir-bridge serve`` (2 gunicorn workers) and two ``fhir-bridge worker``
processes on PostgreSQL, writing to the third-party FHIR server (sekmet) through
``tests/support/fault_proxy.py``. Timeline, as fractions of the run:

    0.00-0.20 normal | 0.20-0.40 EHR slow (each request delayed 0.5 s) | 0.40-0.55 EHR down (503)
    0.55-1.00 normal again; worker 1 is SIGKILLed at 0.65 and restarted at 0.70

At the end pushing stops, the backlog drains, and the run passes only if every accepted record is in
the EHR exactly once (searched by identifier), no worker process grew (RSS of the first and last
fifth of the samples), and nothing was dead-lettered. Latency percentiles are printed: push round
trip, and accepted -> delivered (outbox ``delivered_at``) per phase.

    python -m bench soak [--minutes 10] [--rate 100] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import bench_push as bp
from bench.suite import (
    MIB,
    children,
    open_services,
    percentile,
    postgres,
    rss_bytes,
    sekmet,
    worker_settings,
)

PHASES = [(0.0, "normal"), (0.20, "slow"), (0.40, "down"), (0.55, "recovered")]
KILL_AT, RESTART_AT = 0.65, 0.70


def phase_at(fraction: float) -> str:
    name = PHASES[0][1]
    for start, label in PHASES:
        if fraction >= start:
            name = label
    return name


def waiting(db: Any) -> int:
    """Items still to deliver (dead letters are counted separately: they would never drain)."""
    from sqlalchemy import func, select

    from fhir_bridge.storage.models import OutboxItem

    with db.sessions() as session:
        return int(
            session.scalar(select(func.count()).select_from(OutboxItem).where(OutboxItem.status == "pending"))
            or 0
        )


def pct(values: list[float]) -> str:
    if not values:
        return "-"
    return " / ".join(f"{percentile(values, q):,.0f}" for q in (50, 95, 99)) + f" ms (n={len(values):,})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=100, help="records per second pushed (batches of 20)")
    parser.add_argument("--quick", action="store_true", help="90 seconds instead of --minutes")
    parser.add_argument("--max-requests", type=int, default=100_000, help="upper bound on pushes")
    args = parser.parse_args(argv)
    seconds = 90.0 if args.quick else args.minutes * 60
    per_batch = 20
    interval = per_batch / args.rate

    from sqlalchemy import func, select

    from fhir_bridge.fhir_client import FhirClient
    from fhir_bridge.storage.models import OutboxItem, Record
    from tests.support.fault_proxy import Delay, FaultProxy, Respond
    from tests.support.outbox_seed import in_ehr
    from tests.support.smart_seed import put_patient
    from tests.support.worker_proc import WorkerProcess

    with sekmet() as ehr, postgres() as pg_url:
        if pg_url is None:
            print("the soak needs PostgreSQL (two workers): apt-get install postgresql", file=sys.stderr)
            return 2
        proxy = FaultProxy(ehr.base_url, record=False).start()
        workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
        server = bp.Server(pg_url, workdir, workers=2)
        workers: list[WorkerProcess] = []
        try:
            put_patient(ehr.base_url, "pat-1")
            server.start()
            session, _ = bp.setup_vendor(server, workdir, fhir_base=proxy.base_url)
            services = open_services(pg_url, workdir / "instance")
            settings = worker_settings(
                pg_url,
                workdir / "instance",
                worker_poll_seconds=0.2,
                worker_lease_seconds=30,
                worker_retry_base_seconds=1,
                worker_retry_max_seconds=10,
                http_timeout_seconds=10,
                worker_max_attempts=1000,
            )

            def start_worker(n: int) -> WorkerProcess:
                proc = WorkerProcess(settings, cwd=workdir, log=workdir / f"worker{n}.log").start()
                return proc.wait_ready(timeout=60)

            workers = [start_worker(0), start_worker(1)]
            accepted: dict[str, tuple[float, str]] = {}  # record id -> (accepted at, phase)
            push_ms: list[float] = []
            errors: Counter[str] = Counter()
            rss: dict[str, list[tuple[float, float]]] = {}
            events: list[str] = []
            stop = threading.Event()
            started = time.time()

            def sample() -> None:
                assert server.proc is not None
                while not stop.wait(2.0):
                    t = time.time() - started
                    pids = {f"worker{n}": w.proc.pid for n, w in enumerate(workers) if w.alive() and w.proc}
                    pids |= {f"web{n}": pid for n, pid in enumerate(sorted(children(server.proc.pid)))}
                    for name, pid in pids.items():
                        try:
                            rss.setdefault(name, []).append((t, rss_bytes(pid) / MIB))
                        except OSError:
                            continue

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            token_at = time.time()
            n = 0
            phase = "normal"
            killed = restarted = False
            while time.time() - started < seconds and n < args.max_requests:
                fraction = (time.time() - started) / seconds
                current = phase_at(fraction)
                if current != phase:
                    phase = current
                    events.append(f"{time.time() - started:6.1f} s  EHR {phase}")
                    if phase == "slow":
                        proxy.during(seconds, Delay(0.5))
                    elif phase == "down":
                        proxy.during(seconds, Respond(503, (("Retry-After", "2"),)))
                    else:
                        proxy.clear()
                if not killed and fraction >= KILL_AT:
                    workers[1].kill()
                    killed = True
                    events.append(f"{time.time() - started:6.1f} s  worker 1 SIGKILLed")
                if killed and not restarted and fraction >= RESTART_AT:
                    workers[1] = start_worker(1)
                    restarted = True
                    events.append(f"{time.time() - started:6.1f} s  worker 1 restarted")
                due = started + n * interval
                pause = due - time.time()
                if pause > 0:
                    time.sleep(pause)
                if time.time() - token_at > 200:  # vendor tokens live 300 s
                    bp.vendor_token(server, session)
                    token_at = time.time()
                batch = bp.records(f"soak-{n}", per_batch)
                t0 = time.perf_counter()
                try:
                    response = session.post(
                        server.url + "/api/v1/records", json={"records": batch}, timeout=30
                    )
                except Exception as exc:
                    errors[type(exc).__name__] += 1
                    n += 1
                    continue
                push_ms.append((time.perf_counter() - t0) * 1000)
                if response.status_code != 200:
                    errors[f"HTTP {response.status_code}"] += 1
                else:
                    now = time.time()
                    for record, result in zip(batch, response.json()["results"], strict=True):
                        if result["status"] == "accepted":
                            accepted[record["record_id"]] = (now, phase)
                n += 1
            pushing_seconds = time.time() - started
            events.append(f"{pushing_seconds:6.1f} s  pushing stopped ({n:,} requests)")
            proxy.clear()
            drain_deadline = time.monotonic() + 600
            while waiting(services.db) and time.monotonic() < drain_deadline:
                time.sleep(0.5)
            events.append(f"{time.time() - started:6.1f} s  backlog drained")
            stop.set()
            sampler.join(5)

            # -- verdicts ----------------------------------------------------------------------
            left = waiting(services.db)
            with services.db.sessions() as s:
                rows = s.execute(
                    select(Record.vendor_record_id, OutboxItem.ident_value, OutboxItem.delivered_at).join(
                        OutboxItem, OutboxItem.record_id == Record.id
                    )
                ).all()
                dead = s.scalar(
                    select(func.count()).select_from(OutboxItem).where(OutboxItem.status == "dead")
                )
            expected = Counter(("Observation", ident) for _, ident, _ in rows)
            found = in_ehr(FhirClient(ehr.base_url), "pat-1")
            missing = expected - found
            duplicates = {k: v for k, v in found.items() if v > 1}
            unexpected = found - expected
            latency: dict[str, list[float]] = {}
            for vendor_id, _, delivered in rows:
                at = accepted.get(vendor_id)
                if at is None or delivered is None:
                    continue
                moment = delivered if delivered.tzinfo else delivered.replace(tzinfo=UTC)
                latency.setdefault(at[1], []).append(max(0.0, moment.timestamp() - at[0]) * 1000)
            growth: dict[str, float] = {}
            for name, samples in rss.items():
                if len(samples) >= 10:
                    fifth = max(2, len(samples) // 5)
                    first = statistics.median(v for _, v in samples[:fifth])
                    last = statistics.median(v for _, v in samples[-fifth:])
                    growth[name] = last - first
            # Worker 1's samples span its restart: judge the survivor and the web processes only.
            judged = {k: v for k, v in growth.items() if k != "worker1"}
            flat = all(v <= 25.0 for v in judged.values())
            ok = (
                not errors
                and not left
                and not missing
                and not duplicates
                and not unexpected
                and not dead
                and len(accepted) == len(rows)
                and flat
            )

            print()
            print(
                f"soak: {pushing_seconds / 60:.1f} min of pushes at {args.rate} rec/s target, "
                f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, PostgreSQL, 2 gunicorn + 2 workers, sekmet behind "
                "a fault proxy" + (" (--quick)" if args.quick else "")
            )
            for line in events:
                print(f"  {line}")
            print(
                f"push requests: {n:,} ({dict(errors) or 'no errors'}); records accepted: {len(accepted):,}"
            )
            print(f"push round trip p50 / p95 / p99: {pct(push_ms)}")
            for _, name in PHASES:
                print(
                    f"accepted -> in the EHR, pushed while {name:9}: p50/p95/p99 {pct(latency.get(name, []))}"
                )
            print(
                f"EHR check (search by identifier): {sum(found.values()):,} Observations for "
                f"{len(expected):,} accepted records; missing {sum(missing.values())}, duplicated "
                f"{len(duplicates)}, unexpected {sum(unexpected.values())}; still pending {left}; dead {dead}"
            )
            for name in sorted(rss):
                values = [v for _, v in rss[name]]
                print(
                    f"RSS {name:8} min {min(values):6.1f}  max {max(values):6.1f} MiB, "
                    f"first->last fifth {growth.get(name, 0.0):+6.1f} MiB"
                    + ("  (restarted; not judged)" if name == "worker1" else "")
                )
            print(f"result: {'PASS' if ok else 'FAIL'}")
            services.db.dispose()
            return 0 if ok else 1
        finally:
            for w in workers:
                w.ensure_stopped()
            server.stop()
            proxy.stop()
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
