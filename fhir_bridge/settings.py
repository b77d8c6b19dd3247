"""Service settings: one table of every setting, loaded once and validated at start-up.

Sources, later ones winning: built-in defaults, an optional TOML file (``FHIR_BRIDGE_CONFIG`` or the
``config_file`` argument), environment variables prefixed ``FHIR_BRIDGE_``, and explicit overrides
(what tests pass to ``create_app``). Every default works on one machine with nothing else installed,
so ``fhir-bridge serve`` runs with no configuration at all. A bad value stops start-up with a
:class:`SettingsError` that names the setting, because a service that starts half-configured in a
hospital is worse than one that refuses to start.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "FHIR_BRIDGE_"


class SettingsError(ValueError):
    """One or more settings are invalid; the message names each of them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))
        self.problems = problems


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def _int_between(low: int, high: int) -> Callable[[Any], int]:
    def convert(raw: Any) -> int:
        if isinstance(raw, bool):
            raise ValueError("expected an integer")
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise ValueError(f"expected an integer between {low} and {high}") from None
        if not low <= value <= high:
            raise ValueError(f"expected an integer between {low} and {high}, got {value}")
        return value

    return convert


def _float_between(low: float, high: float) -> Callable[[Any], float]:
    def convert(raw: Any) -> float:
        try:
            value = float(str(raw).strip())
        except ValueError:
            raise ValueError(f"expected a number between {low} and {high}") from None
        if not low <= value <= high:
            raise ValueError(f"expected a number between {low} and {high}, got {value}")
        return value

    return convert


def _choice(*options: str) -> Callable[[Any], str]:
    def convert(raw: Any) -> str:
        value = str(raw).strip()
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return value

    return convert


def _http_url(raw: Any) -> str:
    value = str(raw).strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"expected an absolute http(s) URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError("a base URL may not carry a query or fragment")
    return value


def _database_url(raw: Any) -> str:
    value = str(raw).strip()
    scheme = value.split(":", 1)[0]
    if scheme not in {"sqlite", "postgresql", "postgresql+psycopg"}:
        raise ValueError("expected a sqlite:/// or postgresql:// URL")
    if scheme == "postgresql":
        # psycopg 3 is the driver we ship with; SQLAlchemy's bare postgresql:// means psycopg2.
        value = "postgresql+psycopg" + value[len("postgresql") :]
    return value


def _optional_path(raw: Any) -> Path | None:
    text = str(raw).strip() if raw is not None else ""
    return Path(text).expanduser() if text else None


def _path(raw: Any) -> Path:
    text = str(raw).strip()
    if not text:
        raise ValueError("expected a path")
    return Path(text).expanduser()


def _str_list(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, list | tuple):
        items = [str(item).strip() for item in raw]
    else:
        items = [part.strip() for part in str(raw).split(",")]
    return tuple(item for item in items if item)


def _networks(raw: Any) -> tuple[str, ...]:
    from fhir_bridge.ops.proxy import parse_networks

    entries = _str_list(raw)
    parse_networks(entries)
    return entries


def _text(raw: Any) -> str:
    return str(raw).strip()


@dataclass(frozen=True)
class Spec:
    """How one setting is read, what it defaults to, and what it is for (README is built from this)."""

    name: str
    default: Any
    convert: Callable[[Any], Any]
    doc: str
    secret: bool = False


# The order here is the order README.md documents them in.
SPECS: tuple[Spec, ...] = (
    Spec("INSTANCE_PATH", "instance", _path, "Folder for the SQLite database, generated keys and secrets."),
    Spec(
        "DATABASE_URL",
        "",
        lambda raw: _database_url(raw) if str(raw).strip() else "",
        "SQLAlchemy URL. Empty means a SQLite file `fhir-bridge.db` in the instance folder. "
        "PostgreSQL: `postgresql://user:pass@host/db` (psycopg 3).",
        secret=True,
    ),
    Spec(
        "PUBLIC_URL",
        "http://127.0.0.1:8080",
        _http_url,
        "The URL clients use to reach this service; token audience, JWKS and launch URLs derive from it.",
    ),
    Spec(
        "SECRET_KEY",
        "",
        _text,
        "Signs browser sessions. Empty means generate one into the instance folder (mode 0600).",
        secret=True,
    ),
    Spec(
        "DATA_KEY",
        "",
        _text,
        "Fernet key(s), comma-separated newest first, encrypting tokens at rest. Empty means "
        "generate one into the instance folder (mode 0600).",
        secret=True,
    ),
    Spec(
        "KEYS_DIR",
        "",
        _optional_path,
        "Folder of the service's signing keys (JWKS). Empty means `keys/` in the instance folder; "
        "keys are generated there on first start.",
    ),
    Spec(
        "SIGNING_ALG",
        "RS384",
        _choice("RS384", "ES384"),
        "Algorithm of newly generated signing keys (SMART Backend Services allows RS384 and ES384).",
    ),
    Spec(
        "KEY_ROTATION_LEAD_SECONDS",
        3600,
        _int_between(0, 30 * 86400),
        "How long a new key is published in the JWKS before it signs anything (EHRs cache JWKS).",
    ),
    Spec(
        "KEY_ROTATION_GRACE_SECONDS",
        86400,
        _int_between(300, 365 * 86400),
        "How long a replaced key stays published after its successor starts signing.",
    ),
    Spec("LOG_LEVEL", "INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "Log level."),
    Spec(
        "LOG_FORMAT",
        "json",
        _choice("json", "text"),
        "`json` (one object per line) or `text` for a terminal.",
    ),
    Spec(
        "MAX_BODY_BYTES",
        20 * 1024 * 1024,
        _int_between(1024, 512 * 1024 * 1024),
        "Largest request body accepted; larger ones get 413 before they are read.",
    ),
    Spec(
        "MAX_BATCH_RECORDS",
        5000,
        _int_between(1, 100_000),
        "Most records one push may carry; more gets 400.",
    ),
    Spec(
        "VENDOR_TOKEN_LIFETIME",
        300,
        _int_between(30, 300),
        "Seconds a vendor access token is valid (SMART Backend Services: at most 300).",
    ),
    Spec(
        "PAIRING_CODE_TTL",
        86400,
        _int_between(60, 30 * 86400),
        "Seconds a pairing code can be claimed after the clinician creates it.",
    ),
    Spec(
        "PAIRING_MAX_ATTEMPTS",
        10,
        _int_between(1, 1000),
        "Failed claims a vendor may make per hour before further claims get 429.",
    ),
    Spec(
        "JWKS_FETCH_ALLOWED_HOSTS",
        (),
        _str_list,
        "Hosts from which vendor JWKS URLs may be fetched (comma-separated). Empty: none.",
    ),
    Spec(
        "ALLOW_INSECURE_LOOPBACK",
        False,
        _to_bool,
        "Development only: accept plain-HTTP EHR and JWKS URLs on 127.0.0.1/localhost.",
    ),
    Spec(
        "WORKER_EMBEDDED", False, _to_bool, "Run the delivery worker as a thread inside `fhir-bridge serve`."
    ),
    Spec("WORKER_BATCH_SIZE", 100, _int_between(1, 5000), "Outbox items one worker claims at once."),
    Spec(
        "WORKER_BACKFILL_BATCH_SIZE",
        500,
        _int_between(1, 5000),
        "Outbox items of backfill (pushed with `mode=backfill`) claimed at once: one large transaction.",
    ),
    Spec(
        "WORKER_POLL_SECONDS",
        1.0,
        _float_between(0.05, 60.0),
        "How long an idle worker sleeps before looking for work again.",
    ),
    Spec(
        "WORKER_MAX_ATTEMPTS",
        12,
        _int_between(1, 1000),
        "Delivery attempts before an item is dead-lettered.",
    ),
    Spec(
        "WORKER_LEASE_SECONDS",
        300,
        _int_between(1, 86400),
        "How long a worker holds claimed outbox items; a worker that dies releases them when it ends. "
        "Keep it well above HTTP_TIMEOUT_SECONDS.",
    ),
    Spec(
        "WORKER_RETRY_BASE_SECONDS",
        5.0,
        _float_between(0.01, 3600.0),
        "First pause before a failed delivery is retried; it doubles with each attempt (with jitter).",
    ),
    Spec(
        "WORKER_RETRY_MAX_SECONDS",
        3600.0,
        _float_between(0.1, 86400.0),
        "Longest pause between delivery attempts (and longest Retry-After honoured).",
    ),
    Spec(
        "WORKER_THREADS",
        2,
        _int_between(1, 32),
        "Delivery loops per worker process (one claims while another waits for the EHR).",
    ),
    Spec(
        "SCHEDULER_TICK_SECONDS",
        300,
        _int_between(1, 86400),
        "How often scheduled jobs (key rotation, retention purge, absence-of-data rules) run; "
        "exactly one `fhir-bridge worker` runs each job once per tick.",
    ),
    Spec(
        "KEY_ROTATION_DAYS",
        90,
        _int_between(0, 3650),
        "Age at which the scheduler rotates the signing key (and removes retired keys). 0: only by hand.",
    ),
    Spec(
        "RETENTION_DELIVERED_DAYS",
        30,
        _int_between(0, 3650),
        "Days delivered outbox items (their bodies hold PHI) are kept after delivery. 0: kept.",
    ),
    Spec(
        "RETENTION_DEAD_DAYS",
        90,
        _int_between(0, 3650),
        "Days dead-lettered outbox items are kept (unless an alert points to them). 0: kept.",
    ),
    Spec(
        "HTTP_TIMEOUT_SECONDS",
        30.0,
        _float_between(1.0, 600.0),
        "Timeout of each HTTP request to an EHR.",
    ),
    Spec(
        "ITEM_TEXT_FILE",
        "",
        _optional_path,
        "YAML file of licensed questionnaire item text (e.g. D-WAI, shipped with neutral labels); "
        "see mappings/README.md. Empty: the shipped labels.",
    ),
    Spec(
        "RULES_DIR",
        "",
        _optional_path,
        "Folder of rule files overriding the shipped defaults (fhir_bridge/rules/defaults): `*.yaml` "
        "for every tenant, `<tenant id>/*.yaml` for one; a rule with a shipped id replaces it. "
        "Empty: the shipped rules.",
    ),
    Spec(
        "RULES_SCHEDULE_SECONDS",
        600,
        _int_between(10, 86400),
        "How often the worker evaluates schedule rules (absence of data, e.g. `disengagement`).",
    ),
    Spec(
        "FUTURE_TOLERANCE_SECONDS",
        300,
        _int_between(0, 86400),
        "How far past the moment a record arrives its timestamps may lie (phone clocks drift); "
        "later ones are rejected as in the future.",
    ),
    Spec("METRICS_ENABLED", True, _to_bool, "Serve Prometheus metrics at `/metrics`."),
    Spec("HOST", "127.0.0.1", _text, "Address `fhir-bridge serve` binds."),
    Spec(
        "TRUSTED_PROXIES",
        "127.0.0.1,::1",
        _networks,
        "Reverse proxies (IP addresses or CIDR networks, comma-separated) whose `X-Forwarded-For` and "
        "`X-Forwarded-Proto` are believed; requests from anywhere else keep their own address.",
    ),
    Spec("PORT", 8080, _int_between(1, 65535), "Port `fhir-bridge serve` binds."),
    Spec("WEB_WORKERS", 2, _int_between(1, 64), "gunicorn worker processes of `fhir-bridge serve`."),
)

_BY_NAME = {spec.name: spec for spec in SPECS}


@dataclass(frozen=True)
class Settings:
    """Validated settings. Field names are the setting names in lower case."""

    instance_path: Path
    database_url: str
    public_url: str
    secret_key: str
    data_key: str
    keys_dir: Path | None
    signing_alg: str
    key_rotation_lead_seconds: int
    key_rotation_grace_seconds: int
    log_level: str
    log_format: str
    max_body_bytes: int
    max_batch_records: int
    vendor_token_lifetime: int
    pairing_code_ttl: int
    pairing_max_attempts: int
    jwks_fetch_allowed_hosts: tuple[str, ...]
    trusted_proxies: tuple[str, ...]
    allow_insecure_loopback: bool
    worker_embedded: bool
    worker_batch_size: int
    worker_backfill_batch_size: int
    worker_poll_seconds: float
    worker_max_attempts: int
    worker_lease_seconds: int
    worker_retry_base_seconds: float
    worker_retry_max_seconds: float
    worker_threads: int
    scheduler_tick_seconds: int
    key_rotation_days: int
    retention_delivered_days: int
    retention_dead_days: int
    http_timeout_seconds: float
    item_text_file: Path | None
    rules_dir: Path | None
    rules_schedule_seconds: int
    future_tolerance_seconds: int
    metrics_enabled: bool
    host: str
    port: int
    web_workers: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def keys_path(self) -> Path:
        return self.keys_dir or self.instance_path / "keys"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.instance_path / 'fhir-bridge.db'}"

    def url(self, path: str) -> str:
        """An absolute URL on this service, for what clients are told (token audience, JWKS URL)."""
        return self.public_url + "/" + path.lstrip("/")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError([f"FHIR_BRIDGE_CONFIG: file {path} does not exist"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError([f"FHIR_BRIDGE_CONFIG: {path} is not valid TOML: {exc}"]) from None
    # Accept either top-level keys or a [fhir_bridge] table, in any case.
    table = data.get("fhir_bridge", data)
    if not isinstance(table, dict):
        raise SettingsError([f"FHIR_BRIDGE_CONFIG: {path}: [fhir_bridge] must be a table"])
    return {str(key).upper(): value for key, value in table.items()}


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Read every source, validate every setting, and report all problems at once."""
    env = os.environ if environ is None else environ
    raw: dict[str, tuple[str, Any]] = {name: ("default", spec.default) for name, spec in _BY_NAME.items()}
    problems: list[str] = []

    toml_path = config_file or env.get(ENV_PREFIX + "CONFIG")
    if toml_path:
        for name, value in _read_toml(Path(toml_path)).items():
            if name not in _BY_NAME:
                problems.append(f"{name} (in {toml_path}): unknown setting")
                continue
            raw[name] = (f"{toml_path}", value)

    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX) :]
        if name not in _BY_NAME:
            problems.append(f"{key}: unknown setting (environment variable)")
            continue
        raw[name] = ("environment", value)

    extra: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        name = key.upper()
        if name in _BY_NAME:
            raw[name] = ("override", value)
        else:
            # Flask's own keys (TESTING, ...) pass through to app.config untouched.
            extra[key] = value

    values: dict[str, Any] = {}
    for name, (source, value) in raw.items():
        spec = _BY_NAME[name]
        try:
            values[name.lower()] = spec.convert(value)
        except ValueError as exc:
            shown = "(hidden)" if spec.secret else repr(value)
            problems.append(f"{ENV_PREFIX}{name} = {shown} (from {source}): {exc}")
    if problems:
        raise SettingsError(problems)
    return Settings(**values, extra=extra)
