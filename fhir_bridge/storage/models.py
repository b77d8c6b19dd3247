"""Database tables, as typed SQLAlchemy 2.x models. Alembic migrations create them; tests check both agree.

Every timestamp is stored in UTC. Nothing here holds a token or a private key in clear text: token
columns carry Fernet ciphertext (see :mod:`fhir_bridge.crypto`) and keys live in the keys folder.
Clinical payloads exist only in the outbox (until delivered) and in the idempotency replay copy of a
push response, never in the audit log.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names, so migrations can drop what they created on every database.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a real 64-bit identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on SQLite (no time zones) and PostgreSQL alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[str]: JSON(),
    }


# What the backend-services writer asks an EHR for: every type delivery writes (the records' resources,
# the app's Device, each batch's Provenance, alerts as Flag and follow-up Task (issue 8), Consent, Goal,
# Communication and Task of the two-way relationship (issue 10)), `u` and `s` for the upserts
# (conditional update by identifier), and reads/searches of the Devices and Observations it resolves.
# A tenant row made without scopes gets this; `ehr add --scopes` narrows it.
DEFAULT_BACKEND_SCOPES = (
    "system/Observation.cu system/QuestionnaireResponse.cu system/Device.cu system/Provenance.c "
    "system/Flag.cus system/Task.cus system/Consent.cus system/Goal.cus system/Communication.cus "
    "system/Observation.rs system/Device.rs"
)


class Tenant(Base):
    """An EHR this service reads from (SMART app) and writes to (backend services)."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # The FHIR base URL, normalised; it is the `iss` an EHR launch must present.
    fhir_base_url: Mapped[str] = mapped_column(String(2048), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    # SMART App Launch registration (the clinician-facing app).
    smart_client_id: Mapped[str | None] = mapped_column(String(255))
    smart_client_auth: Mapped[str] = mapped_column(String(32), default="public")
    smart_scopes: Mapped[str] = mapped_column(Text, default="")
    scope_syntax: Mapped[str] = mapped_column(String(4), default="v2")
    # Pinned endpoints; when empty they come from discovery (and must then agree with any pin).
    authorize_url: Mapped[str | None] = mapped_column(String(2048))
    token_url: Mapped[str | None] = mapped_column(String(2048))
    issuer: Mapped[str | None] = mapped_column(String(2048))
    jwks_uri: Mapped[str | None] = mapped_column(String(2048))
    # SMART Backend Services registration (the writer).
    backend_client_id: Mapped[str | None] = mapped_column(String(255))
    backend_scopes: Mapped[str] = mapped_column(Text, default=DEFAULT_BACKEND_SCOPES)
    write_strategy: Mapped[str] = mapped_column(String(16), default="transaction")
    max_requests_per_second: Mapped[float | None] = mapped_column(Float)
    max_concurrent_requests: Mapped[int] = mapped_column(Integer, default=4)
    # Backfill (outbox priority 1) goes through its own, usually tighter, limit; NULL: the ones above.
    backfill_requests_per_second: Mapped[float | None] = mapped_column(Float)
    backfill_max_concurrent: Mapped[int | None] = mapped_column(Integer)
    frame_ancestors: Mapped[list[str]] = mapped_column(default=list)
    crisis_line: Mapped[str | None] = mapped_column(String(500))
    # CDS Hooks (issue 8): the EHR's CDS client, which signs each hook call with its key. ``iss`` it
    # presents, and its keys: inline JWKS or a JWKS URL (a ``jku`` header must equal that URL).
    cds_client_iss: Mapped[str | None] = mapped_column(String(2048))
    cds_client_jwks: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    cds_client_jwks_url: Mapped[str | None] = mapped_column(String(2048))
    # Documented per-EHR quirks (see docs/ehr-vendors.md), e.g. types that refuse If-None-Exist.
    quirks: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class VendorClient(Base):
    """An app vendor allowed to push data: authenticates with private_key_jwt against our token endpoint."""

    __tablename__ = "vendor_clients"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    client_id: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    jwks: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    jwks_url: Mapped[str | None] = mapped_column(String(2048))
    scopes: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default="active")
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column()


class UsedAssertion(Base):
    """Client-assertion `jti`s seen, kept until the assertion could no longer be valid (replay defence)."""

    __tablename__ = "used_assertions"

    issuer: Mapped[str] = mapped_column(String(128), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Enrollment(Base):
    """Binds a patient in one EHR to one app user of one vendor, from pairing code to end."""

    __tablename__ = "enrollments"
    __table_args__ = (
        # At most one live binding per app user of a vendor.
        Index(
            "uq_enrollments_live_app_user",
            "vendor_id",
            "app_user_id",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
        Index("ix_enrollments_patient", "tenant_id", "patient_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    patient_id: Mapped[str] = mapped_column(String(64))
    vendor_id: Mapped[int] = mapped_column(ForeignKey("vendor_clients.id"))
    app_user_id: Mapped[str | None] = mapped_column(String(128))
    # pending (code issued) -> active (claimed) -> ended; pending -> expired.
    status: Mapped[str] = mapped_column(String(16), default="pending")
    code_hash: Mapped[str | None] = mapped_column(String(128), unique=True)
    code_expires_at: Mapped[datetime | None] = mapped_column()
    created_by: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    ended_by: Mapped[str | None] = mapped_column(String(255))
    consent_identifier: Mapped[str | None] = mapped_column(String(128))

    tenant: Mapped[Tenant] = relationship()
    vendor: Mapped[VendorClient] = relationship()


class PairingAttempt(Base):
    """Failed pairing claims, counted per vendor to rate-limit guessing."""

    __tablename__ = "pairing_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    vendor_id: Mapped[int] = mapped_column(ForeignKey("vendor_clients.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class Submission(Base):
    """One push request from a vendor, with its counts and (for Idempotency-Key replays) its response."""

    __tablename__ = "submissions"
    __table_args__ = (UniqueConstraint("vendor_id", "idempotency_key"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    vendor_id: Mapped[int] = mapped_column(ForeignKey("vendor_clients.id"))
    kind: Mapped[str] = mapped_column(String(16), default="native")
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    record_count: Mapped[int] = mapped_column(Integer, default=0)
    accepted_count: Mapped[int] = mapped_column(Integer, default=0)
    duplicate_count: Mapped[int] = mapped_column(Integer, default=0)
    rejected_count: Mapped[int] = mapped_column(Integer, default=0)
    response_status: Mapped[int | None] = mapped_column(SmallInteger)
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary)
    # The first response's own headers (Location, X-Submission-Id), replayed with its body.
    response_headers: Mapped[dict[str, str] | None] = mapped_column(JSON)


class Record(Base):
    """One accepted vendor record; its FHIR resources wait in the outbox."""

    __tablename__ = "records"
    __table_args__ = (UniqueConstraint("vendor_id", "vendor_record_id"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    submission_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("submissions.id"), index=True)
    vendor_id: Mapped[int] = mapped_column(ForeignKey("vendor_clients.id"))
    vendor_record_id: Mapped[str] = mapped_column(String(200))
    measure: Mapped[str] = mapped_column(String(100))
    enrollment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("enrollments.id"), index=True)
    # queued -> delivered | dead (a record is delivered when all of its resources are).
    status: Mapped[str] = mapped_column(String(16), default="queued")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class OutboxItem(Base):
    """One FHIR resource waiting to be written to an EHR (transactional outbox)."""

    __tablename__ = "outbox"
    __table_args__ = (
        # The deterministic identifier makes the same resource impossible to queue twice per EHR.
        UniqueConstraint("tenant_id", "resource_type", "ident_system", "ident_value"),
        Index("ix_outbox_claim", "status", "priority", "next_attempt_at", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    record_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("records.id"), index=True)
    # Resources that must travel in one transaction share a group (e.g. a QuestionnaireResponse and
    # the score Observations derived from it).
    group_key: Mapped[str] = mapped_column(String(64), index=True)
    resource_type: Mapped[str] = mapped_column(String(64))
    ident_system: Mapped[str] = mapped_column(String(255))
    ident_value: Mapped[str] = mapped_column(String(128))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    # create: conditional create on the identifier (written once, never changed). upsert: conditional
    # update on the identifier (``PUT Type?identifier=...``): for resources the bridge changes later
    # (Consent, Goal, Task), whose row is rewritten and requeued by :func:`outbox.requeue`.
    method: Mapped[str] = mapped_column(String(16), default="create", server_default="create")
    # 0 = live data, 1 = backfill; lower goes first.
    priority: Mapped[int] = mapped_column(SmallInteger, default=0)
    # pending -> delivered | dead
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column()
    leased_by: Mapped[str | None] = mapped_column(String(128))
    ehr_id: Mapped[str | None] = mapped_column(String(128))
    ehr_version: Mapped[str | None] = mapped_column(String(64))
    last_status: Mapped[int | None] = mapped_column(SmallInteger)
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()


class DeliveryAttempt(Base):
    """One try at writing an outbox item, kept for hospital IT to see why something is late."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    outbox_id: Mapped[int] = mapped_column(ForeignKey("outbox.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    worker: Mapped[str] = mapped_column(String(128))
    http_status: Mapped[int | None] = mapped_column(SmallInteger)
    error: Mapped[str | None] = mapped_column(String(500))
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)


class Alert(Base):
    """A rule firing for a patient; open until acknowledged or resolved, at most one open per rule."""

    __tablename__ = "alerts"
    __table_args__ = (
        Index(
            "uq_alerts_open_episode",
            "tenant_id",
            "patient_id",
            "rule_id",
            unique=True,
            sqlite_where=text("status = 'open'"),
            postgresql_where=text("status = 'open'"),
        ),
        Index("ix_alerts_episode", "tenant_id", "patient_id", "rule_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    patient_id: Mapped[str] = mapped_column(String(64))
    enrollment_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("enrollments.id"))
    rule_id: Mapped[str] = mapped_column(String(100))
    priority: Mapped[str] = mapped_column(String(16), default="routine")
    status: Mapped[str] = mapped_column(String(16), default="open")
    reason: Mapped[str] = mapped_column(Text)
    fired_at: Mapped[datetime] = mapped_column(default=utcnow)
    acknowledged_at: Mapped[datetime | None] = mapped_column()
    acknowledged_by: Mapped[str | None] = mapped_column(String(255))
    flag_outbox_id: Mapped[int | None] = mapped_column(ForeignKey("outbox.id"))
    task_outbox_id: Mapped[int | None] = mapped_column(ForeignKey("outbox.id"))
    # Rules (issue 8): the measurement time the condition became true at (as-of time of the firing
    # evaluation), when an evaluation last found it false (the episode is over; a later firing is a
    # new alert once this one is no longer open), and the identifier value of its Flag/Task.
    trigger_at: Mapped[datetime | None] = mapped_column()
    episode_ended_at: Mapped[datetime | None] = mapped_column()
    ident_value: Mapped[str | None] = mapped_column(String(64))


class Measurement(Base):
    """One number an accepted record carried (``MapResult.measurements``): the rules' ledger.

    Written in the transaction that accepts the record; a record's (code) appears once, so replays
    add nothing. No free text: codes are catalogue measurement codes, values are numbers.
    """

    __tablename__ = "measurements"
    __table_args__ = (
        UniqueConstraint("record_id", "code"),
        Index("ix_measurements_patient", "tenant_id", "patient_id", "at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    patient_id: Mapped[str] = mapped_column(String(64))
    enrollment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("enrollments.id"))
    record_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("records.id"))
    code: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column()
    # The record's own UTC offset, so reasons can name the patient's local date.
    utc_offset_min: Mapped[int] = mapped_column(SmallInteger, default=0)
    value: Mapped[float] = mapped_column(Float)


class AuditEvent(Base):
    """Append-only audit trail (database triggers refuse UPDATE and DELETE), hash-chained.

    Rows name actors and targets by reference; they never carry clinical values or free text.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor_type: Mapped[str] = mapped_column(String(32))
    actor_id: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(255))
    outcome: Mapped[str] = mapped_column(String(16), default="success")
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


# -- the two-way relationship (issue 10): goals, tasks, messages, webhooks --------------------------


class Goal(Base):
    """A goal the clinician agreed with the patient; written to the EHR as a FHIR ``Goal`` (upsert)."""

    __tablename__ = "goals"
    __table_args__ = (Index("ix_goals_patient", "tenant_id", "patient_id"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    patient_id: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text)
    # Optional measurable target: a measure key of fhir_bridge.relationship.measures, a comparator
    # and a value, by a due date.
    measure: Mapped[str | None] = mapped_column(String(32))
    comparator: Mapped[str | None] = mapped_column(String(2))
    target_value: Mapped[float | None] = mapped_column(Float)
    due_date: Mapped[date | None] = mapped_column(Date)
    # FHIR Goal.lifecycleStatus: proposed | active | on-hold | completed | cancelled ...
    lifecycle_status: Mapped[str] = mapped_column(String(16), default="active")
    expressed_by: Mapped[str | None] = mapped_column(String(255))
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # The latest accepted value of the measure (see relationship.progress), and when it was taken.
    latest_value: Mapped[float | None] = mapped_column(Float)
    latest_at: Mapped[datetime | None] = mapped_column()
    ident_value: Mapped[str] = mapped_column(String(64), unique=True)


class CareTask(Base):
    """Something the clinician asks the patient to do between visits; a FHIR ``Task`` in the EHR."""

    __tablename__ = "care_tasks"
    __table_args__ = (Index("ix_care_tasks_patient", "tenant_id", "patient_id", "status"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    patient_id: Mapped[str] = mapped_column(String(64))
    # questionnaire | module | check-in
    kind: Mapped[str] = mapped_column(String(16))
    # For questionnaires and check-ins: the catalogue measure whose data completes the task.
    measure: Mapped[str | None] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(200))
    due_date: Mapped[date | None] = mapped_column(Date)
    # requested -> completed | cancelled
    status: Mapped[str] = mapped_column(String(16), default="requested")
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    completed_at: Mapped[datetime | None] = mapped_column()
    ident_value: Mapped[str] = mapped_column(String(64), unique=True)


class Message(Base):
    """A short message between the care team and the patient; a FHIR ``Communication`` in the EHR."""

    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_patient", "tenant_id", "patient_id"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    patient_id: Mapped[str] = mapped_column(String(64))
    # The enrollment a patient's message came through (None for the clinician's).
    enrollment_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("enrollments.id"))
    # to-patient | to-clinician
    direction: Mapped[str] = mapped_column(String(16))
    sender: Mapped[str] = mapped_column(String(255))
    text: Mapped[str] = mapped_column(Text)
    in_response_to: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("messages.id"))
    sent_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    read_at: Mapped[datetime | None] = mapped_column()
    # A vendor's own id for a message it posts (a repeated POST is the same message).
    client_message_id: Mapped[str | None] = mapped_column(String(128))
    ident_value: Mapped[str] = mapped_column(String(64), unique=True)


class WebhookEvent(Base):
    """An event for a vendor's webhook, delivered by the worker at least once (``event_id`` dedupes)."""

    __tablename__ = "webhook_events"
    __table_args__ = (Index("ix_webhook_events_due", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True, default=uuid.uuid4)
    vendor_id: Mapped[int] = mapped_column(ForeignKey("vendor_clients.id"))
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column()
    # pending -> delivered | dead
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status: Mapped[int | None] = mapped_column(SmallInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()


class SchedulerLease(Base):
    """Which worker runs a periodic job right now (a portable stand-in for advisory locks on SQLite)."""

    __tablename__ = "scheduler_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    lease_until: Mapped[datetime] = mapped_column()
    last_run_at: Mapped[datetime | None] = mapped_column()


# -- SMART app (issue 6): pending authorizations and completed launches ------------------------


class SmartFlow(Base):
    """A pending authorization request, created by a launch and consumed exactly once by the callback.

    The ``state`` value itself is never stored, only its SHA-256, so a database read cannot be turned
    into a forged callback. The row binds the state to the browser session that started the flow and
    to everything the callback must reuse (tenant, endpoints, redirect URI, PKCE verifier, nonce).
    """

    __tablename__ = "smart_flows"

    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    browser_hash: Mapped[str] = mapped_column(String(64), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # ehr | standalone
    kind: Mapped[str] = mapped_column(String(16))
    launch_param: Mapped[str | None] = mapped_column(String(2048))
    redirect_uri: Mapped[str] = mapped_column(String(2048))
    authorize_url: Mapped[str] = mapped_column(String(2048))
    token_url: Mapped[str] = mapped_column(String(2048))
    issuer: Mapped[str | None] = mapped_column(String(2048))
    jwks_uri: Mapped[str | None] = mapped_column(String(2048))
    scope: Mapped[str] = mapped_column(Text)
    verifier_enc: Mapped[bytes] = mapped_column(LargeBinary)
    nonce: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class SmartLaunch(Base):
    """A completed launch: the context it grants and the clinician's tokens, encrypted at rest.

    The browser knows only the launch ``id`` (in the dashboard's URL) and its session cookie; every
    dashboard request must present both, so two launches in two tabs never share a patient.
    """

    __tablename__ = "smart_launches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    browser_hash: Mapped[str] = mapped_column(String(64), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    patient_id: Mapped[str] = mapped_column(String(64))
    encounter_id: Mapped[str | None] = mapped_column(String(64))
    # The clinician: (tenant issuer, sub) when an id_token was validated, else the token's fhirUser.
    user_key: Mapped[str | None] = mapped_column(String(512))
    fhir_user: Mapped[str | None] = mapped_column(String(255))
    scope: Mapped[str] = mapped_column(Text)
    token_url: Mapped[str] = mapped_column(String(2048))
    access_token_enc: Mapped[bytes] = mapped_column(LargeBinary)
    refresh_token_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    access_expires_at: Mapped[datetime] = mapped_column()
    need_patient_banner: Mapped[bool] = mapped_column(default=True)
    # active -> needs-relaunch (refresh failed) | ended
    status: Mapped[str] = mapped_column(String(16), default="active")
    # Bumped on every refresh, so a process that lost the refresh race can tell.
    token_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


__all__ = [
    "Alert",
    "AuditEvent",
    "Base",
    "CareTask",
    "DeliveryAttempt",
    "Enrollment",
    "Goal",
    "Measurement",
    "Message",
    "OutboxItem",
    "PairingAttempt",
    "Record",
    "SchedulerLease",
    "SmartFlow",
    "SmartLaunch",
    "Submission",
    "Tenant",
    "UsedAssertion",
    "VendorClient",
    "WebhookEvent",
    "utcnow",
]
