"""App vendors: registration by hospital IT, and the database side of vendor authentication.

``auth.vendor_tokens`` defines what the token endpoint needs (a client store, a replay store) and
this module implements both on SQLAlchemy. Registration validates keys the way the token endpoint
will use them, so a vendor that registers successfully can authenticate, and a broken JWKS is
refused at the command line rather than discovered at 3 a.m.
"""

from __future__ import annotations

import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import ECKey, KeySet, RSAKey
from sqlalchemy import Table, bindparam, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, make_transient_to_detached

from auth.jwks_fetch import JwksFetchError, check_jwks_url, validate_jwks
from auth.vendor_tokens import DEFAULT_SCOPES, RegisteredClient, parse_scopes
from fhir_bridge import audit
from fhir_bridge.errors import BadRequest, Conflict, NotFound
from fhir_bridge.storage import Database
from fhir_bridge.storage.database import READ_ONLY
from fhir_bridge.storage.models import UsedAssertion, VendorClient

CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,127}")
MIN_RSA_BITS = 2048


class DbClientStore:
    """Vendors as the token endpoint sees them; read fresh on every token request."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def find(self, client_id: str) -> RegisteredClient | None:
        if not CLIENT_ID.fullmatch(client_id):
            return None
        with self.db.sessions() as session:
            vendor = session.execute(
                select(VendorClient).where(VendorClient.client_id == client_id)
            ).scalar_one_or_none()
        if vendor is None:
            return None
        return RegisteredClient(
            client_id=vendor.client_id,
            jwks=vendor.jwks,
            jwks_url=vendor.jwks_url,
            scopes=tuple(vendor.scopes.split()),
            active=vendor.status == "active",
        )


class DbReplayStore:
    """Assertion ``jti``s per issuer, kept until the assertion could no longer verify."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def remember(self, issuer: str, jti: str, expires_at: datetime) -> bool:
        insert = postgresql.insert if self.db.dialect == "postgresql" else sqlite.insert
        now = datetime.now(UTC)
        with self.db.transaction() as session:
            session.execute(
                delete(UsedAssertion).where(UsedAssertion.issuer == issuer, UsedAssertion.expires_at < now)
            )
            inserted = session.execute(
                insert(UsedAssertion)
                .values(issuer=issuer, jti=jti, expires_at=expires_at)
                .on_conflict_do_nothing(index_elements=["issuer", "jti"])
                .returning(UsedAssertion.jti)
            ).first()
            return inserted is not None


@dataclass(frozen=True)
class VendorView:
    client_id: str
    name: str
    status: str
    scopes: tuple[str, ...]
    keys: str
    created_at: datetime
    webhook_url: str | None = None


def check_jwks(data: Any) -> dict[str, Any]:
    """An inline JWKS usable for RS384/ES384 assertions; ``BadRequest`` naming the first problem."""
    try:
        jwks = validate_jwks(data)
    except JwksFetchError as exc:
        raise BadRequest(str(exc), code="invalid-jwks") from None
    for index, key_data in enumerate(jwks["keys"]):
        try:
            with warnings.catch_warnings():
                # joserfc warns about short RSA keys; we refuse them below with a message instead.
                warnings.simplefilter("ignore", SecurityWarning)
                key = KeySet.import_key_set({"keys": [key_data]}).keys[0]
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise BadRequest(
                f"keys[{index}] is not a valid JWK ({type(exc).__name__})", code="invalid-jwks"
            ) from None
        if isinstance(key, RSAKey):
            bits = int(key.raw_value.key_size)
            if bits < MIN_RSA_BITS:
                raise BadRequest(
                    f"keys[{index}]: RSA keys need at least {MIN_RSA_BITS} bits", code="invalid-jwks"
                )
        elif isinstance(key, ECKey) and key_data.get("crv") != "P-384":
            raise BadRequest(f"keys[{index}]: EC keys must be on P-384 (ES384)", code="invalid-jwks")
        alg = key_data.get("alg")
        if alg is not None and alg not in ("RS384", "ES384"):
            raise BadRequest(f"keys[{index}]: alg {alg!r} is not RS384 or ES384", code="invalid-jwks")
    return jwks


def register(
    db: Database,
    *,
    client_id: str,
    name: str,
    jwks: dict[str, Any] | None,
    jwks_url: str | None,
    scopes: Sequence[str] | str | None,
    allowed_hosts: Sequence[str],
    allow_insecure_loopback: bool,
    actor: str,
) -> VendorView:
    if not CLIENT_ID.fullmatch(client_id):
        raise BadRequest(
            "the client id must be 3-128 characters of letters, digits, '.', '_' or '-'",
            code="invalid-client-id",
        )
    if (jwks is None) == (jwks_url is None):
        raise BadRequest("give exactly one of a JWKS (inline) or a JWKS URL", code="invalid-jwks")
    if jwks is not None:
        jwks = check_jwks(jwks)
    if jwks_url is not None:
        try:
            check_jwks_url(jwks_url, allowed_hosts, allow_insecure_loopback=allow_insecure_loopback)
        except ValueError as exc:
            raise BadRequest(str(exc), code="invalid-jwks-url") from None
    try:
        granted = parse_scopes(scopes if scopes is not None else DEFAULT_SCOPES)
    except ValueError as exc:
        raise BadRequest(str(exc), code="invalid-scope") from None
    if not granted:
        raise BadRequest("a vendor needs at least one scope", code="invalid-scope")
    if not name.strip() or len(name) > 200:
        raise BadRequest("the vendor name must be 1-200 characters", code="invalid-name")
    with db.transaction() as session:
        exists = session.execute(select(VendorClient.id).where(VendorClient.client_id == client_id)).scalar()
        if exists is not None:
            raise Conflict(
                f"a vendor with client id {client_id!r} is already registered", code="vendor-exists"
            )
        vendor = VendorClient(
            client_id=client_id, name=name.strip(), jwks=jwks, jwks_url=jwks_url, scopes=" ".join(granted)
        )
        session.add(vendor)
        session.flush()
        audit.record(
            session,
            actor_type="operator",
            actor_id=actor,
            action="vendor.register",
            target=f"vendor/{client_id}",
            detail={"scopes": " ".join(granted)[:200], "keys": "url" if jwks_url else "inline"},
        )
        return _view(vendor)


def _view(vendor: VendorClient) -> VendorView:
    return VendorView(
        client_id=vendor.client_id,
        name=vendor.name,
        status=vendor.status,
        scopes=tuple(vendor.scopes.split()),
        keys=vendor.jwks_url or f"inline ({len((vendor.jwks or {}).get('keys', []))} key(s))",
        created_at=vendor.created_at,
        webhook_url=vendor.webhook_url,
    )


def list_all(db: Database) -> list[VendorView]:
    with db.sessions() as session:
        vendors = session.execute(select(VendorClient).order_by(VendorClient.client_id)).scalars().all()
        return [_view(v) for v in vendors]


def set_scopes(db: Database, *, client_id: str, scopes: Sequence[str] | str | None, actor: str) -> VendorView:
    """Replace what a vendor may be granted (None: every scope there is, e.g. ones a new release adds).

    Tokens already issued keep their scope until they expire (minutes); new tokens get the new set.
    """
    try:
        granted = parse_scopes(scopes if scopes is not None else DEFAULT_SCOPES)
    except ValueError as exc:
        raise BadRequest(str(exc), code="invalid-scope") from None
    if not granted:
        raise BadRequest("a vendor needs at least one scope", code="invalid-scope")
    with db.transaction() as session:
        vendor = session.execute(
            select(VendorClient).where(VendorClient.client_id == client_id)
        ).scalar_one_or_none()
        if vendor is None:
            raise NotFound(f"no vendor with client id {client_id!r}", code="vendor-not-found")
        before = vendor.scopes
        vendor.scopes = " ".join(granted)
        if vendor.scopes != before:
            audit.record(
                session,
                actor_type="operator",
                actor_id=actor,
                action="vendor.scopes",
                target=f"vendor/{client_id}",
                detail={"scopes": vendor.scopes[:200]},
            )
        return _view(vendor)


def disable(db: Database, *, client_id: str, actor: str) -> VendorView:
    """Stop a vendor at once: its tokens fail on their next use, and it cannot get new ones."""
    with db.transaction() as session:
        vendor = session.execute(
            select(VendorClient).where(VendorClient.client_id == client_id)
        ).scalar_one_or_none()
        if vendor is None:
            raise NotFound(f"no vendor with client id {client_id!r}", code="vendor-not-found")
        if vendor.status != "disabled":
            vendor.status = "disabled"
            vendor.disabled_at = datetime.now(UTC)
            audit.record(
                session,
                actor_type="operator",
                actor_id=actor,
                action="vendor.disable",
                target=f"vendor/{client_id}",
            )
        return _view(vendor)


# Built once: the whole vendor row by client id, as Core (no ORM unit of work on the request path).
_VENDOR_TABLE: Table = VendorClient.__table__  # type: ignore[assignment]
_VENDOR_ROW = select(_VENDOR_TABLE).where(_VENDOR_TABLE.c.client_id == bindparam("client_id"))


class ActiveVendors:
    """The vendor behind a token, read on every request, without building an ORM object each time.

    Every call reads the vendor's whole row (one indexed Core query): revocation (``status``), a
    deleted vendor and any other change take effect on the very next request. Only the ORM object
    built from the row is reused, and only while the row is exactly what it was built from. The
    object is detached (as the per-request session used to leave it) and must be treated as read
    only: the views use it for its id and client id, and never attach it to a session.

    Profiling a single-record push showed the per-request ORM load at a fifth of its CPU.
    """

    # How long :meth:`snapshot` may hand out a vendor without reading its row (see there).
    SNAPSHOT_SECONDS = 30.0

    def __init__(self, db: Database, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.clock = clock
        self._lock = threading.Lock()
        self._built: dict[str, tuple[tuple[Any, ...], VendorClient]] = {}
        self._read_at: dict[str, float] = {}

    def snapshot(self, client_id: str) -> VendorClient | None:
        """The vendor as read at most ``SNAPSHOT_SECONDS`` ago: for a caller that checks its status
        itself in its own transaction (:func:`require_active`), so one push is one transaction.

        Only an active vendor is handed out unread; anything else is read again at once.
        """
        built = self._built.get(client_id)
        read_at = self._read_at.get(client_id)
        if (
            built is not None
            and read_at is not None
            and self.clock() - read_at < self.SNAPSHOT_SECONDS
            and built[1].status == "active"
        ):
            return built[1]
        return self.get(client_id)

    def get(self, client_id: str) -> VendorClient | None:
        if not CLIENT_ID.fullmatch(client_id):
            return None
        # read_only: on SQLite no BEGIN IMMEDIATE (the write lock) for one SELECT.
        with self.db.engine.connect().execution_options(**{READ_ONLY: True}) as connection:
            row = connection.execute(_VENDOR_ROW, {"client_id": client_id}).first()
        if row is None:
            with self._lock:
                self._built.pop(client_id, None)
            return None
        values = tuple(row)
        self._read_at[client_id] = self.clock()
        built = self._built.get(client_id)
        if built is None or built[0] != values:
            vendor = VendorClient(**row._asdict())
            make_transient_to_detached(vendor)
            built = (values, vendor)
            with self._lock:
                if len(self._built) >= 10_000:
                    self._built.clear()
                    self._read_at.clear()
                    self._read_at[client_id] = self.clock()
                self._built[client_id] = built
        vendor = built[1]
        return vendor if vendor.status == "active" else None


_VENDOR_STATUS = select(_VENDOR_TABLE.c.status).where(_VENDOR_TABLE.c.id == bindparam("id"))


def is_active(session: Session, vendor_id: int) -> bool:
    """Whether the vendor is still enabled, read in the caller's transaction (one Core query)."""
    status = session.connection().execute(_VENDOR_STATUS, {"id": vendor_id}).scalar()
    return status == "active"


def active_vendor(session: Session, client_id: str) -> VendorClient | None:
    """The vendor behind a token, if it is still enabled (checked on every request)."""
    vendor = session.execute(
        select(VendorClient).where(VendorClient.client_id == client_id)
    ).scalar_one_or_none()
    return vendor if vendor is not None and vendor.status == "active" else None
