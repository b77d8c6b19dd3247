"""End-to-end delivery into the third-party FHIR server (sekmet), next to the floor measured in the same run.

Figure: resources per second from a full outbox to "in the EHR and recorded as delivered" (claiming,
building transaction Bundles with the app Device and a Provenance, writing, recording the EHR ids).
Floor: the very same Bundles, serialised beforehand, posted one after another by a bare ``requests``
session with the same headers: only the server's work and the HTTP round trips remain. The ratio is
figure / floor (TARGETS.md: >= 0.85). Rounds alternate floor and worker on fresh records; medians.

    python -m bench delivery [--records 1500] [--batch 100] [--rounds 3] [--threads 1,2] [--postgres]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import requests

from fhir_bridge.delivery import Worker, outbox
from fhir_bridge.delivery.writers import Group, Plan, TransactionWriter
from fhir_bridge.fhir_client import FhirClient
from fhir_bridge.services import build_services
from fhir_bridge.settings import load_settings
from fhir_bridge.storage import migrate
from fhir_bridge.storage.models import OutboxItem
from mappings.identity import device_resource
from tests.support.outbox_seed import add_tenant, seed
from tests.support.postgres import PostgresServer, find_bin_dir
from tests.support.sekmet import SekmetServer

QR_PUT = {"no_conditional_create": ["QuestionnaireResponse"]}
HEADERS = {
    "Content-Type": "application/fhir+json",
    "Accept": "application/fhir+json",
    "Prefer": "return=minimal",
}


def prebuilt_bundles(services: Any, tenant: str, batch: int) -> tuple[list[bytes], int]:
    """Claim the queued items the way the worker would and serialise its Bundles (then forget the claim)."""
    bundles: list[bytes] = []
    count = 0
    writer = TransactionWriter(
        FhirClient("http://unused.invalid/fhir"), put_types=frozenset(QR_PUT["no_conditional_create"])
    )
    while True:
        claim = outbox.claim(services.db, worker="floor", limit=batch, lease_seconds=3600, tenants=[tenant])
        if not claim.items:
            break
        groups: dict[str, Group] = {}
        for item in claim.items:
            vendor = claim.vendors[item.record_id] if item.record_id else None
            device = device_resource(vendor.client_id, vendor.name) if vendor else None
            groups.setdefault(item.group_key, Group(item.group_key, [], device)).items.append(item)
        plan = Plan(list(groups.values()), writer.put_types)
        entries = writer._entries(plan)
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [e.bundle_entry() for e in entries],
        }
        bundles.append(orjson.dumps(bundle))
        count += len(claim.items)
    return bundles, count


def run_floor(base_url: str, bundles: list[bytes]) -> float:
    session = requests.Session()
    started = time.perf_counter()
    for body in bundles:
        response = session.post(base_url, data=body, headers=HEADERS, timeout=120)
        if response.status_code != 200:
            raise SystemExit(f"floor: sekmet answered {response.status_code}: {response.text[:300]}")
    return time.perf_counter() - started


CPU: dict[str, list[float]] = {}


def steady_state(services: Any) -> None:
    """Table statistics as a running PostgreSQL has them (autovacuum analyses a table whose size
    changed; a freshly loaded one is planned blind for up to a minute)."""
    if services.db.dialect == "postgresql":
        with services.db.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE outbox")


def run_worker(services: Any, tenant: str, threads: int) -> float:
    steady_state(services)
    worker = Worker(services)
    worker.directory.refresh(force=True)
    cpu = time.process_time()
    started = time.perf_counter()
    worker.run_until_idle(threads=threads)  # the production loop (pipelined), until drained
    elapsed = time.perf_counter() - started
    CPU.setdefault(f"worker x{threads}", []).append(time.process_time() - cpu)
    with services.db.sessions() as session:
        left = (
            session.query(OutboxItem)
            .filter(OutboxItem.tenant_id == tenant, OutboxItem.status != "delivered")
            .count()
        )
    if left:
        raise SystemExit(f"worker left {left} items undelivered")
    return elapsed


def measure(
    records: int, batch: int, rounds: int, threads: list[int], postgres: bool
) -> dict[str, list[float]]:
    """Resources/s per round: ``floor``, ``worker xN`` per N in ``threads``; ``cpu xN``: ms/resource."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-delivery-"))
    ehr = SekmetServer()
    ehr.start()
    pg: PostgresServer | None = None
    CPU.clear()
    try:
        if postgres:
            bin_dir = find_bin_dir()
            if bin_dir is None:
                raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
            pg = PostgresServer(bin_dir)
            pg.start()
            url = pg.create_database()
        else:
            url = f"sqlite:///{tmp / 'bench.db'}"
        services = build_services(
            load_settings(
                {
                    "INSTANCE_PATH": str(tmp / "instance"),
                    "DATABASE_URL": url,
                    "ALLOW_INSECURE_LOOPBACK": True,
                    "WORKER_BATCH_SIZE": batch,
                    "LOG_LEVEL": "WARNING",
                },
                environ={},
            )
        )
        migrate.upgrade(services.db)
        # The floor's items are only claimed to build Bundles, never delivered by a worker.
        add_tenant(services.db, "floor", "http://127.0.0.1:9/floor-only", quirks=QR_PUT)
        add_tenant(services.db, "bench", ehr.base_url, quirks=QR_PUT)
        figures: dict[str, list[float]] = {"floor": []}
        figures |= {f"worker x{t}": [] for t in threads}
        # Warm-up: the first writes into a fresh server are not representative.
        seed(services.db, "floor", patient="warm", records=200)
        bundles, _ = prebuilt_bundles(services, "floor", batch)
        run_floor(ehr.base_url, bundles)
        contenders: list[int | None] = [None, *threads]  # None: the floor
        for round_no in range(rounds):
            # The server slows down as it fills up: rotate who goes first, round by round.
            shift = round_no % len(contenders)
            for t in contenders[shift:] + contenders[:shift]:
                if t is None:
                    patient = f"f{round_no}{uuid.uuid4().hex[:6]}"
                    seed(services.db, "floor", patient=patient, records=records)
                    bundles, count = prebuilt_bundles(services, "floor", batch)
                    figures["floor"].append(count / run_floor(ehr.base_url, bundles))
                    continue
                patient = f"w{t}{uuid.uuid4().hex[:6]}"
                seeded = seed(services.db, "bench", patient=patient, records=records)
                figures[f"worker x{t}"].append(len(seeded.items) / run_worker(services, "bench", t))
                CPU[f"worker x{t}"][-1] /= len(seeded.items)
            print(
                f"round {round_no + 1}: "
                + ", ".join(f"{name} {values[-1]:.0f}/s" for name, values in figures.items()),
                file=sys.stderr,
            )
        services.db.dispose()
        for t in threads:
            figures[f"cpu x{t}"] = [c * 1000 for c in CPU[f"worker x{t}"]]
        return figures
    finally:
        ehr.cleanup()
        if pg is not None:
            pg.stop()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench delivery", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--records", type=int, default=1500, help="records per round (half PHQ-9 = 2 resources)"
    )
    parser.add_argument("--batch", type=int, default=100, help="outbox items per transaction")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="worker delivery loops to measure, comma-separated")
    parser.add_argument("--postgres", action="store_true", help="outbox on PostgreSQL instead of SQLite")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    figures = measure(args.records, args.batch, args.rounds, threads, args.postgres)
    floor = statistics.median(figures["floor"])
    backend = "PostgreSQL" if args.postgres else "SQLite"
    print(
        f"\nDelivery into sekmet {ehr_version()}, outbox on {backend}, {args.records} records/round "
        f"(~{int(args.records * 1.5)} resources), transaction Bundles of {args.batch}, "
        f"median of {args.rounds} rounds\n"
    )
    print(f"{'figure':38} {'resources/s':>12} {'floor/s':>9} {'ratio':>7} {'our CPU ms/resource':>20}")
    print(f"{'floor: prebuilt Bundles, bare requests':38} {floor:>12.0f} {floor:>9.0f} {1:>7.2f} {'-':>20}")
    for t in threads:
        value = statistics.median(figures[f"worker x{t}"])
        cpu_ms = statistics.median(figures[f"cpu x{t}"])
        label = f"worker, {t} delivery loop{'s' if t > 1 else ''}"
        print(f"{label:38} {value:>12.0f} {floor:>9.0f} {value / floor:>7.2f} {cpu_ms:>20.2f}")


def ehr_version() -> str:
    from importlib.metadata import version

    return version("sekmet-fhir")
