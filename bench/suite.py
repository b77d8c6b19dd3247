"""The whole benchmark suite: every row of TARGETS.md, several repetitions, one table, one JSON file.

``python -m bench`` (== ``make bench`` == ``fhir-bridge bench``) starts on loopback what each row needs
(the bridge under gunicorn, ``fhir-bridge worker`` processes, PostgreSQL when installed, SQLite, the
third-party FHIR server sekmet, headless Chromium), measures, and prints::

    figure | median | min-max | floor (same run) | ratio | target | met?

Options: ``--quick`` (about a minute: fewer repetitions, smaller data, said in the notes), ``--only
NAME[,NAME]``, ``--json PATH`` (default ``bench-results/<UTC timestamp>.json``). ``python -m bench
compare A.json B.json`` prints the change of every figure between two runs.

The load generator for the single-push row is wrk when installed (``./dev.sh bench`` installs it),
else Python threads (``bench/loadgen.py``); it runs on the same cores as the server, so the row's
note gives the CPU per request of both sides.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import requests

from bench.bench_push import CLOCK_TICKS, cpu_seconds
from bench.results import Condition, Figure, fmt, table

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024

Runner = Callable[[bool], list[Figure]]


# -- shared helpers -------------------------------------------------------------------------------


@contextmanager
def postgres() -> Iterator[str | None]:
    """A throwaway PostgreSQL database URL, or None when the binaries are not installed."""
    with postgres_server() as (url, _):
        yield url


@contextmanager
def postgres_server() -> Iterator[tuple[str | None, int | None]]:
    """:func:`postgres` plus the PID of the cluster's process tree (for its CPU: ``cpu_seconds``)."""
    from tests.support.postgres import PostgresServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        yield None, None
        return
    pg = PostgresServer(bin_dir)
    pg.start()
    try:
        yield pg.create_database(), (pg.proc.pid if pg.proc is not None else None)
    finally:
        pg.stop()


@contextmanager
def _no_server() -> Iterator[tuple[str | None, int | None]]:
    yield None, None


@contextmanager
def sekmet(processes: int = 1) -> Iterator[Any]:
    from tests.support.sekmet import SekmetServer

    server = SekmetServer(processes=processes)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak(pid: int) -> bool:
    """Reset VmHWM (peak RSS) of one of our processes; False where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def worker_settings(url: str, instance: Path, **extra: Any) -> dict[str, Any]:
    return {
        "instance_path": instance,
        "database_url": url,
        "allow_insecure_loopback": "true",
        "log_level": "INFO",  # WorkerProcess.wait_ready watches for "delivery worker started"
        "metrics_enabled": "false",
    } | extra


def pending(db: Any, tenant: str) -> int:
    from sqlalchemy import func, select

    from fhir_bridge.storage.models import OutboxItem

    with db.sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(OutboxItem)
                .where(OutboxItem.tenant_id == tenant, OutboxItem.status != "delivered")
            )
            or 0
        )


def wait_drained(db: Any, tenant: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pending(db, tenant):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{tenant}: {pending(db, tenant)} items still undelivered after {timeout:.0f} s"
            )
        time.sleep(0.05)


def open_services(url: str, instance: Path) -> Any:
    from fhir_bridge.services import build_services
    from fhir_bridge.settings import load_settings
    from fhir_bridge.storage import migrate

    services = build_services(
        load_settings(
            {
                "INSTANCE_PATH": str(instance),
                "DATABASE_URL": url,
                "ALLOW_INSECURE_LOOPBACK": True,
                "LOG_LEVEL": "WARNING",
            },
            environ={},
        )
    )
    migrate.upgrade(services.db)
    return services


# -- row 1: push, batches of 1,000 ----------------------------------------------------------------


def run_push_batch(quick: bool) -> list[Figure]:
    from bench import bench_push as bp

    reps, batches = (2, 2) if quick else (5, 5)
    figures: list[Figure] = []
    backends: list[tuple[str, str]] = [("SQLite", "")]
    with postgres() if not quick else _none() as pg_url:
        if pg_url:
            backends.append(("PostgreSQL", pg_url))
        for name, url in backends:
            workdir = Path(tempfile.mkdtemp(prefix=f"bench-push-{name}-"))
            server = bp.Server(url or f"sqlite:///{workdir / 'bench.db'}", workdir)
            try:
                server.start()
                session, _ = bp.setup_vendor(server, workdir)
                bp.measure(server, session, size=100, requests_=2, tag="warm")
                values, floors, envelope_floors = [], [], []
                for rep in range(reps):
                    floors.append(bp.floor_rate(5_000 if quick else 20_000))
                    envelope_floors.append(bp.floor_rate(5_000 if quick else 20_000, envelope_only=True))
                    values.append(bp.measure(server, session, size=1000, requests_=batches, tag=f"b{rep}")[0])
            finally:
                server.stop()
                shutil.rmtree(workdir, ignore_errors=True)
            envelope_floor = statistics.median(envelope_floors)
            figures.append(
                Figure(
                    key=f"push_batch_{name.lower()}",
                    label=f"push batch 1,000, {name}",
                    unit="rec/s per server CPU s",
                    values=values,
                    floor=floors,
                    floor_label="marshmallow (envelope + data schema) + orjson, no FHIR, no database",
                    target=[Condition("value", ">=", 10_000), Condition("ratio", ">=", 0.5)],
                    note=f"{reps} reps x {batches} batches of 1,000; 1 gunicorn worker"
                    f"; against the envelope-only floor ({envelope_floor:,.0f} rec/s,"
                    f" data unchecked): ratio {statistics.median(values) / envelope_floor:.2f}"
                    + ("; PostgreSQL skipped in --quick" if quick else ""),
                )
            )
    return figures


@contextmanager
def _none() -> Iterator[None]:
    yield None


# -- row 2: push, single records, 2 gunicorn workers ----------------------------------------------


SINGLE_USERS = 20


def run_push_single(quick: bool) -> list[Figure]:
    """Row 2 with wrk (else Python http.client threads): rate, p99, and CPU per request on both sides.

    Pushes round-robin over ``SINGLE_USERS`` enrolled app users (a hospital's pushes come from many
    patients; one patient would also serialise every push on its rule-evaluation lock).
    """
    from bench import bench_push as bp
    from bench import loadgen

    reps, duration, count = (1, 5.0, 1500) if quick else (3, 10.0, 6000)
    connections = 8  # 2 gunicorn workers x 4 threads
    rates, p99s, floor_rates, floor_p99s, server_ms, client_ms, db_ms = [], [], [], [], [], [], []
    tool = ""
    with postgres_server() if not quick else _no_server() as (pg_url, pg_pid):
        workdir = Path(tempfile.mkdtemp(prefix="bench-single-"))
        backend = "PostgreSQL" if pg_url else "SQLite"
        server = bp.Server(pg_url or f"sqlite:///{workdir / 'bench.db'}", workdir, workers=2)
        try:
            server.start()
            session, token = bp.setup_vendor(server, workdir)
            bp.enroll_users(server, session, SINGLE_USERS)
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            assert server.proc is not None
            pid = server.proc.pid

            def server_cpu() -> float:
                return cpu_seconds(pid)

            def push(tag: str) -> loadgen.LoadRun:
                url = server.url + "/api/v1/records"
                if loadgen.WRK:
                    return loadgen.wrk(
                        url,
                        server_cpu=server_cpu,
                        duration=duration,
                        connections=connections,
                        headers=headers,
                        push_prefix=tag,
                        users=SINGLE_USERS,
                    )
                bodies = [
                    orjson.dumps({"records": [{**r, "app_user_id": f"bench-user-{n % SINGLE_USERS}"}]})
                    for n, r in enumerate(bp.records(tag, count))
                ]
                return loadgen.python_threads(
                    url, bodies, server_cpu=server_cpu, connections=connections, headers=headers
                )

            def floor() -> loadgen.LoadRun:
                url = server.url + "/healthz"
                if loadgen.WRK:
                    return loadgen.wrk(url, server_cpu=server_cpu, duration=duration, connections=connections)
                return loadgen.python_threads(
                    url, [b""] * count, server_cpu=server_cpu, connections=connections
                )

            for rep in range(reps + 1):
                f = floor()
                db0 = cpu_seconds(pg_pid) if pg_pid else 0.0
                r = push(f"s{rep}")
                db_cpu = cpu_seconds(pg_pid) - db0 if pg_pid else 0.0
                if rep:  # the first repetition warms both workers up
                    db_ms.append(db_cpu / r.requests * 1000)
                    tool = r.tool
                    rates.append(r.rate)
                    p99s.append(r.p99_ms)
                    floor_rates.append(f.rate)
                    floor_p99s.append(f.p99_ms)
                    server_ms.append(r.server_ms_per_request)
                    client_ms.append(r.client_ms_per_request)
        finally:
            server.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    bound = f"{duration:.0f} s per rep" if loadgen.WRK else f"{count} requests per rep"
    note = (
        f"{tool}, {bound}, {reps} reps, 2 gunicorn workers (gthread x 4), {backend}, "
        f"{SINGLE_USERS} app users round robin; client and server share the cores; CPU per request: "
        f"server {statistics.median(server_ms):.2f} ms (gunicorn processes), "
        + (f"PostgreSQL {statistics.median(db_ms):.2f} ms, " if pg_url else "")
        + f"client {statistics.median(client_ms):.3f} ms"
    )
    floor_label = "GET /healthz, same generator and server"
    return [
        Figure(
            "push_single_rps",
            "push single records",
            "req/s",
            rates,
            floor_rates,
            floor_label,
            [Condition("value", ">=", 1000)],
            note,
        ),
        Figure(
            "push_single_p99",
            "push single records, p99",
            "ms",
            p99s,
            floor_p99s,
            floor_label,
            [Condition("value", "<=", 20)],
            note,
        ),
        Figure(
            "push_single_server_cpu",
            "push single records, server CPU per request",
            "ms",
            server_ms,
            [],
            "",
            [],
            note,
        ),
    ]


# -- row 3: end-to-end delivery vs prebuilt Bundles -----------------------------------------------


def run_delivery(quick: bool) -> list[Figure]:
    from bench import bench_delivery as bd

    records, rounds = (300, 2) if quick else (1500, 5)
    got = bd.measure(records, 100, rounds, [1], False)
    return [
        Figure(
            "delivery",
            "delivery into sekmet, 1 worker",
            "resources/s",
            got["worker x1"],
            got["floor"],
            "same Bundles prebuilt, posted by bare requests",
            [Condition("ratio", ">=", 0.85)],
            f"{records} records/round, Bundles of 100, outbox on SQLite, {rounds} rounds alternating; "
            "one delivery loop (the production loop: it records one Bundle and claims the next while "
            f"another is with the EHR); our CPU {statistics.median(got['cpu x1']):.2f} ms/resource",
        )
    ]


# -- row 4: accepted -> readable in the EHR at 500 records/s --------------------------------------


def run_latency(quick: bool) -> list[Figure]:
    """p95 of push accepted -> delivered at 500 records/s sustained, and what limited it.

    Next to it, measured in the same run: the FHIR server's floor (prebuilt Bundles of 100 posted by
    a bare client), the rate the worker delivered at, the backlog left when the pushes stopped, and
    the cores busy (our worker, the FHIR server, the whole shared machine). A p95 over target with a
    backlog and a server floor near the push rate means the server (or the machine) was the limit.
    """
    from sqlalchemy import select

    from bench import bench_delivery as bd
    from bench import bench_push as bp
    from fhir_bridge.storage.models import OutboxItem, Record
    from tests.support.outbox_seed import add_tenant, seed
    from tests.support.smart_seed import put_patient
    from tests.support.worker_proc import WorkerProcess

    reps, seconds, rate, per_batch = (1, 5, 500, 25) if quick else (3, 20, 500, 25)
    p95s: list[float] = []
    achieved: list[float] = []
    delivered_rates: list[float] = []
    backlogs: list[int] = []
    floors: list[float] = []
    # Cores busy: worker, FHIR server, gunicorn, this load generator, whole machine.
    busy: list[tuple[float, ...]] = []
    server_ms: list[float] = []  # FHIR server CPU per resource delivered (small Bundles cost more)
    sizes: list[int] = []  # outbox items per Bundle, from the worker's "batch written" log lines
    with sekmet() as ehr, postgres() if not quick else _none() as pg_url:
        put_patient(ehr.base_url, "pat-1")
        workdir = Path(tempfile.mkdtemp(prefix="bench-latency-"))
        url = pg_url or f"sqlite:///{workdir / 'bench.db'}"
        server = bp.Server(url, workdir, workers=2)
        worker = None
        try:
            server.start()
            session, _ = bp.setup_vendor(server, workdir, fhir_base=ehr.base_url)
            services = open_services(url, workdir / "instance")
            # The server's floor, before our worker runs (its items are claimed only to build Bundles).
            add_tenant(services.db, "floor", "http://127.0.0.1:9/floor-only", quirks=bd.QR_PUT)
            for rep in range(reps):
                seed(services.db, "floor", patient=f"floor{rep}", records=1000)
                bundles, count = bd.prebuilt_bundles(services, "floor", 100)
                floors.append(count / bd.run_floor(ehr.base_url, bundles))
            worker = WorkerProcess(
                worker_settings(url, workdir / "instance", worker_poll_seconds=0.2),
                cwd=workdir,
                log=workdir / "worker.log",
            ).start()
            worker.wait_ready()
            assert worker.proc is not None and ehr.proc is not None and server.proc is not None
            pids = (worker.proc.pid, ehr.proc.pid, server.proc.pid)

            def cpu_now() -> tuple[float, ...]:
                return (
                    *(cpu_seconds(pid) for pid in pids),
                    time.process_time(),
                    machine_busy_seconds(),
                )

            for rep in range(reps):
                accepted: dict[str, float] = {}
                interval = per_batch / rate
                cpu0 = cpu_now()
                log_start = (workdir / "worker.log").stat().st_size
                started = time.perf_counter()
                wall0 = time.time()
                n = 0
                while time.perf_counter() - started < seconds:
                    due = started + n * interval
                    pause = due - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
                    batch = bp.records(f"l{rep}-{n}", per_batch)
                    response = session.post(
                        server.url + "/api/v1/records", json={"records": batch}, timeout=60
                    )
                    response.raise_for_status()
                    now = wall0 + (time.perf_counter() - started)
                    for record in batch:
                        accepted[record["record_id"]] = now
                    n += 1
                pushing = time.perf_counter() - started
                achieved.append(len(accepted) / pushing)
                backlogs.append(pending(services.db, "bench"))
                wait_drained(services.db, "bench", timeout=300)
                elapsed = time.perf_counter() - started
                used = [b - a for a, b in zip(cpu0, cpu_now(), strict=True)]
                busy.append(tuple(u / elapsed for u in used))
                with services.db.sessions() as s:
                    rows = s.execute(
                        select(Record.vendor_record_id, OutboxItem.delivered_at)
                        .join(OutboxItem, OutboxItem.record_id == Record.id)
                        .where(Record.vendor_record_id.in_(list(accepted)))
                    ).all()
                delivered = [_aware(at).timestamp() for _, at in rows]
                delivered_rates.append(len(rows) / max(1e-9, max(delivered) - wall0))
                server_ms.append(used[1] * 1000 / max(1, len(rows)))
                with (workdir / "worker.log").open("rb") as log_file:
                    log_file.seek(log_start)
                    sizes += [int(m) for m in BUNDLE_SIZE.findall(log_file.read())]
                latencies = [max(0.0, _aware(at).timestamp() - accepted[vid]) for vid, at in rows]
                p95s.append(percentile(latencies, 95) * 1000)
            services.db.dispose()
        finally:
            if worker is not None:
                worker.ensure_stopped()
            server.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    cores = os.cpu_count()
    return [
        Figure(
            "accepted_to_readable_p95",
            "push accepted -> in the EHR, p95",
            "ms",
            p95s,
            target=[Condition("value", "<=", 2000)],
            note=(
                f"{rate} rec/s target ({fmt(statistics.median(achieved))} achieved) for {seconds} s, "
                f"{reps} reps; batches of {per_batch}; 2 gunicorn + 1 worker (poll 0.2 s), "
                f"{'PostgreSQL' if pg_url else 'SQLite'}; EHR side = outbox delivered_at, stamped after "
                f"the EHR answered the transaction. Delivered at {fmt(statistics.median(delivered_rates))} "
                f"res/s (backlog when the pushes stopped: {statistics.median(backlogs):.0f} items); "
                f"the FHIR server's floor in this run (bare client, prebuilt Bundles of 100): "
                f"{fmt(statistics.median(floors))} res/s; FHIR server CPU per resource delivered: "
                f"{statistics.median(server_ms):.2f} ms; Bundles: {len(sizes)}, "
                f"{statistics.median(sizes or [0]):.0f} items median, {max(sizes or [0])} max. "
                "Cores busy while pushing and draining (of "
                f"{cores}, shared with other work): "
                + ", ".join(
                    f"{name} {statistics.median(b[n] for b in busy):.2f}"
                    for n, name in enumerate(
                        ("worker", "FHIR server", "gunicorn", "load generator", "whole machine")
                    )
                )
                + ". "
                + _server_share(statistics.median(b[1] for b in busy), statistics.median(server_ms), rate)
            ),
        )
    ]


def _server_share(cores: float, ms_per_resource: float, rate: float) -> str:
    """What the FHIR server could take at the CPU share it actually got, next to the push rate."""
    could = cores / (ms_per_resource / 1000) if ms_per_resource else 0.0
    verdict = "below" if could < rate else "above"
    return (
        f"At the {cores:.2f} cores it got and {ms_per_resource:.2f} ms CPU per resource, the FHIR server "
        f"could take about {could:.0f} res/s: {verdict} the {rate} rec/s pushed"
    )


BUNDLE_SIZE = re.compile(rb"batch written.*?outbox_items\W+(\d+)")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# -- rows 5 and 6: dashboard ----------------------------------------------------------------------


def run_dashboard(quick: bool) -> list[Figure]:
    from bench import bench_dashboard as bdash

    observations, runs = (2000, 2) if quick else (10_000, 5)
    browser = shutil.which("chromium") is not None or Path("/usr/bin/chromium").exists()
    got = bdash.measure(observations, runs, browser)
    size = f"{observations:,} Observations" + (" (scaled down in --quick)" if quick else "")
    figures = [
        Figure(
            "dashboard_server",
            "dashboard server time",
            "ms",
            got["server"],
            got["floor"],
            "same pages fetched by bare requests + orjson",
            [Condition("ratio", "<=", 1.3)],
            f"{size}, {runs} runs after a warm-up",
        )
    ]
    if browser:
        figures.append(
            Figure(
                "dashboard_tti",
                "browser: data arrived -> interactive",
                "ms",
                got["tti"],
                target=[Condition("value", "<=", 1000)],
                note=f"headless Chromium, Performance API marks, {size}, {got['points']:,} points",
            )
        )
    return figures


# -- row 7: memory --------------------------------------------------------------------------------


def run_memory(quick: bool) -> list[Figure]:
    from bench import bench_push as bp
    from tests.support.outbox_seed import add_tenant, seed
    from tests.support.worker_proc import WorkerProcess

    backlog = 5_000 if quick else 1_000_000
    sample_seconds = 3 if quick else 20
    figures: list[Figure] = []
    with sekmet() as ehr, postgres() as pg_url:
        workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
        url = pg_url or f"sqlite:///{workdir / 'bench.db'}"
        services = open_services(url, workdir / "instance")
        add_tenant(
            services.db, "mem", ehr.base_url, quirks={"no_conditional_create": ["QuestionnaireResponse"]}
        )
        queued = 0
        while queued < backlog:  # ~1.5 resources per record; chunks keep this process small
            chunk = min(20_000, max(1, (backlog - queued) * 2 // 3 + 1))
            queued += len(seed(services.db, "mem", patient=f"m{queued}", records=chunk).items)
        worker = WorkerProcess(
            worker_settings(url, workdir / "instance", worker_poll_seconds=0.05),
            cwd=workdir,
            log=workdir / "worker.log",
        ).start()
        peaks: list[float] = []
        try:
            worker.wait_ready(timeout=120)
            assert worker.proc is not None
            for _ in range(3):
                peak = 0
                deadline = time.monotonic() + sample_seconds / 3
                while time.monotonic() < deadline:
                    peak = max(peak, rss_bytes(worker.proc.pid))
                    time.sleep(0.1)
                peaks.append(peak / MIB)
        finally:
            worker.ensure_stopped()
        left = pending(services.db, "mem")
        services.db.dispose()
        figures.append(
            Figure(
                "worker_rss_backlog",
                "worker RSS, large backlog",
                "MiB",
                peaks,
                target=[Condition("value", "<=", 150)],
                note=(
                    f"backlog {queued:,} outbox items"
                    + (" (scaled down from 1,000,000 in --quick)" if quick else "")
                    + f", {'PostgreSQL' if pg_url else 'SQLite'}, peak RSS while delivering for "
                    f"{sample_seconds} s ({queued - left:,} delivered meanwhile), 3 windows"
                ),
            )
        )
        shutil.rmtree(workdir, ignore_errors=True)

    # A 5,000-record push: peak RSS of the gunicorn worker that served it, minus its RSS before.
    workdir = Path(tempfile.mkdtemp(prefix="bench-pushmem-"))
    server = bp.Server(f"sqlite:///{workdir / 'bench.db'}", workdir)
    deltas: list[float] = []
    try:
        server.start()
        session, _ = bp.setup_vendor(server, workdir)
        assert server.proc is not None
        bp.measure(server, session, size=100, requests_=2, tag="warm")
        (web,) = children(server.proc.pid)
        for rep in range(1 if quick else 3):
            body = orjson.dumps({"records": bp.records(f"mem{rep}", 5000)})
            before = rss_bytes(web)
            if not reset_peak(web) and rep:
                break  # the peak cannot be reset: only the first push's figure means anything
            response = session.post(
                server.url + "/api/v1/records",
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=300,
            )
            response.raise_for_status()
            deltas.append(max(0, rss_bytes(web, "VmHWM") - before) / MIB)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    figures.append(
        Figure(
            "push_5000_rss_delta",
            "RSS added by a 5,000-record push",
            "MiB",
            deltas,
            target=[Condition("value", "<=", 100)],
            note="peak RSS (VmHWM) of the gunicorn worker during the push minus its RSS before; SQLite",
        )
    )
    return figures


# -- row 8: scale-out -----------------------------------------------------------------------------


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (/proc/stat): with our processes' own
    CPU, it shows whether the shared cores were the limit (other work on them included)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def server_floor(base_url: str, bundles: list[bytes], clients: int) -> float:
    """Resources/s the FHIR server takes from ``clients`` bare clients posting prebuilt Bundles at once
    (the most any number of our workers could get out of it); returns elapsed seconds."""
    from bench import bench_delivery as bd

    shares = [bundles[n::clients] for n in range(clients)]
    started = time.perf_counter()
    threads = [threading.Thread(target=bd.run_floor, args=(base_url, share)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def run_scaleout(quick: bool) -> list[Figure]:
    """2 worker processes vs 1 against one sekmet process, and again against sekmet run as 2 processes.

    Next to each: the server's own ceiling, measured in the same run: prebuilt Bundles posted by 2
    concurrent bare clients vs 1. Workers cannot scale past what the server does for bare clients.
    """
    figures: list[Figure] = []
    for processes in (1,) if quick else (1, 2):
        figures += _scaleout_pass(quick, processes)
    return figures


def _scaleout_pass(quick: bool, processes: int) -> list[Figure]:
    from bench import bench_delivery as bd
    from tests.support.outbox_seed import add_tenant, seed
    from tests.support.worker_proc import WorkerProcess

    records, reps = (400, 1) if quick else (2000, 3)
    # Each worker process runs WORKER_THREADS delivery loops, each with one request in flight: the
    # server's ceiling compares as many bare clients as 2 workers have loops with as many as 1 has.
    threads = 2
    one: list[float] = []
    two: list[float] = []
    floors: dict[int, list[float]] = {threads: [], 2 * threads: []}
    # Cores busy while measuring: (our workers, the FHIR server, the whole machine).
    busy: dict[int, list[tuple[float, float, float]]] = {}
    quirks = {"no_conditional_create": ["QuestionnaireResponse"]}
    with sekmet(processes) as ehr, postgres() as pg_url:
        if pg_url is None:
            return [Figure("scale_out", "scale-out, 2 workers vs 1 (PostgreSQL not installed)", "x", [])]
        workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
        services = open_services(pg_url, workdir / "instance")
        add_tenant(services.db, "scale", ehr.base_url, quirks=quirks)
        # Items of this tenant are only claimed to build the floor's Bundles, never by a worker.
        add_tenant(services.db, "floor", "http://127.0.0.1:9/floor-only", quirks=quirks)
        settings = worker_settings(
            pg_url, workdir / "instance", worker_poll_seconds=0.05, worker_threads=threads
        )
        seed(services.db, "scale", patient="warm", records=200)  # the first writes are not representative
        for rep in range(reps):
            for clients in sorted(floors, reverse=rep % 2 == 1):
                seed(services.db, "floor", patient=f"f{rep}-{clients}", records=records)
                bundles, count = bd.prebuilt_bundles(services, "floor", 100)
                floors[clients].append(count / server_floor(ehr.base_url, bundles, clients))
            for count, out in ((1, one), (2, two)) if rep % 2 == 0 else ((2, two), (1, one)):
                workers = [
                    WorkerProcess(settings, cwd=workdir, log=workdir / f"w{rep}-{count}-{n}.log").start()
                    for n in range(count)
                ]
                try:
                    for w in workers:
                        w.wait_ready(timeout=60)
                    wait_drained(services.db, "scale", timeout=300)
                    items = len(seed(services.db, "scale", patient=f"s{rep}-{count}", records=records).items)
                    pids = [w.proc.pid for w in workers if w.proc]
                    cpu0 = (
                        sum(cpu_seconds(pid) for pid in pids),
                        cpu_seconds(ehr.proc.pid),
                        machine_busy_seconds(),
                    )
                    started = time.perf_counter()
                    wait_drained(services.db, "scale", timeout=600)
                    elapsed = time.perf_counter() - started
                    out.append(items / elapsed)
                    cpu = (
                        sum(cpu_seconds(pid) for pid in pids) - cpu0[0],
                        cpu_seconds(ehr.proc.pid) - cpu0[1],
                        machine_busy_seconds() - cpu0[2],
                    )
                    busy.setdefault(count, []).append((cpu[0] / elapsed, cpu[1] / elapsed, cpu[2] / elapsed))
                finally:
                    for w in workers:
                        w.terminate()
        failed = _failed_attempts(services.db)
        once = _each_once(services.db, ehr.base_url)
        services.db.dispose()
        shutil.rmtree(workdir, ignore_errors=True)
    server = (
        "one sekmet process"
        if processes == 1
        else f"sekmet as {processes} processes (uvicorn --workers {processes}, one SQLite file)"
    )
    ceiling = statistics.median(floors[2 * threads]) / statistics.median(floors[threads])
    server_gain = statistics.median(b[1] for b in busy[2]) / max(
        1e-9, statistics.median(b[1] for b in busy[1])
    )
    suffix = "" if processes == 1 else f"_sekmet_x{processes}"
    label_suffix = "" if processes == 1 else f", sekmet x{processes}"
    return [
        Figure(
            "scale_out" + suffix,
            "scale-out: 2 worker processes" + label_suffix,
            "resources/s",
            two,
            one,
            "1 worker process, same run",
            [Condition("ratio", ">=", 1.7)],
            f"{records} records per rep, {reps} reps alternating, PostgreSQL, {server}, workers of "
            f"{threads} delivery loops, on the same {os.cpu_count()} shared cores; {once}; failed "
            f"attempts retried: {failed}; the server's own ceiling in this run: {2 * threads} bare clients "
            f"posting prebuilt Bundles get {ceiling:.2f} x what {threads} get; "
            + "; ".join(
                f"{n} worker(s): workers {statistics.median(b[0] for b in v):.2f} cores busy, "
                f"FHIR server {statistics.median(b[1] for b in v):.2f}, "
                f"whole machine {statistics.median(b[2] for b in v):.2f}"
                for n, v in sorted(busy.items())
            )
            + f"; the FHIR server got {server_gain:.2f} x the CPU with 2 workers as with 1 (about the "
            "most 2 workers can gain while its CPU per resource stays the same)",
        ),
        Figure(
            "scale_out_server_ceiling" + suffix,
            f"  FHIR server alone: {2 * threads} bare clients" + label_suffix,
            "resources/s",
            floors[2 * threads],
            floors[threads],
            f"{threads} bare clients, same run",
            note=(
                f"prebuilt transaction Bundles of 100 posted by {2 * threads} concurrent bare clients vs "
                f"{threads} (as many as the loops of 2 workers vs 1): what the server itself gains from "
                "twice the writers, i.e. about the most 2 workers could show"
            ),
        ),
    ]


def _each_once(db: Any, base_url: str) -> str:
    """Exactly once, checked in the EHR: its Observation count against the Observations queued."""
    from sqlalchemy import func, select

    from fhir_bridge.storage.models import OutboxItem

    with db.sessions() as session:
        queued = session.scalar(
            select(func.count()).select_from(OutboxItem).where(OutboxItem.resource_type == "Observation")
        )
    answer = requests.get(f"{base_url}/Observation", params={"_summary": "count"}, timeout=60).json()
    held = answer.get("total")
    if held == queued:
        return f"the EHR holds each of the {held} Observations once"
    return f"EXACTLY-ONCE BROKEN: the EHR holds {held} Observations for {queued} queued"


def _failed_attempts(db: Any) -> str:
    """Delivery attempts that did not succeed, by status/error (contention shows up here)."""
    from sqlalchemy import func, select

    from fhir_bridge.storage.models import DeliveryAttempt

    with db.sessions() as session:
        rows = session.execute(
            select(DeliveryAttempt.http_status, func.count())
            .where(or_not_ok(DeliveryAttempt))
            .group_by(DeliveryAttempt.http_status)
        ).all()
    return ", ".join(f"{status or 'no answer'}: {count}" for status, count in rows) or "none"


def or_not_ok(table: Any) -> Any:
    from sqlalchemy import or_

    return or_(table.error.is_not(None), table.http_status.is_(None), table.http_status >= 300)


# -- the rules engine's row, when that branch is merged -------------------------------------------


def run_rules(quick: bool) -> list[Figure]:
    """``bench/bench_rules.py`` may offer ``suite_figures(quick) -> list[Figure]``; else run its main."""
    import importlib

    module = importlib.import_module("bench.bench_rules")
    if hasattr(module, "suite_figures"):
        return list(module.suite_figures(quick))
    started = time.process_time()
    module.main([])
    return [
        Figure(
            "rules", "rule evaluation (see its own output above)", "CPU s", [time.process_time() - started]
        )
    ]


RUNNERS: dict[str, tuple[Runner, str]] = {
    "push": (run_push_batch, "push API, batches of 1,000, per server CPU second (SQLite, PostgreSQL)"),
    "single": (run_push_single, "push API, single records, 2 gunicorn workers: req/s and p99"),
    "delivery": (run_delivery, "end-to-end delivery vs prebuilt Bundles"),
    "latency": (run_latency, "push accepted -> readable in the EHR at 500 records/s, p95"),
    "dashboard": (run_dashboard, "dashboard server time and browser time to interactive"),
    "memory": (run_memory, "worker RSS with a large backlog; RSS added by a 5,000-record push"),
    "scaleout": (run_scaleout, "2 worker processes vs 1 on PostgreSQL"),
}
if importlib.util.find_spec("bench.bench_rules") is not None:
    RUNNERS["rules"] = (run_rules, "rule evaluation cost (bench/bench_rules.py)")


# -- entry points ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: smaller, fewer repetitions")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(RUNNERS)}")
    parser.add_argument("--json", dest="json_path", help="where to write results (default bench-results/)")
    args = parser.parse_args(argv)
    names = list(RUNNERS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in RUNNERS]
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(RUNNERS)}")
    started = datetime.now(UTC)
    figures: list[Figure] = []
    failures: dict[str, str] = {}
    for name in names:
        runner, doc = RUNNERS[name]
        print(f"== {name}: {doc}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            figures += runner(args.quick)
        except Exception as exc:  # one broken row must not hide the others
            failures[name] = f"{type(exc).__name__}: {exc}"
            print(f"   {name} failed: {failures[name]}", file=sys.stderr)
        print(f"   {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finished = datetime.now(UTC)

    print()
    print(
        f"fhir-bridge bench, {started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs"
        + (", --quick (scaled down; not for judging targets)" if args.quick else "")
    )
    print(table(figures))
    print()
    for f in figures:
        extra = f"; floor: {f.floor_label}" if f.floor_label else ""
        print(f"- {f.label}: {f.note}{extra}")
    for name, error in failures.items():
        print(f"- {name}: FAILED: {error}")

    path = Path(args.json_path or ROOT / "bench-results" / f"{started:%Y%m%dT%H%M%SZ}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "started": started.isoformat(),
                "finished": finished.isoformat(),
                "quick": args.quick,
                "machine": machine(),
                "figures": [f.to_json() for f in figures],
                "failures": failures,
            },
            indent=2,
        )
    )
    print(f"\nresults: {path}")
    return 1 if failures else 0


def compare(argv: list[str]) -> int:
    """Per-figure change between two result files (B relative to A)."""
    parser = argparse.ArgumentParser(prog="python -m bench compare")
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args(argv)
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    figs_a = {f["key"]: Figure.from_json(f) for f in a["figures"]}
    figs_b = {f["key"]: Figure.from_json(f) for f in b["figures"]}
    rows = [["figure", "A median", "B median", "change", "A ratio", "B ratio", "met A -> B"]]
    for key in list(figs_a) + [k for k in figs_b if k not in figs_a]:
        fa, fb = figs_a.get(key), figs_b.get(key)
        ref = fb or fa
        assert ref is not None
        ma = fa.median if fa else None
        mb = fb.median if fb else None
        change = f"{(mb / ma - 1) * 100:+.1f}%" if ma and mb is not None else "-"
        verdict = {True: "yes", False: "NO", None: "-"}
        rows.append(
            [
                f"{ref.label} ({ref.unit})",
                fmt(ma),
                fmt(mb),
                change,
                fmt(fa.ratio if fa else None),
                fmt(fb.ratio if fb else None),
                f"{verdict[fa.met if fa else None]} -> {verdict[fb.met if fb else None]}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"A: {args.a} ({a['started']}{', quick' if a.get('quick') else ''})")
    print(f"B: {args.b} ({b['started']}{', quick' if b.get('quick') else ''})")
    for n, row in enumerate(rows):
        print(
            " | ".join(
                [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            )
        )
        if n == 0:
            print("-+-".join("-" * w for w in widths))
    return 0
