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
    help="Register the fhir-bridge at this URL: its SMART app (launch URL, /callback) and its "
    "backend-services client (JWKS at /.well-known/jwks.json).",
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
        log_level=ctx.settings.log_level,
        log_format=ctx.settings.log_format,
    )


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="fhir-bridge")
