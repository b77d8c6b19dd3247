"""The `fhir-bridge` command: what hospital IT, vendors and developers run.

Each subcommand builds only what it needs from the same settings the web app reads, so a command
run on the server sees exactly the configuration the service does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import timedelta
from functools import update_wrapper
from pathlib import Path
from typing import Any, TypeVar

import click

from fhir_bridge.settings import SPECS, Settings, SettingsError, load_settings

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """Lazily built per invocation: settings first (cheap), services only for commands that need them."""

    def __init__(self, config_file: str | None) -> None:
        self.config_file = config_file
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(config_file=self.config_file)
            except SettingsError as exc:
                raise click.ClickException(str(exc)) from None
        return self._settings

    def services(self) -> Any:
        from fhir_bridge.services import build_services

        return build_services(self.settings)


def pass_ctx(func: F) -> F:
    @click.pass_context
    def wrapper(click_ctx: click.Context, *args: Any, **kwargs: Any) -> Any:
        return click_ctx.invoke(func, click_ctx.ensure_object(Context), *args, **kwargs)

    return update_wrapper(wrapper, func)  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    "config_file",
    envvar="FHIR_BRIDGE_CONFIG",
    type=click.Path(dir_okay=False),
    help="TOML settings file (also FHIR_BRIDGE_CONFIG). Environment variables FHIR_BRIDGE_* win over it.",
)
@click.version_option(package_name="fhir-bridge")
@click.pass_context
def cli(click_ctx: click.Context, config_file: str | None) -> None:
    """fhir-bridge: mental-health app data into hospital EHRs through FHIR R4.

    Every setting has a working default; see README.md for the list.
    """
    click_ctx.obj = Context(config_file)


# -- serve ------------------------------------------------------------------------------------


@cli.command()
@click.option("--host", help="Address to bind (default: the HOST setting).")
@click.option("--port", type=int, help="Port to bind (default: the PORT setting).")
@click.option("--workers", type=int, help="Web worker processes (default: the WEB_WORKERS setting).")
@click.option("--no-migrate", is_flag=True, help="Do not bring the database schema up to date first.")
@pass_ctx
def serve(ctx: Context, host: str | None, port: int | None, workers: int | None, no_migrate: bool) -> None:
    """Run the web service (vendor API, SMART app, FHIR endpoints) under gunicorn."""
    from fhir_bridge.server import run_gunicorn

    settings = ctx.settings
    if not no_migrate:
        _upgrade(ctx)
    run_gunicorn(
        settings,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers or settings.web_workers,
    )


# -- db ---------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Database schema: upgrade, downgrade, show the current revision."""


def _upgrade(ctx: Context, revision: str = "head") -> str | None:
    from fhir_bridge.storage import Database, migrate

    database = Database(ctx.settings.effective_database_url)
    try:
        migrate.upgrade(database, revision)
        return migrate.current_revision(database)
    finally:
        database.dispose()


@db.command("upgrade")
@click.argument("revision", default="head")
@pass_ctx
def db_upgrade(ctx: Context, revision: str) -> None:
    """Apply migrations up to REVISION (default: the newest). Safe to run again."""
    current = _upgrade(ctx, revision)
    click.echo(f"database at revision {current}")


@db.command("downgrade")
@click.argument("revision")
@pass_ctx
def db_downgrade(ctx: Context, revision: str) -> None:
    """Revert migrations down to REVISION ('base' removes every table)."""
    from fhir_bridge.storage import Database, migrate

    database = Database(ctx.settings.effective_database_url)
    try:
        migrate.downgrade(database, revision)
        click.echo(f"database at revision {migrate.current_revision(database) or 'base'}")
    finally:
        database.dispose()


@db.command("current")
@pass_ctx
def db_current(ctx: Context) -> None:
    """Show the schema revision of the database and whether it is the newest."""
    from fhir_bridge.storage import Database, migrate

    database = Database(ctx.settings.effective_database_url)
    try:
        current = migrate.current_revision(database)
        head = migrate.head_revision()
        state = (
            "up to date" if current == head else f"behind (newest is {head}); run `fhir-bridge db upgrade`"
        )
        click.echo(f"{current or 'base'}: {state}")
    finally:
        database.dispose()


# -- keys -------------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """The service's signing keys (published at /.well-known/jwks.json)."""


def _keyring(ctx: Context) -> Any:
    from auth.keys import Keyring

    keyring = Keyring(ctx.settings.keys_path, alg=ctx.settings.signing_alg)
    keyring.ensure()
    return keyring


@keys.command("list")
@pass_ctx
def keys_list(ctx: Context) -> None:
    """List keys with when each signs and when it stops being published."""
    keyring = _keyring(ctx)
    signing = keyring.signing_key().kid
    for entry in keyring.entries():
        state = "signing" if entry.kid == signing else ("retiring" if entry.retires_at else "next")
        retires = entry.retires_at.isoformat(timespec="seconds") if entry.retires_at else "-"
        signs = entry.activates_at.isoformat(timespec="seconds")
        click.echo(f"{entry.kid}  {entry.alg}  {state:8}  signs from {signs}  published until {retires}")


@keys.command("rotate")
@click.option(
    "--lead", type=int, help="Seconds before the new key signs (default: KEY_ROTATION_LEAD_SECONDS)."
)
@click.option("--grace", type=int, help="Seconds the old key stays published after that.")
@pass_ctx
def keys_rotate(ctx: Context, lead: int | None, grace: int | None) -> None:
    """Add a new signing key; the old one stays published until its grace period ends."""
    settings = ctx.settings
    entry = _keyring(ctx).rotate(
        lead=timedelta(seconds=settings.key_rotation_lead_seconds if lead is None else lead),
        grace=timedelta(seconds=settings.key_rotation_grace_seconds if grace is None else grace),
    )
    click.echo(
        f"new key {entry.kid} published; it signs from {entry.activates_at.isoformat(timespec='seconds')}"
    )


@keys.command("purge")
@pass_ctx
def keys_purge(ctx: Context) -> None:
    """Delete keys whose grace period has ended."""
    removed = _keyring(ctx).purge_retired()
    click.echo(f"removed {len(removed)} retired key(s)" + (": " + ", ".join(removed) if removed else ""))


@keys.command("jwks")
@pass_ctx
def keys_jwks(ctx: Context) -> None:
    """Print the public JWKS (what /.well-known/jwks.json serves)."""
    click.echo(json.dumps(_keyring(ctx).jwks(), indent=2))


# -- delivery: worker, ehr, outbox -------------------------------------------------------------


def _database(ctx: Context) -> Any:
    from fhir_bridge.storage import Database

    return Database(ctx.settings.effective_database_url)


def _require_current_schema(database: Any) -> None:
    from fhir_bridge.storage import migrate

    current, head = migrate.current_revision(database), migrate.head_revision()
    if current != head:
        raise click.ClickException(
            f"the database schema is at {current or 'nothing'}, this version needs {head}: "
            "run `fhir-bridge db upgrade` first"
        )


@cli.command()
@click.option("--once", is_flag=True, help="Deliver until nothing is due, then exit (for cron or a test).")
@click.option("--threads", type=click.IntRange(1, 32), help="Delivery loops (default: WORKER_THREADS).")
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="Serve this worker's Prometheus metrics on 127.0.0.1:PORT (delivered, failures, EHR latency).",
)
@pass_ctx
def worker(ctx: Context, once: bool, threads: int | None, metrics_port: int | None) -> None:
    """Deliver queued resources to the EHRs until SIGTERM or SIGINT (the batch in hand is finished).

    Any number of workers may run against one PostgreSQL database; on SQLite run one. Each also
    offers the scheduled jobs (key rotation, retention purge, absence-of-data rules); one worker runs
    each job once per SCHEDULER_TICK_SECONDS.
    """
    import signal
    import threading

    # Handlers first: a stop requested while we start up is honoured once the loop begins.
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise SystemExit(128 + signum)  # a second signal: stop now; leases cover the batch in hand
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    from fhir_bridge.delivery import Worker
    from fhir_bridge.ops import logs

    settings = ctx.settings
    logs.configure_logging(settings.log_level, settings.log_format)
    services = ctx.services()
    _require_current_schema(services.db)
    if metrics_port:
        from prometheus_client import start_http_server

        from fhir_bridge.ops.metrics import registry_for

        start_http_server(metrics_port, addr="127.0.0.1", registry=registry_for(services.db))
    runner = Worker(services)
    runner.stop = stop
    if once:
        while not stop.is_set() and runner.run_once():
            pass
        return
    runner.run(threads=threads or settings.worker_threads, schedule=True)


@cli.group()
def ehr() -> None:
    """The EHRs this service writes to (tenants): add, update, list, check, remove."""


def _ehr_options(func: F) -> F:
    options = [
        click.option("--name", help="A name people recognise (default: the id)."),
        click.option(
            "--client-id", help="Our backend-services client id at this EHR (none: no token is sent)."
        ),
        click.option(
            "--token-url",
            help="Pin the EHR's token endpoint. Without it, it is discovered from "
            "FHIR_BASE/.well-known/smart-configuration.",
        ),
        click.option("--scopes", help="Scopes to ask for (SMART v2, e.g. 'system/Observation.c')."),
        click.option(
            "--write-strategy",
            type=click.Choice(["transaction", "batch", "single"]),
            help="transaction (default): one atomic Bundle per batch; batch: a batch Bundle per round; "
            "single: one request per resource, for EHRs without Bundle support.",
        ),
        click.option(
            "--no-conditional-create",
            "put_types",
            help="Comma-separated resource types this EHR refuses If-None-Exist for; they are written "
            "with PUT to their identifier instead (see docs/ehr-vendors.md).",
        ),
        click.option(
            "--provenance",
            type=click.Choice(["plain", "conditional", "off"]),
            help="How each batch's Provenance is written: plain create (default), conditional create on "
            "its batch tag (EHRs that search Provenance by _tag), or off (EHRs that refuse Provenance).",
        ),
        click.option(
            "--max-rps", type=click.FloatRange(min=0.1), help="Most requests per second to this EHR."
        ),
        click.option("--max-concurrent", type=click.IntRange(1, 64), help="Most requests in flight at once."),
        click.option("--cds-iss", help="CDS Hooks: the iss this EHR's CDS client signs hook calls with."),
        click.option("--cds-jwks-url", help="CDS Hooks: the JWKS URL of this EHR's CDS client (https)."),
        click.option(
            "--cds-jwks",
            type=click.File("rb"),
            help="CDS Hooks: a JWKS file with the CDS client's public keys (instead of --cds-jwks-url).",
        ),
        click.option(
            "--crisis-line",
            help="The crisis line shown with every message thread (messages are not for emergencies), "
            "e.g. 'Samaritans 116 123'; '' removes it.",
        ),
        click.option(
            "--backfill-rps",
            type=click.FloatRange(min=0),
            help="Most requests per second for backfill (history pushed with mode=backfill), within "
            "--max-rps; per worker process. 0: no separate backfill limit.",
        ),
        click.option(
            "--backfill-concurrent",
            type=click.IntRange(0, 64),
            help="Most backfill requests in flight at once, per worker process. 0: no separate limit.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _tenant_values(ctx: Context, fhir_base: str | None, **opts: Any) -> dict[str, Any]:
    from auth.backend import UnsafeUrlError, require_secure_url

    values: dict[str, Any] = {}
    loopback = ctx.settings.allow_insecure_loopback
    try:
        if fhir_base is not None:
            values["fhir_base_url"] = require_secure_url(
                fhir_base.strip().rstrip("/"), allow_insecure_loopback=loopback, what="--fhir-base"
            )
        if opts.get("token_url"):
            values["token_url"] = require_secure_url(
                opts["token_url"].strip(), allow_insecure_loopback=loopback, what="--token-url"
            )
        if opts.get("cds_jwks_url"):
            values["cds_client_jwks_url"] = require_secure_url(
                opts["cds_jwks_url"].strip(), allow_insecure_loopback=loopback, what="--cds-jwks-url"
            )
    except UnsafeUrlError as exc:
        raise click.BadParameter(str(exc)) from None
    if opts.get("cds_iss"):
        values["cds_client_iss"] = opts["cds_iss"].strip()
    if opts.get("cds_jwks") is not None:
        from auth.jwks_fetch import JwksFetchError, validate_jwks

        try:
            values["cds_client_jwks"] = validate_jwks(json.loads(opts["cds_jwks"].read()))
        except (ValueError, JwksFetchError) as exc:
            raise click.BadParameter(f"not a usable public JWKS: {exc}", param_hint="--cds-jwks") from None
    simple = {
        "name": "name",
        "client_id": "backend_client_id",
        "scopes": "backend_scopes",
        "write_strategy": "write_strategy",
        "max_rps": "max_requests_per_second",
        "max_concurrent": "max_concurrent_requests",
    }
    for option, column in simple.items():
        if opts.get(option) is not None:
            values[column] = opts[option]
    if opts.get("crisis_line") is not None:
        line = opts["crisis_line"].strip()
        if len(line) > 200 or any(ord(ch) < 32 for ch in line):
            raise click.BadParameter("a crisis line is one line of at most 200 characters")
        values["crisis_line"] = line or None
    for option, column in (
        ("backfill_rps", "backfill_requests_per_second"),
        ("backfill_concurrent", "backfill_max_concurrent"),
    ):
        if opts.get(option) is not None:
            values[column] = opts[option] or None  # 0 removes the backfill limit
    # Quirks are merged into what the EHR has (see `ehr update`); None removes one.
    quirks: dict[str, Any] = {}
    if opts.get("put_types") is not None:
        types = [t.strip() for t in opts["put_types"].split(",") if t.strip()]
        if not all(t.isalpha() and t[0].isupper() for t in types):
            raise click.BadParameter("expected FHIR resource type names, e.g. QuestionnaireResponse")
        quirks["no_conditional_create"] = types or None
    if opts.get("provenance") is not None:
        quirks["provenance"] = opts["provenance"]
    if quirks:
        values["quirks"] = quirks
    return values


def _merge_quirks(current: dict[str, Any] | None, changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(current or {})
    merged.update(changes)
    return {key: value for key, value in merged.items() if value is not None}


@ehr.command("add")
@click.argument("tenant_id")
@click.option("--fhir-base", required=True, help="The EHR's FHIR base URL (https).")
@_ehr_options
@pass_ctx
def ehr_add(ctx: Context, tenant_id: str, fhir_base: str, **opts: Any) -> None:
    """Connect an EHR: where its FHIR API is, and how we authenticate to write to it."""
    import re

    from sqlalchemy import select

    from fhir_bridge.storage.models import DEFAULT_BACKEND_SCOPES, Tenant

    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", tenant_id):
        raise click.BadParameter("use 1-64 lower-case letters, digits, '-' or '_'", param_hint="TENANT_ID")
    values = _tenant_values(ctx, fhir_base, **opts)
    values.setdefault("name", tenant_id)
    values.setdefault("backend_scopes", DEFAULT_BACKEND_SCOPES)  # the model's default, spelt out
    database = _database(ctx)
    try:
        with database.transaction() as session:
            if session.get(Tenant, tenant_id) is not None:
                raise click.ClickException(
                    f"an EHR with id {tenant_id!r} exists; use `fhir-bridge ehr update`"
                )
            clash = session.scalar(select(Tenant.id).where(Tenant.fhir_base_url == values["fhir_base_url"]))
            if clash is not None:
                raise click.ClickException(f"EHR {clash!r} already has FHIR base {values['fhir_base_url']}")
            values["quirks"] = _merge_quirks({}, values.get("quirks", {}))
            session.add(Tenant(id=tenant_id, **values))
    finally:
        database.dispose()
    click.echo(f"EHR {tenant_id} added; check it with `fhir-bridge ehr check {tenant_id}`")


@ehr.command("update")
@click.argument("tenant_id")
@click.option("--fhir-base", help="The EHR's FHIR base URL (https).")
@click.option("--discover", is_flag=True, help="Forget a pinned token URL and use discovery again.")
@click.option("--status", type=click.Choice(["active", "paused"]), help="paused: queue but do not deliver.")
@_ehr_options
@pass_ctx
def ehr_update(
    ctx: Context, tenant_id: str, fhir_base: str | None, discover: bool, status: str | None, **opts: Any
) -> None:
    """Change an EHR's settings; running workers pick the change up within seconds."""
    from fhir_bridge.storage.models import Tenant

    values = _tenant_values(ctx, fhir_base, **opts)
    if discover:
        values["token_url"] = None
    if status:
        values["status"] = status
    if not values:
        raise click.UsageError("nothing to change")
    database = _database(ctx)
    try:
        with database.transaction() as session:
            tenant = session.get(Tenant, tenant_id)
            if tenant is None:
                raise click.ClickException(f"no EHR with id {tenant_id!r}; see `fhir-bridge ehr list`")
            for column, value in values.items():
                if column == "quirks":
                    value = _merge_quirks(tenant.quirks, value)
                setattr(tenant, column, value)
    finally:
        database.dispose()
    click.echo(f"EHR {tenant_id} updated: {', '.join(sorted(values))}")


@ehr.command("list")
@pass_ctx
def ehr_list(ctx: Context) -> None:
    """The connected EHRs and how each is written to."""
    from sqlalchemy import select

    from fhir_bridge.storage.models import Tenant

    database = _database(ctx)
    try:
        with database.sessions() as session:
            tenants = list(session.scalars(select(Tenant).order_by(Tenant.id)))
    finally:
        database.dispose()
    if not tenants:
        click.echo("no EHRs yet; add one with `fhir-bridge ehr add`")
    for t in tenants:
        quirks = json.dumps(t.quirks, separators=(",", ":")) if t.quirks else "-"
        limits = f"{t.max_requests_per_second or '-'} rps, {t.max_concurrent_requests} at once"
        if t.backfill_requests_per_second or t.backfill_max_concurrent:
            limits += (
                f"; backfill {t.backfill_requests_per_second or '-'} rps, "
                f"{t.backfill_max_concurrent or '-'} at once"
            )
        click.echo(
            f"{t.id}  [{t.status}]  {t.name}\n"
            f"    FHIR base     {t.fhir_base_url}\n"
            f"    client id     {t.backend_client_id or '- (no token sent)'}\n"
            f"    token URL     {t.token_url or '(discovered)'}\n"
            f"    scopes        {t.backend_scopes}\n"
            f"    strategy      {t.write_strategy}   quirks {quirks}   limits {limits}"
        )


@ehr.command("check")
@click.argument("tenant_id")
@pass_ctx
def ehr_check(ctx: Context, tenant_id: str) -> None:
    """Try the connection: find the token endpoint, get a token, read the EHR's CapabilityStatement."""
    from auth.backend import BackendTokenSource, TokenError
    from fhir_bridge.delivery.tenants import TenantDirectory
    from fhir_bridge.fhir_client import FhirError

    services = ctx.services()
    directory = TenantDirectory(services.db, services.keyring, ctx.settings)
    directory.refresh(force=True)
    runtime = directory.get(tenant_id)
    if runtime is None:
        problem = directory.problems().get(tenant_id, "no active EHR with that id")
        raise click.ClickException(f"{tenant_id}: {problem}")
    client = runtime.client
    auth = client.auth
    try:
        if auth is not None:
            assert isinstance(auth, BackendTokenSource)
            click.echo(f"token endpoint  {auth.token_url}")
            auth.token()
            click.echo("access token    ok")
        metadata = client.request("GET", "metadata").body or {}
        software = (metadata.get("software") or {}).get("name", "?")
        click.echo(f"FHIR server     ok ({metadata.get('fhirVersion', '?')}, {software})")
    except (FhirError, TokenError) as exc:
        raise click.ClickException(f"{tenant_id}: {exc}") from None


@ehr.command("remove")
@click.argument("tenant_id")
@pass_ctx
def ehr_remove(ctx: Context, tenant_id: str) -> None:
    """Forget an EHR that has nothing queued, enrolled or delivered (purge its outbox first)."""
    from sqlalchemy import func, select

    from fhir_bridge.storage.models import Alert, Enrollment, OutboxItem, Tenant

    database = _database(ctx)
    try:
        with database.transaction() as session:
            tenant = session.get(Tenant, tenant_id)
            if tenant is None:
                raise click.ClickException(f"no EHR with id {tenant_id!r}")
            counts = {
                label: session.scalar(
                    select(func.count()).select_from(model).where(model.tenant_id == tenant_id)
                )
                for label, model in (
                    ("outbox items", OutboxItem),
                    ("enrollments", Enrollment),
                    ("alerts", Alert),
                )
            }
            left = {label: n for label, n in counts.items() if n}
            if left:
                detail = ", ".join(f"{n} {label}" for label, n in left.items())
                raise click.ClickException(
                    f"EHR {tenant_id} still has {detail}; pause it with `fhir-bridge ehr update {tenant_id} "
                    "--status paused`, or purge them first"
                )
            session.delete(tenant)
    finally:
        database.dispose()
    click.echo(f"EHR {tenant_id} removed")


@cli.group()
def outbox() -> None:
    """The delivery queue: status, retry dead letters, purge old items."""


@outbox.command("status")
@click.option("--tenant", help="Only this EHR.")
@click.option(
    "--dead",
    "show_dead",
    type=click.IntRange(0, 1000),
    default=10,
    show_default=True,
    help="Show this many of the newest dead letters with the EHR's reason.",
)
@pass_ctx
def outbox_status(ctx: Context, tenant: str | None, show_dead: int) -> None:
    """How many items wait, are being written, were delivered or dead-lettered, per EHR."""
    from datetime import UTC, datetime

    from fhir_bridge.delivery import outbox as box
    from fhir_bridge.fhir_client import outcome_text

    database = _database(ctx)
    try:
        queues = box.status(database, tenant=tenant)
        dead = box.dead_items(database, tenant=tenant, limit=show_dead) if show_dead else []
    finally:
        database.dispose()
    if not queues:
        click.echo("the outbox is empty")
        return
    now = datetime.now(UTC)
    click.echo(
        f"{'EHR':20} {'ready':>8} {'waiting':>8} {'sending':>8} {'delivered':>10} {'dead':>6}  oldest pending"
    )
    for q in queues:
        age = _age(now - q.oldest_pending) if q.oldest_pending else "-"
        nxt = f", next retry in {_age(q.next_attempt - now)}" if q.next_attempt else ""
        counts = f"{q.ready:>8} {q.waiting:>8} {q.leased:>8} {q.delivered:>10} {q.dead:>6}"
        click.echo(f"{q.tenant_id:20} {counts}  {age}{nxt}")
    if dead:
        click.echo("\nnewest dead letters (retry with `fhir-bridge outbox retry`):")
        for d in dead:
            reason = outcome_text(d.outcome, limit=200) or "-"
            click.echo(
                f"  #{d.id} {d.tenant_id} {d.resource_type}/{d.ident_value} after {d.attempts} attempt(s), "
                f"HTTP {d.last_status or '-'}: {reason}"
            )


def _age(delta: Any) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


@outbox.command("retry")
@click.option("--tenant", help="Only this EHR's dead letters.")
@click.option("--id", "item_ids", type=int, multiple=True, help="Only this item (repeatable).")
@pass_ctx
def outbox_retry(ctx: Context, tenant: str | None, item_ids: tuple[int, ...]) -> None:
    """Queue dead letters again with a fresh attempt budget (whole records go back together)."""
    from fhir_bridge.delivery import outbox as box

    database = _database(ctx)
    try:
        count = box.retry_dead(database, tenant=tenant, item_ids=item_ids)
    finally:
        database.dispose()
    click.echo(f"requeued {count} item(s)")


@outbox.command("purge")
@click.option("--older-than", "days", type=click.FloatRange(min=0), required=True, help="Age in days.")
@click.option("--delivered", is_flag=True, help="Purge delivered items (their copy is in the EHR).")
@click.option("--dead", is_flag=True, help="Purge dead letters (they will never be delivered).")
@click.option("--tenant", help="Only this EHR.")
@click.option("--yes", is_flag=True, help="Do it without asking.")
@pass_ctx
def outbox_purge(
    ctx: Context, days: float, delivered: bool, dead: bool, tenant: str | None, yes: bool
) -> None:
    """Delete old delivered and/or dead items: their bodies are patient data we no longer need."""
    from fhir_bridge.delivery import outbox as box

    statuses = [s for s, on in (("delivered", delivered), ("dead", dead)) if on]
    if not statuses:
        raise click.UsageError("say what to purge: --delivered and/or --dead")
    if not yes:
        click.confirm(
            f"Delete {' and '.join(statuses)} items older than {days:g} day(s)"
            + (f" of {tenant}" if tenant else "")
            + "?",
            abort=True,
        )
    database = _database(ctx)
    try:
        count = box.purge(database, statuses=statuses, older_than=timedelta(days=days), tenant=tenant)
    finally:
        database.dispose()
    click.echo(f"purged {count} item(s)")


# -- webhooks ---------------------------------------------------------------------------------


@cli.group()
def webhooks() -> None:
    """Vendors' webhook events: what waits, what was given up on, and sending those again."""


@webhooks.command("status")
@click.option("--vendor", "client_id", help="Only this vendor (client id).")
@click.option(
    "--dead",
    "show_dead",
    type=click.IntRange(0, 1000),
    default=10,
    show_default=True,
    help="Show this many of the newest dead events with the vendor's last answer.",
)
@pass_ctx
def webhooks_status(ctx: Context, client_id: str | None, show_dead: int) -> None:
    """How many events wait, were delivered, were given up on (dead) or dropped, per vendor."""
    from datetime import UTC, datetime

    from fhir_bridge.relationship import webhooks as hooks

    database = _database(ctx)
    try:
        queues = hooks.status(database, client_id=client_id)
        dead = hooks.dead_events(database, client_id=client_id, limit=show_dead) if show_dead else []
    finally:
        database.dispose()
    if not queues:
        click.echo("no webhook events")
        return
    now = datetime.now(UTC)
    click.echo(f"{'vendor':24} {'pending':>8} {'delivered':>10} {'dead':>6} {'dropped':>8}  oldest pending")
    for q in queues:
        oldest = q.oldest_pending
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        age = _age(now - oldest) if oldest else "-"
        counts = " ".join(
            f"{q.counts.get(state, 0):>{width}}"
            for state, width in (("pending", 8), ("delivered", 10), ("dead", 6), ("dropped", 8))
        )
        click.echo(f"{q.client_id:24} {counts}  {age}")
    if dead:
        click.echo("\nnewest dead events (send again with `fhir-bridge webhooks retry`):")
        for d in dead:
            answer = f"HTTP {d.last_status}" if d.last_status else "no answer (unreachable or refused)"
            click.echo(f"  #{d.id} {d.client_id} {d.kind} after {d.attempts} attempt(s): {answer}")


@webhooks.command("retry")
@click.option("--vendor", "client_id", help="Only this vendor's dead events.")
@click.option("--id", "event_ids", type=int, multiple=True, help="Only this event (repeatable).")
@pass_ctx
def webhooks_retry(ctx: Context, client_id: str | None, event_ids: tuple[int, ...]) -> None:
    """Send dead events again with a fresh attempt budget and the same event id (vendors dedupe on it)."""
    from fhir_bridge.relationship import webhooks as hooks

    database = _database(ctx)
    try:
        count = hooks.retry_dead(database, actor=_operator(), client_id=client_id, event_ids=event_ids)
    finally:
        database.dispose()
    click.echo(f"requeued {count} event(s)")


# -- config -----------------------------------------------------------------------------------


@cli.command("config")
@pass_ctx
def config_show(ctx: Context) -> None:
    """Validate the settings and print them (secrets hidden)."""
    settings = ctx.settings
    for spec in SPECS:
        value = getattr(settings, spec.name.lower())
        shown = ("(set)" if value else "(generated)") if spec.secret else value
        if isinstance(shown, tuple):
            shown = ",".join(shown)
        click.echo(f"FHIR_BRIDGE_{spec.name}={'' if shown is None else shown}")


# -- vendor -----------------------------------------------------------------------------------


def _bridge_error(exc: Exception) -> click.ClickException:
    return click.ClickException(str(getattr(exc, "message", exc)))


def _operator() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


@cli.group()
def vendor() -> None:
    """App vendors allowed to push data (OAuth2 client credentials with private_key_jwt)."""


@vendor.command("add")
@click.argument("client_id")
@click.option(
    "--name", required=True, help="The vendor's (or app's) name, shown to hospital IT and in the EHR."
)
@click.option(
    "--jwks",
    "jwks_file",
    type=click.Path(exists=True, dir_okay=False),
    help="File with the vendor's public JWKS (RS384 or ES384 keys).",
)
@click.option("--jwks-url", help="URL of the vendor's JWKS; its host must be in JWKS_FETCH_ALLOWED_HOSTS.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    help="Scope the vendor may be granted (repeat; default: all). See README, 'Vendor API'.",
)
@pass_ctx
def vendor_add(
    ctx: Context,
    client_id: str,
    name: str,
    jwks_file: str | None,
    jwks_url: str | None,
    scopes: tuple[str, ...],
) -> None:
    """Register a vendor with client id CLIENT_ID and its public keys (a file or a URL)."""
    from pathlib import Path

    from fhir_bridge import vendors
    from fhir_bridge.errors import BridgeError
    from fhir_bridge.storage import Database

    jwks = None
    if jwks_file is not None:
        try:
            jwks = json.loads(Path(jwks_file).read_text())
        except ValueError:
            raise click.ClickException(f"{jwks_file} is not valid JSON") from None
    settings = ctx.settings
    database = Database(settings.effective_database_url)
    try:
        view = vendors.register(
            database,
            client_id=client_id,
            name=name,
            jwks=jwks,
            jwks_url=jwks_url,
            scopes=list(scopes) or None,
            allowed_hosts=settings.jwks_fetch_allowed_hosts,
            allow_insecure_loopback=settings.allow_insecure_loopback,
            actor=_operator(),
        )
    except BridgeError as exc:
        raise _bridge_error(exc) from None
    finally:
        database.dispose()
    click.echo(f"registered vendor {view.client_id} ({view.name})")
    click.echo(f"  scopes:         {' '.join(view.scopes)}")
    click.echo(f"  keys:           {view.keys}")
    click.echo(f"  token endpoint: {settings.url('/oauth/token')}")


@vendor.command("webhook")
@click.argument("client_id")
@click.argument("url", required=False)
@click.option("--remove", is_flag=True, help="Remove the webhook URL: no more events are sent.")
@pass_ctx
def vendor_webhook(ctx: Context, client_id: str, url: str | None, remove: bool) -> None:
    """Set the HTTPS URL where the vendor receives signed change events (goals, tasks, messages)."""
    from fhir_bridge.errors import BridgeError
    from fhir_bridge.relationship import webhooks
    from fhir_bridge.storage import Database

    if (url is None) != remove:
        raise click.UsageError("give the webhook URL, or --remove")
    settings = ctx.settings
    database = Database(settings.effective_database_url)
    try:
        webhooks.set_url(
            database,
            client_id=client_id,
            url=url,
            allow_insecure_loopback=settings.allow_insecure_loopback,
            actor=_operator(),
        )
    except BridgeError as exc:
        raise _bridge_error(exc) from None
    finally:
        database.dispose()
    if url is None:
        click.echo(f"vendor {client_id}: webhook removed")
    else:
        jwks = settings.url("/.well-known/jwks.json")
        click.echo(f"vendor {client_id}: events go to {url}, signed with the keys at {jwks}")


@vendor.command("scopes")
@click.argument("client_id")
@click.option("--scope", "scopes", multiple=True, help="A scope the vendor may be granted (repeat).")
@click.option("--all", "all_scopes", is_flag=True, help="Every scope there is (also ones added by upgrades).")
@pass_ctx
def vendor_scopes(ctx: Context, client_id: str, scopes: tuple[str, ...], all_scopes: bool) -> None:
    """Replace the scopes a vendor may be granted (e.g. after an upgrade adds some); README, 'Vendor API'."""
    from fhir_bridge import vendors
    from fhir_bridge.errors import BridgeError
    from fhir_bridge.storage import Database

    if bool(scopes) == all_scopes:
        raise click.UsageError("give --scope (repeat for several) or --all")
    database = Database(ctx.settings.effective_database_url)
    try:
        view = vendors.set_scopes(
            database, client_id=client_id, scopes=None if all_scopes else list(scopes), actor=_operator()
        )
    except BridgeError as exc:
        raise _bridge_error(exc) from None
    finally:
        database.dispose()
    click.echo(f"vendor {view.client_id} may be granted: {' '.join(view.scopes)}")


@vendor.command("list")
@pass_ctx
def vendor_list(ctx: Context) -> None:
    """List registered vendors with their status, scopes and where their keys come from."""
    from fhir_bridge import vendors
    from fhir_bridge.storage import Database

    database = Database(ctx.settings.effective_database_url)
    try:
        views = vendors.list_all(database)
    finally:
        database.dispose()
    if not views:
        click.echo("no vendors registered; add one with `fhir-bridge vendor add`")
    for view in views:
        click.echo(
            f"{view.client_id}  {view.status:8}  {view.name}  [{' '.join(view.scopes)}]  keys: {view.keys}"
            + (f"  webhook: {view.webhook_url}" if view.webhook_url else "")
        )


@vendor.command("disable")
@click.argument("client_id")
@pass_ctx
def vendor_disable(ctx: Context, client_id: str) -> None:
    """Disable a vendor now: its tokens stop working on their next use."""
    from fhir_bridge import vendors
    from fhir_bridge.errors import BridgeError
    from fhir_bridge.storage import Database

    database = Database(ctx.settings.effective_database_url)
    try:
        view = vendors.disable(database, client_id=client_id, actor=_operator())
    except BridgeError as exc:
        raise _bridge_error(exc) from None
    finally:
        database.dispose()
    click.echo(f"vendor {view.client_id} is {view.status}")


# -- enrollment -------------------------------------------------------------------------------


@cli.group()
def enrollment() -> None:
    """Pairing patients with app users: create codes, list enrollments."""


@enrollment.command("create")
@click.option("--tenant", required=True, help="The EHR (tenant id) the patient is in.")
@click.option("--patient", required=True, help="The patient's FHIR id in that EHR.")
@click.option("--vendor", "vendor_id", required=True, help="The vendor's client id.")
@click.option("--created-by", help="Who asked for it (default: the operating-system user).")
@pass_ctx
def enrollment_create(
    ctx: Context, tenant: str, patient: str, vendor_id: str, created_by: str | None
) -> None:
    """Create a pairing code for a patient; the patient types it into the vendor's app."""
    from fhir_bridge import enrollment as enrollments
    from fhir_bridge.errors import BridgeError

    svc = ctx.services()
    try:
        created = enrollments.create(
            svc.db,
            secret=svc.secret_key,
            tenant_id=tenant,
            patient_id=patient,
            vendor_client_id=vendor_id,
            created_by=created_by or _operator(),
            ttl_seconds=svc.settings.pairing_code_ttl,
        )
    except BridgeError as exc:
        raise _bridge_error(exc) from None
    finally:
        svc.db.dispose()
    click.echo(f"pairing code: {enrollments.display(created.code)}")
    click.echo(f"  enrollment: {created.enrollment_id}")
    click.echo(f"  expires:    {created.expires_at.isoformat(timespec='seconds')}")
    click.echo("  The code is shown only now; it is stored as a hash and works once.")


@enrollment.command("list")
@click.option("--tenant", help="Only this EHR.")
@click.option("--vendor", "vendor_id", help="Only this vendor.")
@pass_ctx
def enrollment_list(ctx: Context, tenant: str | None, vendor_id: str | None) -> None:
    """List enrollments: EHR, patient, vendor, app user and status."""
    from datetime import UTC, datetime

    from fhir_bridge import enrollment as enrollments
    from fhir_bridge.storage import Database

    database = Database(ctx.settings.effective_database_url)
    try:
        rows = enrollments.list_all(database, tenant_id=tenant, vendor=vendor_id)
    finally:
        database.dispose()
    now = datetime.now(UTC)
    if not rows:
        click.echo("no enrollments")
    for row in rows:
        state = row.status
        if state == "pending" and row.code_expires_at is not None and row.code_expires_at <= now:
            state = "expired"
        click.echo(
            f"{row.id}  {state:8}  tenant={row.tenant_id}  patient={row.patient_id}  vendor={row.vendor}"
            f"  app_user={row.app_user_id or '-'}  created={row.created_at.isoformat(timespec='seconds')}"
        )


# -- bench ------------------------------------------------------------------------------------


@cli.command(
    "bench",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run the benchmark suite (TARGETS.md): ``--quick``, ``--only NAMES``, ``--json PATH``, ``compare A B``.

    The suite lives in the source checkout (``bench/``, next to ``tests/support`` whose servers it
    starts), not in the installed package; run this from the checkout. ``--help`` lists the options.
    """
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("bench.suite") is None:
        cwd = Path.cwd()
        if (cwd / "bench" / "suite.py").is_file():
            sys.path.insert(0, str(cwd))
        else:
            raise click.ClickException("the benchmark suite needs a source checkout: run this from its root")
    from bench.__main__ import main as bench_main

    raise SystemExit(bench_main(list(args)))


# -- map --------------------------------------------------------------------------------------


@cli.command("map")
@click.argument("measure", required=False)
@click.argument("file", type=click.File("rb"), required=False)
@click.option("--list", "list_measures", is_flag=True, help="List the measures of the catalogue and exit.")
@click.option(
    "--vendor", default="example-app", show_default=True, help="Vendor client id (part of identifiers)."
)
@click.option("--vendor-name", help="Name of the app in its Device resource (default: the vendor id).")
@click.option(
    "--record-id",
    help="The vendor's record id (default: the file's `record_id` for a native record, else example-record).",
)
@click.option("--patient", default="Patient/example", show_default=True, help="Reference of the EHR patient.")
@pass_ctx
def map_record(
    ctx: Context,
    measure: str | None,
    file: Any,
    list_measures: bool,
    vendor: str,
    vendor_name: str | None,
    record_id: str | None,
    patient: str,
) -> None:
    """Print the FHIR transaction Bundle a record becomes, or why it is rejected (exit status 1).

    FILE is a JSON file (or - for standard input) holding the record's `data` object, or a whole native
    record ({"record_id": ..., "measure": ..., "data": {...}}). Nothing is sent anywhere.
    """
    from datetime import UTC, datetime

    from fhir_bridge.catalog import catalog_for
    from mappings import MappingContext, MappingSpecError, transaction_bundle
    from mappings.identity import device_full_url, device_resource

    try:
        catalog = catalog_for(ctx.settings)
    except MappingSpecError as exc:
        raise click.ClickException(str(exc)) from None
    if list_measures:
        for name in catalog.measures():
            spec = catalog.spec(name)
            click.echo(f"{name:20} {spec.kind:14} {spec.title}")
        return
    if measure is None or file is None:
        raise click.UsageError("give MEASURE and FILE (or --list)")
    if measure not in catalog:
        raise click.BadParameter(
            f"unknown measure; known: {', '.join(catalog.measures())}", param_hint="MEASURE"
        )
    try:
        data = json.loads(file.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{file.name} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "data" in data and {"record_id", "measure"} & set(data):
        if data.get("measure", measure) != measure:
            raise click.ClickException(
                f"{file.name} is a record of measure {data['measure']!r}, not {measure!r}"
            )
        if record_id is None and isinstance(data.get("record_id"), str):
            record_id = data["record_id"]
        data = data["data"]
    context = MappingContext(
        vendor_id=vendor,
        record_id=record_id or "example-record",
        patient_reference=patient,
        device_full_url=device_full_url(vendor),
        received_at=datetime.now(UTC),
    )
    result = catalog.map(measure, data, context)
    if not result.ok:
        rejections = [{"code": r.code, "field": r.field, "message": r.message} for r in result.rejections]
        click.echo(json.dumps({"rejections": rejections}, indent=2, ensure_ascii=False))
        click.echo(f"record rejected ({len(rejections)} reason(s))", err=True)
        sys.exit(1)
    bundle = transaction_bundle([device_resource(vendor, vendor_name or vendor), *result.resources])
    click.echo(json.dumps(bundle, indent=2, ensure_ascii=False))


# -- rules (issue 8) ---------------------------------------------------------------------------


@cli.group()
def rules() -> None:
    """Rule files: check them, and see what a history would fire."""


def _load_rules(ctx: Context, rules_dir: str | None, tenant: str | None) -> Any:
    from pathlib import Path

    from fhir_bridge.rules.engine import ruleset_for
    from fhir_bridge.rules.model import RuleFileError, load_rules

    try:
        if rules_dir is not None:
            return load_rules(Path(rules_dir))
        return ruleset_for(tenant or "", ctx.settings.rules_dir)
    except RuleFileError as exc:
        raise click.ClickException(str(exc)) from None


@rules.command("list")
@click.option(
    "--rules", "rules_dir", type=click.Path(file_okay=False, exists=True), help="Extra rule folder."
)
@click.option("--tenant", help="Show the rules of this tenant (RULES_DIR/<tenant>).")
@pass_ctx
def rules_list(ctx: Context, rules_dir: str | None, tenant: str | None) -> None:
    """Load and check the rule files (exit 1 naming file and field if one is bad), then list the rules."""
    for rule in _load_rules(ctx, rules_dir, tenant).rules:
        state = "" if rule.enabled else "  (off)"
        click.echo(f"{rule.id:16} {rule.trigger:9} {rule.priority:8} {rule.title}{state}")


@rules.command("test")
@click.argument("file", type=click.File("rb"))
@click.option(
    "--rules",
    "rules_dir",
    type=click.Path(file_okay=False, exists=True),
    help="A folder of rule files applied over the shipped defaults (default: the RULES_DIR setting).",
)
@click.option("--tenant", help="Use this tenant's rules (RULES_DIR/<tenant>).")
@click.option("--now", "now_text", help="Evaluate schedule rules as of this ISO date-time (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print the firings as JSON.")
@pass_ctx
def rules_test(
    ctx: Context, file: Any, rules_dir: str | None, tenant: str | None, now_text: str | None, as_json: bool
) -> None:
    """Print what would fire for the JSON history in FILE (- for standard input). Nothing is stored.

    FILE holds a list (or {"records": [...]}) of native records, as an app pushes them, and/or
    measurements {"code": "phq9.total", "time": "2026-11-02T20:30:00-06:00", "value": 15}. The history
    is evaluated as it would be when pushed, then the schedule rules run as of --now.
    """
    from datetime import UTC, datetime

    from fhir_bridge.catalog import catalog_for
    from fhir_bridge.rules.history import HistoryError, rows_from_json
    from fhir_bridge.rules.model import simulate

    ruleset = _load_rules(ctx, rules_dir, tenant)
    try:
        data = json.loads(file.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{file.name} is not valid JSON: {exc}") from None
    try:
        rows = rows_from_json(data, catalog_for(ctx.settings))
    except HistoryError as exc:
        raise click.ClickException(f"{file.name}: {exc}") from None
    try:
        now = datetime.fromisoformat(now_text) if now_text else datetime.now(UTC)
    except ValueError:
        raise click.BadParameter(
            "an ISO 8601 date-time, e.g. 2026-12-07T12:00:00Z", param_hint="--now"
        ) from None
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    events = simulate(ruleset, rows, now)
    fired = [e for e in events if e.kind == "fired"]
    if as_json:
        out = [
            {"rule": e.rule.id, "at": e.at.isoformat(), "priority": e.rule.priority, "reason": e.reason}
            for e in fired
        ]
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    click.echo(f"{len(rows)} measurement(s), {len(ruleset.enabled())} rule(s), as of {now.isoformat()}")
    if not fired:
        click.echo("nothing would fire")
    for event in fired:
        click.echo(
            f"{event.at.date().isoformat()}  {event.rule.id:14} {event.rule.priority:8} {event.reason}"
        )


# -- sandbox EHR (development and demo only) ---------------------------------------------------


@cli.group()
def sandbox() -> None:
    """The sandbox EHR, for development and demos only: SMART authorization server, FHIR R4 endpoint,
    and a chart page that launches apps. Synthetic data; never use it with real patients."""


@sandbox.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=9090, show_default=True, help="Port to bind.")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False),
    default="instance/sandbox",
    show_default=True,
    help="Folder for the sandbox's database, keys and admin token (created on first start).",
)
@click.option("--public-url", help="URL apps reach the sandbox at (default: http://HOST:PORT).")
@click.option(
    "--bridge-url",
    help="Register the fhir-bridge at this URL: its SMART app (launch URL, /callback/TENANT) and its "
    "backend-services client (JWKS at /.well-known/jwks.json).",
)
@click.option(
    "--bridge-tenant",
    "bridge_tenants",
    multiple=True,
    default=["sandbox"],
    show_default=True,
    help="The tenant id the bridge knows this sandbox by (repeat for several): its redirect URI is "
    "BRIDGE_URL/callback/TENANT.",
)
@click.option(
    "--clients",
    "clients_file",
    type=click.Path(dir_okay=False, exists=True),
    help="JSON list of app registrations to create or update at start (same fields as the admin API).",
)
@click.option("--no-seed", is_flag=True, help="Do not create the demo patients in an empty sandbox.")
@pass_ctx
def sandbox_serve(
    ctx: Context,
    host: str,
    port: int,
    data_dir: str,
    public_url: str | None,
    bridge_url: str | None,
    bridge_tenants: tuple[str, ...],
    clients_file: str | None,
    no_seed: bool,
) -> None:
    """Run the sandbox EHR on its own port (chart at /, FHIR base at /fhir)."""
    from pathlib import Path

    from fhir_bridge.errors import BridgeError
    from fhir_bridge.sandbox.app import create_sandbox_app
    from fhir_bridge.sandbox.runtime import Sandbox, SandboxConfig
    from fhir_bridge.sandbox.server import run_sandbox

    url = (public_url or f"http://{host}:{port}").rstrip("/")
    config = SandboxConfig(data_dir=Path(data_dir), public_url=url, seed=not no_seed)
    clients = Path(clients_file) if clients_file else None
    # Build it once here, so a bad clients file or a stale data folder is a one-line error, not a
    # worker that fails to boot; this also creates the data folder, keys, admin token and demo data.
    try:
        app = create_sandbox_app(
            config,
            clients_file=clients,
            bridge_url=bridge_url,
            bridge_tenants=bridge_tenants,
            log_level="WARNING",
            log_format=ctx.settings.log_format,
        )
    except (BridgeError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    sandbox = app.extensions["fhir_bridge.sandbox"]
    assert isinstance(sandbox, Sandbox)
    sandbox.db.dispose()  # no SQLite connection may cross gunicorn's fork
    folder = config.data_dir
    click.echo(
        "Sandbox EHR (development and demo only; synthetic data, never real patients)\n"
        f"  chart:       {url}/\n"
        f"  FHIR base:   {config.fhir_base}\n"
        f"  admin token: {folder / 'admin_token'}"
    )
    run_sandbox(
        config,
        host=host,
        port=port,
        clients_file=clients,
        bridge_url=bridge_url,
        bridge_tenants=bridge_tenants,
        log_level=ctx.settings.log_level,
        log_format=ctx.settings.log_format,
    )


# -- demo (development and demo only) ----------------------------------------------------------


@cli.command()
@click.option(
    "--port",
    type=click.IntRange(0, 65534),
    default=9090,
    show_default=True,
    help="Port of the sandbox EHR (the URL to open); the bridge uses PORT + 1. 0: any free ports.",
)
@click.option(
    "--patients",
    type=click.IntRange(1, 6),
    default=5,
    show_default=True,
    help="Sandbox patients who use the synthetic app (patient n has story n mod 5).",
)
@click.option(
    "--days",
    type=click.IntRange(1, 3650),
    default=120,
    show_default=True,
    help="Days of app data per patient, ending now (the stories need 70 or more to show their alerts).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the demo's databases, keys and logs here (reused on the next run). Default: a temporary "
    "folder, removed when the demo stops.",
)
def demo(port: int, patients: int, days: int, data_dir: Path | None) -> None:
    """The whole virtual clinic on this machine: sandbox EHR, fhir-bridge, its worker and a synthetic app.

    Prints the one URL to open (the sandbox EHR's chart) once the app's data is in the EHR; Ctrl-C
    stops everything. Development and demos only: synthetic data, no passwords.
    """
    from fhir_bridge.sandbox.demo import DemoConfig, run_demo

    sys.exit(run_demo(DemoConfig(port=port, patients=patients, days=days, data_dir=data_dir)))


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="fhir-bridge")
