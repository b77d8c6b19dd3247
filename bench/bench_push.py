"""Push throughput: native records through the real service, per server CPU second, next to a floor.

For SQLite and (when its binaries are installed) PostgreSQL, this starts `fhir-bridge serve` with one
gunicorn worker on loopback, registers a vendor, enrolls an app user, and pushes batches of 1,000
records and single-record batches over HTTP. Each figure is records per CPU second of the server
processes (so the client's own work does not count), the median of several rounds.

The floor, measured in the same run, is what the push path cannot beat: the same records loaded by
marshmallow (envelope and the measure's data schema) and serialised by orjson, with no FHIR work and
no database (TARGETS.md, first row); see :func:`floor_rate`.

    python -m bench push [--rounds N] [--batches N] [--singles N] [--backend sqlite|postgresql|both]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import requests
from joserfc import jwt
from joserfc.jwk import ECKey

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants (gunicorn master and workers)."""
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                stack.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def records(prefix: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "record_id": f"{prefix}-{i}",
            "app_user_id": "bench-user",
            "measure": "steps-daily",
            "data": {"date": f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}", "steps": 1000 + i % 9000},
        }
        for i in range(count)
    ]


def floor_rate(count: int = 20_000, *, envelope_only: bool = False) -> float:
    """Records per CPU second through marshmallow and orjson, nothing else: the first row's floor.

    Each record is loaded as marshmallow loads it, whole: the envelope (``RecordSchema``) and its
    ``data`` through the measure's own schema (the same field checks the mapping applies, run by
    marshmallow's ``Schema.load``), as the mapping bench's floor does; then the loaded records are
    serialised with orjson. TARGETS.md's reference points put such a load of a vendor record at
    about 20,000/s, and its first target (10,000 records/s, ratio 0.5) is half of that.

    ``envelope_only``: the envelope alone, ``data`` taken as an unchecked dict (this bench's floor
    until 2026-12-07; printed next to the row so the two can be compared).
    """
    from fhir_bridge.push import RecordSchema
    from mappings.catalog import load_catalog
    from mappings.records import RECORD_CONTEXT

    schema = RecordSchema()
    catalog = load_catalog()
    mappers: dict[str, Any] = dict(catalog._mappers)
    data_schemas = {m: mappers[m].schema for m in catalog.measures()}
    body = orjson.dumps({"records": records("floor", count)})
    latest = datetime.now(UTC) + catalog.future_tolerance
    started = time.process_time()
    parsed = orjson.loads(body)
    if envelope_only:
        loaded = [schema.load(r) for r in parsed["records"]]
    else:
        with RECORD_CONTEXT({"latest": latest}):
            loaded = []
            for r in parsed["records"]:
                envelope = schema.load(r)
                envelope["data"] = data_schemas[envelope["measure"]].load(envelope["data"])
                loaded.append(envelope)
    orjson.dumps(loaded)
    return count / (time.process_time() - started)


class Server:
    """``fhir-bridge serve`` (gunicorn) on loopback with ``workers`` web processes and extra settings."""

    def __init__(
        self, database_url: str, workdir: Path, *, workers: int = 1, settings: dict[str, str] | None = None
    ) -> None:
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FHIR_BRIDGE_")},
            "FHIR_BRIDGE_INSTANCE_PATH": str(workdir / "instance"),
            "FHIR_BRIDGE_DATABASE_URL": database_url,
            "FHIR_BRIDGE_PUBLIC_URL": self.url,
            "FHIR_BRIDGE_LOG_LEVEL": "WARNING",
            "FHIR_BRIDGE_METRICS_ENABLED": "false",
            "PYTHONPATH": str(ROOT),
        } | {f"FHIR_BRIDGE_{k}": v for k, v in (settings or {}).items()}
        self.proc: subprocess.Popen[bytes] | None = None
        self.vendor_key: Any = None

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "fhir_bridge", *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        return done.stdout

    def start(self) -> None:
        self.cli("db", "upgrade")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fhir_bridge",
                "serve",
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
                "--no-migrate",
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        raise RuntimeError("the service did not become ready")

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=20)


def setup_vendor(
    server: Server, workdir: Path, fhir_base: str = "https://bench.example/fhir"
) -> tuple[requests.Session, str]:
    """Register a vendor and a tenant, enroll "bench-user", and return a session with a token."""
    key = ECKey.generate_key("P-384", private=True)
    jwk = key.as_dict(private=False) | {"kid": "bench-key"}
    (workdir / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    key = ECKey.import_key(key.as_dict(private=True) | {"kid": "bench-key"})
    server.cli("vendor", "add", "bench-vendor", "--name", "Bench", "--jwks", str(workdir / "jwks.json"))
    _add_tenant(server, fhir_base)
    code = server.cli(
        "enrollment", "create", "--tenant", "bench", "--patient", "pat-1", "--vendor", "bench-vendor"
    )
    code = code.split("pairing code: ")[1].split()[0]
    session = requests.Session()
    server.vendor_key = key
    token = vendor_token(server, session)
    session.headers["Authorization"] = f"Bearer {token}"
    claimed = session.post(
        server.url + "/api/v1/enrollments/claim", json={"code": code, "app_user_id": "bench-user"}
    )
    claimed.raise_for_status()
    return session, token


def vendor_token(server: Server, session: requests.Session) -> str:
    """A fresh vendor access token (they live VENDOR_TOKEN_LIFETIME, 300 s): long runs renew it."""
    now = int(time.time())
    assertion = jwt.encode(
        {"alg": "ES384", "kid": "bench-key", "typ": "JWT"},
        {
            "iss": "bench-vendor",
            "sub": "bench-vendor",
            "aud": server.url + "/oauth/token",
            "exp": now + 240,
            "jti": uuid.uuid4().hex,
        },
        server.vendor_key,
        algorithms=["ES384"],
    )
    token: str = session.post(
        server.url + "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
        timeout=30,
    ).json()["access_token"]
    session.headers["Authorization"] = f"Bearer {token}"
    return token


def enroll_users(server: Server, session: requests.Session, count: int, prefix: str = "bench-user-") -> None:
    """Enroll ``count`` more app users (patients ``pat-u0`` ..) of the bench vendor, claimed through the API.

    Why: a hospital's pushes come from many patients at once; with one patient every push would
    also queue on that patient's rule-evaluation lock (PostgreSQL), which no deployment sees.
    """
    from fhir_bridge import enrollment
    from fhir_bridge.services import build_services
    from fhir_bridge.settings import load_settings

    services = build_services(
        load_settings(
            {
                "INSTANCE_PATH": server.env["FHIR_BRIDGE_INSTANCE_PATH"],
                "DATABASE_URL": server.env["FHIR_BRIDGE_DATABASE_URL"],
                "LOG_LEVEL": "WARNING",
            },
            environ={},
        )
    )
    try:
        for n in range(count):
            code = enrollment.create(
                services.db,
                secret=services.secret_key,
                tenant_id="bench",
                patient_id=f"pat-u{n}",
                vendor_client_id="bench-vendor",
                created_by="bench",
                ttl_seconds=600,
            ).code
            claimed = session.post(
                server.url + "/api/v1/enrollments/claim", json={"code": code, "app_user_id": f"{prefix}{n}"}
            )
            claimed.raise_for_status()
    finally:
        services.db.dispose()


def _add_tenant(server: Server, fhir_base: str) -> None:
    from fhir_bridge.storage import Database
    from fhir_bridge.storage.models import Tenant

    db = Database(server.env["FHIR_BRIDGE_DATABASE_URL"])
    try:
        with db.transaction() as session:
            session.add(Tenant(id="bench", name="Bench", fhir_base_url=fhir_base))
    finally:
        db.dispose()


def measure(
    server: Server, session: requests.Session, *, size: int, requests_: int, tag: str
) -> tuple[float, float]:
    """(records per server CPU second, records per wall second) for ``requests_`` pushes of ``size``."""
    assert server.proc is not None
    bodies = [orjson.dumps({"records": records(f"{tag}-{n}", size)}) for n in range(requests_)]
    headers = {"Content-Type": "application/json"}
    cpu0, wall0 = cpu_seconds(server.proc.pid), time.perf_counter()
    for body in bodies:
        response = session.post(server.url + "/api/v1/records", data=body, headers=headers, timeout=120)
        if response.status_code != 200 or response.json()["counts"]["accepted"] != size:
            raise RuntimeError(f"push failed: {response.status_code} {response.text[:300]}")
    cpu, wall = cpu_seconds(server.proc.pid) - cpu0, time.perf_counter() - wall0
    total = size * requests_
    return total / max(cpu, 1e-9), total / wall


def run_backend(name: str, database_url: str, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-push-{name}-"))
    server = Server(database_url or f"sqlite:///{workdir / 'bench.db'}", workdir)
    rows = []
    try:
        server.start()
        session, _ = setup_vendor(server, workdir)
        measure(server, session, size=100, requests_=2, tag="warm")
        big, big_wall, single, single_wall, floors = [], [], [], [], []
        for round_ in range(args.rounds):
            floors.append(floor_rate())
            cpu_rate, wall_rate = measure(
                server, session, size=1000, requests_=args.batches, tag=f"b{round_}"
            )
            big.append(cpu_rate)
            big_wall.append(wall_rate)
            cpu_rate, wall_rate = measure(server, session, size=1, requests_=args.singles, tag=f"s{round_}")
            single.append(cpu_rate)
            single_wall.append(wall_rate)
        floor = statistics.median(floors)
        rows.append((f"{name}: batch 1,000, records/s per server CPU s", statistics.median(big), floor))
        rows.append((f"{name}: batch 1,000, records/s wall (1 worker)", statistics.median(big_wall), floor))
        rows.append((f"{name}: batch 1, records/s per server CPU s", statistics.median(single), floor))
        rows.append(
            (f"{name}: batch 1, requests/s wall (1 worker, 1 client)", statistics.median(single_wall), floor)
        )
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench push", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=5, help="batches of 1,000 per round")
    parser.add_argument("--singles", type=int, default=300, help="single-record pushes per round")
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    rows: list[tuple[str, float, float]] = []
    if args.backend in ("sqlite", "both"):
        rows += run_backend("SQLite", "", args)
    if args.backend in ("postgresql", "both"):
        from tests.support.postgres import PostgresServer, find_bin_dir

        bin_dir = find_bin_dir()
        if bin_dir is None:
            print("PostgreSQL binaries not found; skipping (apt-get install postgresql)")
        else:
            pg = PostgresServer(bin_dir)
            pg.start()
            try:
                rows += run_backend("PostgreSQL", pg.create_database(), args)
            finally:
                pg.stop()
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>10}  {'floor':>10}  {'ratio':>6}")
    for label, value, floor in rows:
        print(f"{label:<{width}}  {value:>10,.0f}  {floor:>10,.0f}  {value / floor:>6.2f}")
    print("floor: the same records through marshmallow + orjson only, records per CPU second, same run")
    return 0
