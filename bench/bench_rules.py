"""Rule evaluation cost per accepted record: the push path with rules, next to the same push without them.

In-process, on one database per configuration (SQLite, and PostgreSQL when its binaries are installed):
a tenant, a vendor and ``--patients`` enrolled app users (the five stories in turn); each story's
120-day history from ``fhir_bridge.sandbox.synthetic`` (about 470 native records: daily steps, sleep,
engagement and mood, weekly PHQ-9, fortnightly GAD-7 and D-WAI) is pushed through
:func:`fhir_bridge.push.push` the way an app syncs, in batches of ``--batch`` records, and then again
one record per push (the worst case: every record evaluates the rules over the patient's whole
history). Three configurations, same run, same records:

* ``off``: the rules hook replaced by a no-op (the push as it was before issue 8);
* ``ledger``: measurements written to the ledger, every rule disabled;
* ``rules``: the shipped rules.

Figures are CPU milliseconds per accepted record (``time.process_time``: this process does all the
work on SQLite; on PostgreSQL the server's CPU is not counted, so wall time is reported too), the
median of ``--rounds``. The rules' cost per record is ``rules - off``.

    python -m bench rules [--rounds N] [--patients N] [--batch N] [--backend sqlite|postgresql|both]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
STORIES = ("responder", "non-responder", "silent", "safety", "alliance-drop")


def story_records(key: str, app_user_id: str, end: datetime) -> list[dict[str, Any]]:
    from fhir_bridge.sandbox import synthetic

    return list(synthetic.generate(key, app_user_id=app_user_id, end=end))


@contextmanager
def hook(mode: str, rules_dir: Path) -> Iterator[None]:
    """Swap the push's rules hook for this configuration."""
    import fhir_bridge.push
    from fhir_bridge.rules import engine

    push_module: Any = fhir_bridge.push  # its ``on_accepted`` is swapped, so typed loosely
    original = push_module.on_accepted
    if mode == "off":
        push_module.on_accepted = lambda *args, **kwargs: []
    elif mode == "ledger":
        push_module.on_accepted = lambda s, p, n, **kw: engine.on_accepted(s, p, n, rules_dir=rules_dir)
    try:
        yield
    finally:
        push_module.on_accepted = original


def setup(database_url: str, patients: int, workdir: Path) -> tuple[Any, Any, Any, list[str]]:
    from fhir_bridge.push import Mapper
    from fhir_bridge.settings import load_settings
    from fhir_bridge.storage import Database, migrate
    from fhir_bridge.storage.models import Enrollment, Tenant, VendorClient

    settings = load_settings(
        {"INSTANCE_PATH": str(workdir / "instance"), "DATABASE_URL": database_url}, environ={}
    )
    db = Database(settings.effective_database_url)
    migrate.upgrade(db)
    users: list[str] = []
    with db.transaction() as session:
        session.add(
            Tenant(id="bench", name="Bench", fhir_base_url=f"https://bench.example/{uuid.uuid4().hex}/fhir")
        )
        vendor = VendorClient(client_id=f"bench-{uuid.uuid4().hex[:8]}", name="Bench", scopes="records.write")
        session.add(vendor)
        session.flush()
        for n in range(patients):
            user = f"user-{n}"
            users.append(user)
            session.add(
                Enrollment(
                    tenant_id="bench",
                    patient_id=f"pat-{n}",
                    vendor_id=vendor.id,
                    app_user_id=user,
                    status="active",
                    claimed_at=datetime.now(UTC),
                )
            )
        session.flush()
        session.expunge(vendor)
    return db, Mapper(settings), vendor, users


def measure(
    database_url: Callable[[], str], mode: str, patients: int, batch: int, single: bool, workdir: Path
) -> tuple[float, float, int]:
    """(CPU ms per record, wall ms per record, records accepted) for one configuration."""
    from fhir_bridge.push import push

    disabled = workdir / f"off-{uuid.uuid4().hex[:6]}"
    disabled.mkdir()
    (disabled / "off.yaml").write_text(
        "apiVersion: fhir-bridge/rules/v1\nrules:\n"
        + "".join(
            f"  - {{id: {rid}, enabled: false}}\n"
            for rid in ("safety-item9", "severe", "no-response", "disengagement", "alliance-drop")
        )
    )
    db, mapper, vendor, users = setup(database_url(), patients, workdir / uuid.uuid4().hex[:6])
    end = datetime.now(UTC)
    syncs: list[list[dict[str, Any]]] = []
    for n, user in enumerate(users):
        records = story_records(STORIES[n % len(STORIES)], user, end)
        size = 1 if single else batch
        syncs += [records[i : i + size] for i in range(0, len(records), size)]
    accepted = 0
    try:
        with hook(mode, disabled):
            cpu, wall = time.process_time(), time.perf_counter()
            for chunk in syncs:
                body = orjson.dumps({"records": chunk})
                outcome = push(db, mapper, vendor=vendor, records=chunk, body=body, idempotency_key=None)
                accepted += orjson.loads(outcome.body)["counts"]["accepted"]
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if mode == "rules" and not single:
            schedule_ms.append(schedule_cost(db, len(users)))
    finally:
        db.dispose()
    return 1000 * cpu / accepted, 1000 * wall / accepted, accepted


schedule_ms: list[float] = []


def schedule_cost(db: Any, patients: int) -> float:
    """CPU ms per enrolled patient of one schedule run (absence rules), after the histories are in."""
    from fhir_bridge.rules.engine import run_scheduled_rules

    cpu = time.process_time()
    with db.transaction() as session:
        run_scheduled_rules(session, datetime.now(UTC))
    return 1000 * (time.process_time() - cpu) / patients


def run(
    *,
    database_url: Callable[[], str],
    rounds: int = 3,
    patients: int = 10,
    batch: int = 50,
    label: str = "SQLite",
) -> list[dict[str, Any]]:
    """Figures for one backend: per configuration and arrival pattern, median CPU and wall ms per record."""
    figures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-rules-") as tmp:
        workdir = Path(tmp)
        measure(database_url, "rules", min(patients, 2), batch, False, workdir)  # warm-up: imports, caches
        schedule_ms.clear()
        for single in (False, True):
            pattern = "1 record/push" if single else f"{batch} records/push"
            results: dict[str, list[tuple[float, float, int]]] = {m: [] for m in ("off", "ledger", "rules")}
            for _ in range(rounds):
                for mode in results:  # interleaved, so drift hits every configuration alike
                    results[mode].append(measure(database_url, mode, patients, batch, single, workdir))
            for mode, samples in results.items():
                figures.append(
                    {
                        "backend": label,
                        "pattern": pattern,
                        "config": mode,
                        "cpu_ms_per_record": statistics.median(s[0] for s in samples),
                        "wall_ms_per_record": statistics.median(s[1] for s in samples),
                        "records": samples[0][2],
                    }
                )
    if schedule_ms:
        figures.append(
            {
                "backend": label,
                "pattern": "schedule run",
                "schedule_cpu_ms_per_patient": statistics.median(schedule_ms),
                "patients": patients,
            }
        )
    return figures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench rules", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=10, help="enrolled app users (stories in turn)")
    parser.add_argument("--batch", type=int, default=50, help="records per push in the batched pattern")
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="sqlite")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    figures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-rules-sqlite-") as tmp:
        if args.backend in ("sqlite", "both"):
            counter = iter(range(10**6))
            figures += run(
                database_url=lambda: f"sqlite:///{tmp}/db-{next(counter)}.sqlite",
                rounds=args.rounds,
                patients=args.patients,
                batch=args.batch,
            )
    if args.backend in ("postgresql", "both"):
        from tests.support.postgres import PostgresServer, find_bin_dir

        bin_dir = find_bin_dir()
        if bin_dir is None:
            print("PostgreSQL binaries not found; skipping")
        else:
            pg = PostgresServer(bin_dir)
            pg.start()
            try:
                figures += run(
                    database_url=pg.create_database,
                    rounds=args.rounds,
                    patients=args.patients,
                    batch=args.batch,
                    label="PostgreSQL",
                )
            finally:
                pg.stop()
    print(f"{'backend':10} {'pattern':18} {'config':7} {'CPU ms/rec':>10} {'wall ms/rec':>11} {'records':>8}")
    for f in figures:
        if "schedule_cpu_ms_per_patient" in f:
            continue
        print(
            f"{f['backend']:10} {f['pattern']:18} {f['config']:7} {f['cpu_ms_per_record']:>10.3f} "
            f"{f['wall_ms_per_record']:>11.3f} {f['records']:>8}"
        )
    for f in figures:
        if "schedule_cpu_ms_per_patient" in f:
            print(
                f"schedule run (absence rules), {f['backend']}: "
                f"{f['schedule_cpu_ms_per_patient']:.3f} CPU ms per enrolled patient "
                f"({f['patients']} patients with 120 days of data)"
            )
    by = {(f["backend"], f["pattern"], f["config"]): f for f in figures if "records" in f}
    for backend, pattern, _ in sorted({k for k in by if k[2] == "rules"}):
        extra = (
            by[(backend, pattern, "rules")]["cpu_ms_per_record"]
            - by[(backend, pattern, "off")]["cpu_ms_per_record"]
        )
        print(f"rules cost, {backend}, {pattern}: {extra:+.3f} CPU ms per accepted record (rules - off)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
