"""Batch push in-process: records per CPU second of this process, optionally under cProfile.

Where ``python -m bench push`` measures the real server (gunicorn, loopback HTTP), this runs the
same route through the Flask test client in one process, so a profile shows only our code: the
HTTP client's work is the test client's (small next to a 1,000-record batch). The app is built by
the factory on a migrated database and settled as a web worker settles it
(``fhir_bridge.server.settle_heap``), a vendor is registered and an app user enrolled as the tests
do, then batches of ``--size`` native records (the bench's steps-daily records, or ``--mix`` for the
mapping bench's realistic mix) are pushed and timed with ``time.process_time``.

    python -m bench.profile_push [--backend sqlite|postgresql] [--batches 10] [--size 1000]
                                 [--mix] [--profile out.prof] [--top 40]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def database(backend: str, workdir: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{workdir / 'bench.db'}"
        return
    from tests.support.postgres import PostgresServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise SystemExit("PostgreSQL binaries not found (apt-get install postgresql)")
    pg = PostgresServer(bin_dir)
    pg.start()
    try:
        yield pg.create_database()
    finally:
        pg.stop()


def build(url: str, workdir: Path) -> tuple[Any, Any]:
    """(app, vendor) with "bench-user" enrolled for patient pat-1 of tenant "bench"."""
    from auth.keys import Keyring
    from fhir_bridge import create_app
    from fhir_bridge.server import settle_heap
    from fhir_bridge.settings import load_settings
    from fhir_bridge.storage import Database, migrate
    from tests.support.vendor import add_tenant, enroll, register

    keys = workdir / "keys"
    Keyring(keys).ensure()
    config = {
        "INSTANCE_PATH": str(workdir / "instance"),
        "KEYS_DIR": str(keys),
        "DATABASE_URL": url,
        "LOG_LEVEL": "WARNING",
        "METRICS_ENABLED": "false",
    }
    db = Database(load_settings(config, environ={}).effective_database_url)
    migrate.upgrade(db)
    db.dispose()
    app = create_app(config)
    from fhir_bridge import services

    add_tenant(services.from_app(app).db, "bench")
    vendor = register(app, "bench-vendor", alg="ES384")
    enroll(app, vendor, "bench", "pat-1", "bench-user")
    settle_heap(app)
    return app, vendor


def bodies(prefix: str, count: int, size: int, mix: bool) -> list[bytes]:
    from bench.bench_mapping import MIX, make_record
    from bench.bench_push import records

    out = []
    rng = random.Random(7)
    measures = [m for m, n in MIX.items() for _ in range(n)]
    for n in range(count):
        if mix:
            batch = [
                {"record_id": f"{prefix}-{n}-{i}", "app_user_id": "bench-user"}
                | make_record(rng.choice(measures), rng)
                for i in range(size)
            ]
        else:
            batch = records(f"{prefix}-{n}", size)
        out.append(orjson.dumps({"records": batch}))
    return out


def push_all(vendor: Any, payloads: list[bytes], size: int) -> list[float]:
    """CPU seconds of each push; every record must be accepted."""
    headers = vendor.headers(**{"Content-Type": "application/json"})
    times = []
    for body in payloads:
        started = time.process_time()
        response = vendor.client.post("/api/v1/records", data=body, headers=headers)
        times.append(time.process_time() - started)
        counts = response.json["counts"]
        if response.status_code != 200 or counts["accepted"] != size:
            raise RuntimeError(f"push failed: {response.status_code} {response.get_data()[:300]!r}")
    return times


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile_push", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--mix", action="store_true", help="the mapping bench's mix of measures")
    parser.add_argument("--profile", help="write a cProfile of the timed pushes here")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="profile-push-") as tmp, database(args.backend, Path(tmp)) as url:
        app, vendor = build(url, Path(tmp))
        push_all(vendor, bodies("warm", 2, 100, args.mix), 100)
        payloads = bodies("b", args.batches, args.size, args.mix)
        # CPU time, not wall time: a commit waiting on the disk is not work this process does.
        profiler = cProfile.Profile(time.process_time) if args.profile else None
        if profiler is not None:
            profiler.enable()
        times = push_all(vendor, payloads, args.size)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
            pstats.Stats(args.profile).sort_stats("cumulative").print_stats(args.top)
            pstats.Stats(args.profile).sort_stats("tottime").print_stats(args.top)
        from fhir_bridge import services

        services.from_app(app).db.dispose()
    rates = [args.size / t for t in times]
    print(
        f"{args.backend}: {args.batches} x {args.size} records: median {statistics.median(rates):,.0f} "
        f"rec/CPU s (min {min(rates):,.0f}, max {max(rates):,.0f})"
        + (" [under cProfile]" if args.profile else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
