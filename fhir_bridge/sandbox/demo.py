"""`fhir-bridge demo`: the whole virtual clinic on one machine with one command.

DEVELOPMENT AND DEMO ONLY. It starts three child processes, each exactly what an operator would
run (``fhir-bridge sandbox serve``, ``fhir-bridge serve``, ``fhir-bridge worker``), so the demo shows
the product as it is deployed rather than a special in-process variant. Before they take traffic,
it prepares the bridge the way hospital IT would (schema, the sandbox as a tenant with its backend
client, the synthetic vendor); then the synthetic vendor claims and pushes through the real HTTP
API, the demo waits until the worker has written everything to the sandbox EHR, and prints the one
URL to open: the sandbox's chart page.

Children run in their own sessions so a Ctrl-C reaches only this process, which then stops them in
order by their own process ids (SIGTERM, then SIGKILL after a grace period); on Linux they also get
SIGTERM if this process dies without cleaning up (``PR_SET_PDEATHSIG``), so nothing is orphaned.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import click

from fhir_bridge.sandbox import vendor_sim

TENANT_ID = "sandbox"
SMART_CLIENT_ID = "fhir-bridge"  # what the sandbox registers for --bridge-url (sandbox.app.bridge_clients)
BACKEND_CLIENT_ID = "fhir-bridge-backend"
STATE_FILE = "demo.json"
READY_TIMEOUT = 90.0
STALL_TIMEOUT = 120.0  # no delivery progress for this long: something is wrong, say what
STOP_GRACE = 10.0
# Ctrl-C, a service manager's stop, and a closed terminal all stop the demo the same clean way.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and where the logs are."""


@dataclass(frozen=True)
class DemoConfig:
    port: int = 9090  # the sandbox EHR (the URL people open); the bridge listens on port + 1; 0: any free
    patients: int = 5
    days: int = 120
    data_dir: Path | None = None  # None: a temporary folder, removed when the demo stops


@dataclass
class _Children:
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, args: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as handle:
            proc = subprocess.Popen(  # noqa: S603 - our own command line, no shell
                [sys.executable, "-m", "fhir_bridge", *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # single-threaded here; Linux only, best effort
            )
        self.procs.append((name, proc))
        return proc

    def check(self, logs: Path) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise DemoError(
                    f"the {name} stopped (exit status {proc.returncode}); see {logs / (name + '.log')}"
                )

    def stop_all(self) -> None:
        """Newest first (worker, bridge, EHR), each by its own pid and process group."""
        for _, proc in reversed(self.procs):
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait(timeout=STOP_GRACE)


def _signal(proc: subprocess.Popen[bytes], signum: int) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signum)  # the child leads its own group (gunicorn's workers are in it)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)


def _die_with_parent() -> None:
    """In the child before exec: ask Linux for SIGTERM when the demo process dies (PR_SET_PDEATHSIG = 1)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class _Interrupted(Exception):  # a signal, not an error
    pass


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise _Interrupted(signum)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    previous = {s: signal.signal(s, _raise_interrupt) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_demo(config: DemoConfig, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run until SIGINT, SIGTERM or SIGHUP; 0 after a clean stop, 1 when the demo could not start."""
    out = out or sys.stdout
    err = err or sys.stderr
    temporary = config.data_dir is None
    data = Path(tempfile.mkdtemp(prefix="fhir-bridge-demo-")) if config.data_dir is None else config.data_dir
    data.mkdir(parents=True, exist_ok=True)
    logs = data / "logs"
    logs.mkdir(exist_ok=True)
    children = _Children()
    started = time.monotonic()
    with _signals_interrupt():
        try:
            url = _start(config, data, logs, children, err)
            click.echo(
                f"Ready in {time.monotonic() - started:.0f} s. Open the sandbox EHR's chart, click "
                '"Launch fhir-bridge" next to Alex Rivera (the non-responder). Ctrl-C stops everything.',
                file=err,
            )
            click.echo(url, file=out)
            out.flush()
            while True:
                children.check(logs)
                time.sleep(0.5)
        except _Interrupted:
            click.echo("\nstopping the demo ...", file=err)
            return 0
        except (DemoError, vendor_sim.SimulationError) as exc:
            click.echo(f"fhir-bridge demo: {exc}", file=err)
            click.echo(f"logs: {logs}", file=err)
            return 1
        finally:
            for (
                signum
            ) in STOP_SIGNALS:  # a second Ctrl-C (or a closed terminal) must not cut the clean-up short
                signal.signal(signum, signal.SIG_IGN)
            children.stop_all()
            if temporary:
                shutil.rmtree(data, ignore_errors=True)
            click.echo("demo stopped", file=err)


def _start(config: DemoConfig, data: Path, logs: Path, children: _Children, err: TextIO) -> str:
    ehr_port = config.port or _free_port()
    bridge_port = config.port + 1 if config.port else _free_port()
    while bridge_port == ehr_port:  # two free-port picks may, rarely, return the same port
        bridge_port = _free_port()
    ehr_url, bridge_url = f"http://127.0.0.1:{ehr_port}", f"http://127.0.0.1:{bridge_port}"
    fhir_base = f"{ehr_url}/fhir"
    env = _bridge_env(data, bridge_url)
    state_path = data / STATE_FILE
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}

    click.echo(
        "fhir-bridge demo: sandbox EHR (development and demo only, synthetic data) "
        f"at {ehr_url}, fhir-bridge at {bridge_url}, data in {data}",
        file=err,
    )
    for port in (ehr_port, bridge_port):
        if _port_open(port):
            raise DemoError(f"port {port} is in use; choose another with --port (the bridge uses --port + 1)")
    svc = _prepare_bridge(env, fhir_base, ehr_url)
    try:
        key = vendor_sim.load_or_create_key(data / "vendor-key.json")
        vendor_sim.register_vendor(svc, key)
        children.start(
            "sandbox",
            [
                "sandbox",
                "serve",
                "--port",
                str(ehr_port),
                "--data",
                str(data / "sandbox"),
                "--bridge-url",
                bridge_url,
                "--bridge-tenant",
                TENANT_ID,
            ],
            env=env,
            log=logs / "sandbox.log",
        )
        children.start(
            "bridge",
            ["serve", "--port", str(bridge_port), "--workers", "1", "--no-migrate"],
            env=env,
            log=logs / "bridge.log",
        )
        children.start("worker", ["worker"], env=env, log=logs / "worker.log")
        _wait(
            lambda: _port_open(ehr_port) and _port_open(bridge_port), children, logs, "the EHR and the bridge"
        )

        if state.get("seeded"):
            click.echo("data from an earlier run is kept (delete the data folder for fresh data)", file=err)
        else:
            api = vendor_sim.VendorApi(bridge_url, key)
            try:
                plan = vendor_sim.plan(config.patients, days=config.days)
                with click.progressbar(
                    length=plan.total,
                    label=f"App pushes {config.days} days for {config.patients} patients",
                    file=err,
                ) as bar:
                    vendor_sim.run(
                        svc, api, plan, tenant_id=TENANT_ID, progress=_checked(bar.update, children, logs)
                    )
            finally:
                api.close()
        _drain(svc, children, logs, err)
        state_path.write_text(json.dumps({"seeded": True, "patients": config.patients, "days": config.days}))
    finally:
        svc.db.dispose()
    return f"{ehr_url}/"


def _checked(update: Callable[[int], None], children: _Children, logs: Path) -> Callable[[int], None]:
    def step(n: int) -> None:
        children.check(logs)
        update(n)

    return step


def _bridge_env(data: Path, bridge_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_BRIDGE_")}
    env.update(
        FHIR_BRIDGE_INSTANCE_PATH=str(data / "bridge"),
        FHIR_BRIDGE_PUBLIC_URL=bridge_url,
        FHIR_BRIDGE_ALLOW_INSECURE_LOOPBACK="true",
        FHIR_BRIDGE_LOG_FORMAT="json",
        FHIR_BRIDGE_LOG_LEVEL="INFO",
        FHIR_BRIDGE_WORKER_POLL_SECONDS="0.2",
        FHIR_BRIDGE_WORKER_BATCH_SIZE="500",
        FHIR_BRIDGE_WORKER_RETRY_BASE_SECONDS="1",
        FHIR_BRIDGE_WORKER_RETRY_MAX_SECONDS="10",
    )
    return env


def _prepare_bridge(env: dict[str, str], fhir_base: str, ehr_url: str) -> Any:
    """What hospital IT does once: schema, the sandbox as a tenant (our SMART and backend clients there)."""
    from fhir_bridge.services import build_services
    from fhir_bridge.settings import load_settings
    from fhir_bridge.storage import migrate
    from fhir_bridge.storage.models import Tenant

    settings = load_settings(
        {k.removeprefix("FHIR_BRIDGE_"): v for k, v in env.items() if k.startswith("FHIR_BRIDGE_")},
        environ={},
    )
    svc = build_services(settings)
    migrate.upgrade(svc.db)
    with svc.db.transaction() as session:
        tenant = session.get(Tenant, TENANT_ID)
        if tenant is None:
            tenant = Tenant(id=TENANT_ID, name="Sandbox EHR (demo)", fhir_base_url=fhir_base)
            session.add(tenant)
        # A kept data folder may be started on other ports: the EHR's address follows.
        tenant.fhir_base_url = fhir_base
        tenant.smart_client_id = SMART_CLIENT_ID
        tenant.backend_client_id = BACKEND_CLIENT_ID
        tenant.frame_ancestors = [ehr_url]
        tenant.token_url = None
    return svc


def _wait(check: Callable[[], bool], children: _Children, logs: Path, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not check():
        children.check(logs)
        if time.monotonic() > deadline:
            raise DemoError(f"{what} did not start within {READY_TIMEOUT:.0f} s")
        time.sleep(0.1)


def _drain(svc: Any, children: _Children, logs: Path, err: TextIO) -> None:
    """Wait until the worker has delivered (or dead-lettered) every queued item, with a progress bar."""
    from fhir_bridge.delivery import outbox as box
    from fhir_bridge.fhir_client import outcome_text

    def counts() -> tuple[int, int, int]:
        queues = box.status(svc.db, tenant=TENANT_ID)
        if not queues:
            return 0, 0, 0
        q = queues[0]
        total = q.ready + q.waiting + q.leased + q.delivered + q.dead
        return total, q.delivered + q.dead, q.dead

    total, done, _ = counts()
    last_change, shown = time.monotonic(), 0
    with click.progressbar(length=max(total, 1), label="Worker writes to the EHR  ", file=err) as bar:
        while done < total:
            children.check(logs)
            time.sleep(0.3)
            total, now_done, _ = counts()
            bar.length = max(total, 1)  # alerts may queue a Flag and a Task while we wait
            if now_done != done:
                last_change = time.monotonic()
            done = now_done
            bar.update(done - shown)
            shown = done
            if time.monotonic() - last_change > STALL_TIMEOUT:
                raise DemoError(
                    f"delivery to the sandbox EHR stalled at {done}/{total}; see {logs / 'worker.log'}"
                )
    _, _, dead = counts()
    if dead:
        reasons = {
            outcome_text(d.outcome, limit=200) or "-"
            for d in box.dead_items(svc.db, tenant=TENANT_ID, limit=5)
        }
        raise DemoError(
            f"{dead} item(s) could not be written to the sandbox EHR: {'; '.join(sorted(reasons))}"
        )
