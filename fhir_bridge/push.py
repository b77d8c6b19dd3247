"""Native push: a batch of vendor records in, one result per record out, accepted ones durably queued.

For each record, in order: the envelope is validated (marshmallow), the app user must have an
active enrollment with this vendor, a record id the vendor sent before is a duplicate (nothing new
is written), and the measure's mapping turns ``data`` into FHIR resources or rejections naming the
field. The submission row, the accepted records and their outbox items are written in one
transaction: either the vendor's ``accepted`` is true in the database or the request fails as a
whole and nothing is.

``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header): the first response is stored on the
submission; the same key with the same body replays it, with another body is a 409, and while the
first request is still running a second one gets 409 (PostgreSQL: a transaction-scoped try-lock
on the key; SQLite serialises writers, so the second simply waits and then replays).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from marshmallow import RAISE, Schema, ValidationError, fields, validate
from sqlalchemy import ARRAY, String, Table, any_, bindparam, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fhir_bridge.catalog import catalog_for
from fhir_bridge.enrollment import APP_USER_ID, active_by_app_user
from fhir_bridge.errors import BadRequest, Conflict
from fhir_bridge.relationship import tasks
from fhir_bridge.rules.engine import on_accepted
from fhir_bridge.settings import Settings
from fhir_bridge.storage import Database
from fhir_bridge.storage.bulk import BulkInsert
from fhir_bridge.storage.models import Enrollment, OutboxItem, Record, Submission, VendorClient
from mappings import Catalog, MappedResource, MappingContext, Measurement
from mappings.identity import device_full_url

RECORD_ID = r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}"
IDEMPOTENCY_KEY_MAX = 255
RECORDS: Table = Record.__table__  # type: ignore[assignment]
SUBMISSIONS: Table = Submission.__table__  # type: ignore[assignment]
_INSERT_SUBMISSION = insert(SUBMISSIONS)
OUTBOX: Table = OutboxItem.__table__  # type: ignore[assignment]
NOT_ENROLLED = (
    "This app user has no active enrollment with your app: claim a pairing code first "
    "(POST /api/v1/enrollments/claim)."
)


class RecordSchema(Schema):
    """The native record envelope; ``data`` is checked by the measure's mapping spec."""

    class Meta:
        unknown = RAISE

    record_id = fields.String(
        required=True,
        validate=validate.Regexp(
            rf"(?:{RECORD_ID})\Z",
            error="must be 1-200 characters: letters, digits and . _ : @ / - (no spaces)",
        ),
    )
    app_user_id = fields.String(
        required=True,
        validate=validate.Regexp(
            rf"(?:{APP_USER_ID.pattern})\Z", error="must be 1-128 ASCII letters, digits and . _ : @ -"
        ),
    )
    measure = fields.String(required=True, validate=validate.Length(min=1, max=100))
    data = fields.Dict(keys=fields.String(), required=True)


_RECORD_SCHEMA = RecordSchema()
_ENVELOPE_KEYS = frozenset({"record_id", "app_user_id", "measure", "data"})
_RECORD_ID_FULL = re.compile(rf"(?:{RECORD_ID})\Z")
_APP_USER_ID_FULL = re.compile(rf"(?:{APP_USER_ID.pattern})\Z")


def load_envelope(raw: dict[str, Any]) -> dict[str, Any]:
    """The envelope as :class:`RecordSchema` loads it, without marshmallow for the valid case.

    Per record only the four values are checked (the same rules as the schema); anything that does
    not pass goes through the schema itself, so error messages stay exactly the schema's. Profiling
    the push path showed the envelope schema at a fifth of its CPU.
    """
    if raw.keys() == _ENVELOPE_KEYS:
        record_id, app_user_id = raw["record_id"], raw["app_user_id"]
        measure, data = raw["measure"], raw["data"]
        if (
            type(record_id) is str
            and type(app_user_id) is str
            and type(measure) is str
            and type(data) is dict
            and 1 <= len(measure) <= 100
            and _RECORD_ID_FULL.match(record_id)
            and _APP_USER_ID_FULL.match(app_user_id)
        ):
            return {
                "record_id": record_id,
                "app_user_id": app_user_id,
                "measure": measure,
                "data": dict(data),
            }
    loaded: dict[str, Any] = _RECORD_SCHEMA.load(raw)
    return loaded


@dataclass(slots=True)
class Problem:
    code: str
    field: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"code": self.code, "field": self.field, "message": self.message}


@dataclass(slots=True)
class Result:
    index: int
    record_id: str | None
    status: str = "rejected"
    id: str | None = None
    errors: list[Problem] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "record_id": self.record_id, "status": self.status}
        if self.id is not None:
            out["id"] = self.id
        if self.errors:
            out["errors"] = [p.as_json() for p in self.errors]
        return out


@dataclass(slots=True)
class Prepared:
    """A record that passed every check and is ready to be written."""

    result: Result
    record_id: str
    measure: str
    enrollment: Enrollment
    resources: Sequence[MappedResource]
    # The numbers the record carried (the rules' ledger, fhir_bridge.rules).
    measurements: Sequence[Measurement] = ()
    # The Record row's id (``result.id`` as a UUID); :meth:`record_pk` fills it when a caller did not.
    pk: uuid.UUID | None = None

    def record_pk(self) -> uuid.UUID:
        if self.pk is None:
            self.pk = uuid.UUID(self.result.id or "")
        return self.pk


def new_ids(count: int) -> list[uuid.UUID]:
    """``count`` time-ordered (version 7, RFC 9562) UUIDs for the records of one push, in order.

    Why time-ordered: a record's id is the key of ``records`` and is indexed again in ``outbox`` and
    ``measurements``. Random (version 4) keys land on a random leaf page of each of those B-trees, so
    a 1,000-record push dirtied about a thousand pages per index, each read, changed and written to
    the WAL at commit (SQLite: the largest part of the push's database CPU). Keys that grow with time
    land on the last few pages. Layout: 48 bits of Unix milliseconds, the version, a 16-bit counter
    (the record's position in the push, split over ``rand_a`` and the top of ``rand_b``: "fixed-length
    dedicated counter", RFC 9562 section 6.2, method 1), the variant, and 58 random bits from one
    ``urandom`` call. Past 65,536 ids the counter wraps and the millisecond field moves on by one (RFC
    9562's counter-rollover handling), so a push of up to ``MAX_BATCH_RECORDS`` (at most 100,000)
    still gets ids in order. Ids expose the moment of acceptance to the millisecond, which the vendor
    is told anyway (``received_at``).
    """
    ms = time.time_ns() // 1_000_000
    fixed = 0x7 << 76 | 0b10 << 62
    raw = os.urandom(8 * count)
    mask = (1 << 58) - 1
    from_bytes = int.from_bytes
    return [
        uuid.UUID(
            int=(ms + (n >> 16)) << 80
            | fixed
            | (n & 0xFFFF) >> 4 << 64
            | (n & 0xF) << 58
            | from_bytes(raw[8 * n : 8 * n + 8]) & mask
        )
        for n in range(count)
    ]


@dataclass(frozen=True)
class Outcome:
    status: int
    body: bytes
    replayed: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def _marshmallow_problems(messages: Any, prefix: str = "") -> list[Problem]:
    problems: list[Problem] = []
    if isinstance(messages, dict):
        for key, value in messages.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                problems += _marshmallow_problems(value, path + ".")
            else:
                text_ = "; ".join(str(m) for m in value) if isinstance(value, list) else str(value)
                code = "unknown-field" if "Unknown field" in text_ else "invalid-field"
                if "Missing data" in text_:
                    code = "missing-field"
                problems.append(Problem(code, path, f"{path}: {text_}"))
    return problems


def request_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not key.isascii() or not key.isprintable():
        raise BadRequest(
            f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} printable ASCII characters.",
            code="invalid-idempotency-key",
        )
    return key


_TRY_LOCK = text("SELECT pg_try_advisory_xact_lock(:k)")


def _lock_key(session: Session, vendor: VendorClient, key: str) -> None:
    if session.get_bind().dialect.name != "postgresql":
        return  # SQLite: BEGIN IMMEDIATE already serialises every writer.
    digest = hashlib.sha256(f"{vendor.id}\x1f{key}".encode()).digest()
    lock_id = int.from_bytes(digest[:8], "big", signed=True)
    got = session.connection().execute(_TRY_LOCK, {"k": lock_id}).scalar()
    if not got:
        raise Conflict(
            "A request with this Idempotency-Key is still being processed; retry after it finishes.",
            code="idempotency-key-in-progress",
            headers={"Retry-After": "1"},
        )


def replay(session: Session, vendor: VendorClient, key: str, body_hash: str) -> Outcome | None:
    """The stored response for this key, a 409 if the key was used with another body, else None."""
    previous = session.execute(
        select(Submission).where(Submission.vendor_id == vendor.id, Submission.idempotency_key == key)
    ).scalar_one_or_none()
    if previous is None:
        return None
    if previous.request_hash != body_hash:
        raise Conflict(
            "This Idempotency-Key was already used with a different request body; "
            "use a new key for a new request.",
            code="idempotency-key-reused",
        )
    assert previous.response_status is not None and previous.response_body is not None
    return Outcome(
        previous.response_status,
        previous.response_body,
        replayed=True,
        headers=dict(previous.response_headers or {}),
    )


class Mapper:
    """The one seam to the ``mappings`` package: this deployment's catalogue, loaded once per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def catalog(self) -> Catalog:
        return catalog_for(self.settings)

    def map(
        self,
        *,
        vendor: VendorClient,
        record_id: str,
        measure: str,
        data: dict[str, Any],
        patient_id: str,
        now: datetime,
    ) -> tuple[Sequence[MappedResource], list[Problem]]:
        resources, problems, _ = self.map_measured(
            vendor=vendor, record_id=record_id, measure=measure, data=data, patient_id=patient_id, now=now
        )
        return resources, problems

    def map_measured(
        self,
        *,
        vendor: VendorClient,
        record_id: str,
        measure: str,
        data: dict[str, Any],
        patient_id: str,
        now: datetime,
    ) -> tuple[Sequence[MappedResource], list[Problem], Sequence[Measurement]]:
        """:meth:`map` plus the record's measurements (for the rules' ledger)."""
        with self.batch(vendor=vendor, now=now) as map_record:
            return map_record(record_id, measure, data, patient_id)

    @contextmanager
    def batch(self, *, vendor: VendorClient, now: datetime) -> Iterator[MapRecord]:
        """:meth:`map_measured` for the records of one push, as ``(record_id, measure, data, patient_id)``.

        What is the same for every record (the catalogue, the vendor's id and Device, the mapping
        context's notion of "now") is looked up once per push instead of once per record.
        """
        vendor_id = vendor.client_id
        device = device_full_url(vendor_id)
        with self.catalog.batch(now) as map_one:

            def map_record(
                record_id: str, measure: str, data: dict[str, Any], patient_id: str
            ) -> tuple[Sequence[MappedResource], list[Problem], Sequence[Measurement]]:
                result = map_one(
                    measure, data, MappingContext(vendor_id, record_id, f"Patient/{patient_id}", device, now)
                )
                if not result.rejections:
                    return result.resources, [], result.measurements
                problems = [Problem(r.code, _data_path(r.field), r.message) for r in result.rejections]
                return result.resources, problems, result.measurements

            yield map_record


MapRecord = Callable[
    [str, str, dict[str, Any], str], tuple[Sequence[MappedResource], list[Problem], Sequence[Measurement]]
]


def _data_path(field_name: str) -> str:
    return (
        field_name
        if field_name in ("measure", "record_id", "app_user_id")
        else f"data.{field_name}".rstrip(".")
    )


# Built once: constructing the expression per request was a visible share of a single-record push.
_EXISTING = select(Record.vendor_record_id, Record.id).where(
    Record.vendor_id == bindparam("vendor_id"),
    Record.vendor_record_id.in_(bindparam("ids", expanding=True)),
)
# PostgreSQL: the whole batch as one array parameter. An expanding IN renders and binds one
# parameter per id on every call (~4 us of client CPU per record of a 1,000-record push).
_EXISTING_ANY = select(Record.vendor_record_id, Record.id).where(
    Record.vendor_id == bindparam("vendor_id"),
    Record.vendor_record_id == any_(bindparam("ids", type_=ARRAY(String))),
)


def existing_records(
    session: Session, vendor: VendorClient, record_ids: Iterable[str]
) -> dict[str, uuid.UUID]:
    ids = list(record_ids)
    if not ids:
        return {}
    if session.get_bind().dialect.name == "postgresql":
        rows = session.execute(_EXISTING_ANY, {"vendor_id": vendor.id, "ids": ids}).all()
        return {rid: pk for rid, pk in rows}
    found: dict[str, uuid.UUID] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        rows = session.connection().execute(_EXISTING, {"vendor_id": vendor.id, "ids": chunk}).all()
        found.update({rid: pk for rid, pk in rows})
    return found


@dataclass
class Work:
    """What a push produced inside its transaction, for :func:`submit` to record."""

    status: int
    response: dict[str, Any]
    counts: dict[str, int]
    prepared: list[Prepared]
    group_key: str | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)


def submit(
    db: Database,
    *,
    vendor: VendorClient,
    kind: str,
    body: bytes,
    idempotency_key: str | None,
    work: Callable[[Session, uuid.UUID, datetime], Work],
    now: datetime | None = None,
    priority: int = 0,
    gate: Callable[[Session], None] | None = None,
) -> Outcome:
    """Run ``work`` and record its submission, records and outbox items in one transaction.

    ``priority`` goes on every outbox item: 0 live, 1 backfill (delivered after live items).
    ``gate`` runs first in the transaction and may refuse the request by raising (the API's vendor
    status check: one transaction per push instead of a read before it).

    Retries once when a concurrent push inserted one of the same record ids (or the same key) after
    we looked: the second run sees those records as duplicates (or replays the key).
    """

    def once() -> Outcome:
        return _submit_once(
            db,
            vendor=vendor,
            kind=kind,
            body=body,
            key=idempotency_key,
            work=work,
            now=now,
            priority=priority,
            gate=gate,
        )

    try:
        return once()
    except IntegrityError:
        return once()


def _submit_once(
    db: Database,
    *,
    vendor: VendorClient,
    kind: str,
    body: bytes,
    key: str | None,
    work: Callable[[Session, uuid.UUID, datetime], Work],
    now: datetime | None,
    priority: int = 0,
    gate: Callable[[Session], None] | None = None,
) -> Outcome:
    now = now or datetime.now(UTC)
    body_hash = request_hash(body)
    with db.transaction() as session:
        if gate is not None:
            gate(session)
        if key is not None:
            _lock_key(session, vendor, key)
            previous = replay(session, vendor, key, body_hash)
            if previous is not None:
                return previous
        submission_id = uuid.uuid4()
        done = work(session, submission_id, now)
        response_body = orjson.dumps(done.response)
        # Core, before anything ``work`` left pending is flushed (that may reference the submission):
        # the ORM unit of work for this one row was a tenth of a single-record push's CPU.
        session.connection().execute(
            _INSERT_SUBMISSION,
            {
                "id": submission_id,
                "vendor_id": vendor.id,
                "kind": kind,
                "received_at": now,
                "idempotency_key": key,
                "request_hash": body_hash,
                "record_count": sum(done.counts.values()),
                "accepted_count": done.counts.get("accepted", 0),
                "duplicate_count": done.counts.get("duplicate", 0),
                "rejected_count": done.counts.get("rejected", 0),
                "response_status": done.status,
                "response_body": response_body,
                "response_headers": (
                    dict(done.extra_headers) if key is not None and done.extra_headers else None
                ),
            },
        )
        write_accepted(
            session,
            vendor=vendor,
            submission_id=submission_id,
            prepared=done.prepared,
            now=now,
            group_key=done.group_key,
            priority=priority,
        )
        return Outcome(done.status, response_body, headers=done.extra_headers)


def push(
    db: Database,
    mapper: Mapper,
    *,
    vendor: VendorClient,
    records: list[Any],
    body: bytes,
    idempotency_key: str | None,
    now: datetime | None = None,
    backfill: bool = False,
    gate: Callable[[Session], None] | None = None,
) -> Outcome:
    """Process one native batch; see the module docstring. ``backfill``: history, after live data.

    ``gate``: see :func:`submit`."""

    def work(session: Session, submission_id: uuid.UUID, now: datetime) -> Work:
        results, prepared = _evaluate(session, mapper, vendor=vendor, records=records, now=now)
        counts = {s: sum(1 for r in results if r.status == s) for s in ("accepted", "duplicate", "rejected")}
        response = {
            "submission_id": str(submission_id),
            "received_at": now.isoformat().replace("+00:00", "Z"),
            "counts": counts,
            "results": [r.as_json() for r in results],
        }
        return Work(200, response, counts, prepared)

    return submit(
        db,
        vendor=vendor,
        kind="native",
        body=body,
        idempotency_key=idempotency_key,
        work=work,
        now=now,
        priority=1 if backfill else 0,
        gate=gate,
    )


def _evaluate(
    session: Session, mapper: Mapper, *, vendor: VendorClient, records: list[Any], now: datetime
) -> tuple[list[Result], list[Prepared]]:
    results: list[Result] = []
    valid: list[tuple[Result, dict[str, Any]]] = []
    for index, raw in enumerate(records):
        result = Result(index=index, record_id=raw.get("record_id") if isinstance(raw, dict) else None)
        if not isinstance(result.record_id, str):
            result.record_id = None
        results.append(result)
        if not isinstance(raw, dict):
            result.errors.append(
                Problem("invalid-record", f"records[{index}]", "each record must be a JSON object")
            )
            continue
        try:
            valid.append((result, load_envelope(raw)))
        except ValidationError as exc:
            result.errors = _marshmallow_problems(exc.messages)

    enrollments = active_by_app_user(session, vendor.id, {rec["app_user_id"] for _, rec in valid})
    patients = {e: e.patient_id for e in enrollments.values()}  # ORM attribute reads, once per user
    existing = existing_records(session, vendor, {rec["record_id"] for _, rec in valid})
    seen_in_batch: dict[str, Result] = {}
    prepared: list[Prepared] = []
    ids = iter(new_ids(len(valid)))
    with mapper.batch(vendor=vendor, now=now) as map_record:
        for result, rec in valid:
            record_id = rec["record_id"]
            if record_id in existing:
                result.status, result.id = "duplicate", str(existing[record_id])
                continue
            first = seen_in_batch.get(record_id)
            if first is not None:
                result.status, result.id = "duplicate", first.id
                continue
            enrollment = enrollments.get(rec["app_user_id"])
            if enrollment is None:
                result.errors.append(Problem("not-enrolled", "app_user_id", NOT_ENROLLED))
                continue
            resources, problems, measurements = map_record(
                record_id, rec["measure"], rec["data"], patients[enrollment]
            )
            if problems:
                result.errors = problems
                continue
            pk = next(ids)
            result.status, result.id = "accepted", str(pk)
            seen_in_batch[record_id] = result
            prepared.append(
                Prepared(result, record_id, rec["measure"], enrollment, resources, measurements, pk=pk)
            )
    return results, prepared


_RECORD_ROWS = BulkInsert(
    RECORDS,
    varying=("id", "vendor_record_id", "measure", "enrollment_id"),
    constant=("submission_id", "vendor_id", "status", "created_at", "updated_at"),
)
_OUTBOX_ROWS = BulkInsert(
    OUTBOX,
    varying=("tenant_id", "record_id", "group_key", "resource_type", "ident_system", "ident_value", "body"),
    constant=("method", "priority", "status", "attempts", "next_attempt_at", "created_at"),
)


def write_accepted(
    session: Session,
    *,
    vendor: VendorClient,
    submission_id: uuid.UUID,
    prepared: Sequence[Prepared],
    now: datetime,
    group_key: str | None = None,
    priority: int = 0,
) -> None:
    """Insert the records and their outbox items, then the rules' ledger and the relationship hooks.

    One ``executemany`` per table with the batch's constant values converted once
    (:class:`fhir_bridge.storage.bulk.BulkInsert`): no ORM objects and no per-row parameter dicts.
    """
    if not prepared:
        return
    records: list[tuple[Any, ...]] = []
    items: list[tuple[Any, ...]] = []
    dumps = orjson.dumps
    last: Enrollment | None = None
    for p in prepared:
        enrollment = p.enrollment
        if enrollment is not last:  # ORM attribute reads are not free; a batch is mostly one user's
            last, tenant_id, enrollment_id = enrollment, enrollment.tenant_id, enrollment.id
        pk = p.record_pk()
        records.append((pk, p.record_id, p.measure, enrollment_id))
        group = group_key or p.result.id
        for res in p.resources:
            items.append(
                (
                    tenant_id,
                    pk,
                    group,
                    res.resource_type,
                    res.identifier_system,
                    res.identifier_value,
                    dumps(res.resource),
                )
            )
    connection = session.connection()
    _RECORD_ROWS.execute(
        connection,
        records,
        {
            "submission_id": submission_id,
            "vendor_id": vendor.id,
            "status": "queued",
            "created_at": now,
            "updated_at": now,
        },
    )
    _OUTBOX_ROWS.execute(
        connection,
        items,
        {
            "method": "create",
            "priority": priority,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        },
    )
    # Rules (issue 8): the measurement ledger and rule evaluation, in this same transaction.
    on_accepted(session, prepared, now)
    # Issue 10: open tasks this data completes, and progress toward the patient's goals.
    tasks.on_push(session, prepared, now)


__all__ = [
    "Mapper",
    "Outcome",
    "Prepared",
    "Problem",
    "Result",
    "Work",
    "new_ids",
    "push",
    "submit",
    "write_accepted",
]
