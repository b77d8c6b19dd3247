"""CPU per single-record push, in process: the Flask test client, real token auth, a real database.

Builds an app on SQLite (or PostgreSQL with ``--pg``, a throwaway cluster), registers a vendor,
enrolls one app user, then pushes ``--count`` single-record batches and prints the CPU milliseconds
per request (``time.process_time`` of this process; with ``--pg`` PostgreSQL's own CPU is printed
beside it). ``--breakdown`` adds the CPU of each stage; ``--profile`` prints a cProfile (CPU time)
of the same loop.

    python -m bench.profile_single [--count N] [--pg] [--breakdown] [--profile] [--sort cumulative|tottime]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_single")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--pg", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--callees", default="", help="print what functions matching this call")
    parser.add_argument(
        "--breakdown", action="store_true", help="CPU per push of each stage (no profiler overhead)"
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    spent_in = _instrument() if args.breakdown else None

    from auth.keys import Keyring
    from fhir_bridge import create_app, services
    from fhir_bridge.server import settle_heap
    from fhir_bridge.settings import load_settings
    from fhir_bridge.storage import Database, migrate
    from tests.support.vendor import add_tenant, enroll, register

    workdir = Path(tempfile.mkdtemp(prefix="profile-single-"))
    pg = None
    try:
        if args.pg:
            from tests.support.postgres import PostgresServer, find_bin_dir

            bin_dir = find_bin_dir()
            assert bin_dir is not None, "PostgreSQL is not installed"
            pg = PostgresServer(bin_dir)
            pg.start()
            url = pg.create_database()
        else:
            url = f"sqlite:///{workdir / 'p.db'}"
        Keyring(workdir / "keys").ensure()
        config = {
            "INSTANCE_PATH": str(workdir / "instance"),
            "KEYS_DIR": str(workdir / "keys"),
            "DATABASE_URL": url,
            "LOG_LEVEL": "WARNING",
            "METRICS_ENABLED": "false",
        }
        settings = load_settings(config, environ={})
        db = Database(settings.effective_database_url)
        migrate.upgrade(db)
        db.dispose()
        app = create_app(config)
        settle_heap(app)  # as a gunicorn web worker does at boot
        add_tenant(services.from_app(app).db)
        vendor = register(app, "bench-vendor", alg="ES384")
        enroll(app, vendor, "general", "pat-1", "bench-user")
        headers = vendor.headers(**{"Content-Type": "application/json"})
        client = app.test_client()

        def body(n: int) -> bytes:
            return orjson.dumps(
                {
                    "records": [
                        {
                            "record_id": f"r-{n}",
                            "app_user_id": "bench-user",
                            "measure": "steps-daily",
                            "data": {"date": f"2025-{1 + n % 12:02d}-{1 + n % 28:02d}", "steps": n % 9000},
                        }
                    ]
                }
            )

        db_cpu = [0.0]

        def run(start: int, count: int) -> float:
            from bench.bench_push import cpu_seconds

            bodies = [body(start + n) for n in range(count)]
            db0 = cpu_seconds(pg.proc.pid) if pg is not None and pg.proc is not None else 0.0
            began = time.process_time()
            for data in bodies:
                response = client.post("/api/v1/records", data=data, headers=headers)
                assert response.status_code == 200, response.data
                assert b'"status":"accepted"' in response.data, response.data
            spent = time.process_time() - began
            if pg is not None and pg.proc is not None:
                db_cpu[0] = cpu_seconds(pg.proc.pid) - db0
            return spent

        run(0, 200)  # warm-up: the catalogue, prepared statements, the token
        if args.profile:
            profiler = cProfile.Profile(time.process_time)  # CPU only: not waiting on the database
            profiler.enable()
            spent = run(1_000_000, args.count)
            profiler.disable()
            stats = pstats.Stats(profiler).sort_stats(args.sort)
            if args.callees:
                stats.print_callees(args.callees)
            else:
                stats.print_stats(args.top)
        else:
            spent = run(1_000_000, args.count)
        backend = "PostgreSQL" if args.pg else "SQLite"
        if spent_in is not None:
            for stage, seconds in spent_in.items():
                print(f"  {stage:58} {seconds / (args.count + 200) * 1000:.3f} ms")
        print(
            f"{backend}: {args.count} single-record pushes, {spent / args.count * 1000:.3f} ms CPU each"
            + (f" (+ {db_cpu[0] / args.count * 1000:.3f} ms in PostgreSQL)" if pg is not None else "")
        )
        return 0
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _instrument() -> dict[str, float]:
    """Wrap the push path's stages to add up their CPU (warm-up included: divide by every push)."""
    import functools
    from typing import Any

    from fhir_bridge import push
    from fhir_bridge.api import common, records
    from fhir_bridge.relationship import tasks as relationship_tasks

    spent: dict[str, float] = {}

    def wrap(module: Any, name: str, label: str) -> None:
        inner = getattr(module, name)
        spent[label] = 0.0

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[label] += time.process_time() - started

        setattr(module, name, timed)

    wrap(common, "authenticate", "authenticate (token memo, vendor snapshot)")
    wrap(records, "read_json", "read_json")
    wrap(push, "_submit_once", "the push transaction (all below and the rest)")
    wrap(push, "_evaluate", "  _evaluate (enrollments, duplicates, mapping)")
    wrap(push, "write_accepted", "  write_accepted (records, outbox, rules, tasks)")
    wrap(push, "on_accepted", "    rules: ledger, probe")
    wrap(relationship_tasks, "on_push", "    tasks/goals probe")
    return spent


if __name__ == "__main__":
    raise SystemExit(main())
