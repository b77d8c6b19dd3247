"""The sandbox EHR's own tables (its own metadata, created with ``create_all``; not product migrations).

Two halves: the authorization server (registered apps, launch contexts, codes, tokens, seen
assertion ids) and the FHIR store (one row per resource holding its JSON, plus a search index).
Codes and tokens are kept as SHA-256 hashes, so a copy of the database file grants nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fhir_bridge.storage.models import NAMING, UTCDateTime, utcnow


class SandboxBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[str]: JSON(),
    }


# -- authorization server ------------------------------------------------------------------------


class SandboxClient(SandboxBase):
    """An app registered with the sandbox EHR, as an EHR's app-registration form would record it."""

    __tablename__ = "clients"

    client_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # "none" (public app) or "private_key_jwt" (confidential, asymmetric).
    auth_method: Mapped[str] = mapped_column(String(32))
    redirect_uris: Mapped[list[str]] = mapped_column(default=list)
    launch_url: Mapped[str | None] = mapped_column(String(2048))
    standalone_url: Mapped[str | None] = mapped_column(String(2048))
    jwks_url: Mapped[str | None] = mapped_column(String(2048))
    jwks: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The most this app may be granted; requests are narrowed to these.
    scopes: Mapped[list[str]] = mapped_column(default=list)
    # Fault injection for tests (see fhir_bridge.sandbox.faults); empty in normal use.
    faults: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LaunchContext(SandboxBase):
    """What an EHR launch hands to the app: an opaque token standing for patient, encounter and user."""

    __tablename__ = "launch_contexts"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(128))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    encounter_id: Mapped[str | None] = mapped_column(String(64))
    practitioner_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class AuthorizationCode(SandboxBase):
    """A code issued at the authorize endpoint: single use, short-lived, bound to client and redirect URI."""

    __tablename__ = "authorization_codes"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(128))
    redirect_uri: Mapped[str] = mapped_column(String(2048))
    scope: Mapped[str] = mapped_column(Text)
    code_challenge: Mapped[str] = mapped_column(String(128))
    code_challenge_method: Mapped[str] = mapped_column(String(8))
    nonce: Mapped[str | None] = mapped_column(String(255))
    practitioner_id: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    encounter_id: Mapped[str | None] = mapped_column(String(64))
    need_patient_banner: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column()


class AccessToken(SandboxBase):
    """An issued access token (and its refresh token), with the context it carries.

    Tokens of one authorization share a ``grant_id``: reusing a rotated refresh token or an
    authorization code revokes the whole family, as OAuth's security BCP asks.
    """

    __tablename__ = "tokens"
    __table_args__ = (Index("ix_tokens_grant", "grant_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    access_hash: Mapped[str] = mapped_column(String(64), unique=True)
    refresh_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    grant_id: Mapped[str] = mapped_column(String(64))
    grant_type: Mapped[str] = mapped_column(String(32))
    client_id: Mapped[str] = mapped_column(String(128))
    scope: Mapped[str] = mapped_column(Text)
    practitioner_id: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    encounter_id: Mapped[str | None] = mapped_column(String(64))
    need_patient_banner: Mapped[bool] = mapped_column(Boolean, default=False)
    issued_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    refresh_expires_at: Mapped[datetime | None] = mapped_column()
    # Set when the refresh token was used (rotation) or the family was revoked.
    refresh_used_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class SeenAssertion(SandboxBase):
    """``jti`` values of client assertions, kept until the assertion would have expired (replay defence)."""

    __tablename__ = "seen_assertions"

    client_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class ServerFault(SandboxBase):
    """A fault of the whole server (not of one app), e.g. of the discovery documents."""

    __tablename__ = "server_faults"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    faults: Mapped[dict[str, Any]] = mapped_column(default=dict)


# -- FHIR store -----------------------------------------------------------------------------------


class StoredResource(SandboxBase):
    """The current version of one FHIR resource, as JSON text."""

    __tablename__ = "resources"
    __table_args__ = (
        Index("ix_resources_type_updated", "res_type", "last_updated_us"),
        Index("ix_resources_type_sort", "res_type", "sort_lo"),
    )

    res_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    res_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    # Microseconds since the epoch (UTC): sortable and comparable the same way on every backend.
    last_updated_us: Mapped[int] = mapped_column(BigInteger)
    # Start of the type's primary date (searchparams.PRIMARY_DATE), for `_sort` without a look-up.
    sort_lo: Mapped[int | None] = mapped_column(BigInteger)
    body: Mapped[str] = mapped_column(Text)


class SearchEntry(SandboxBase):
    """One searchable value of one resource: a token, a reference, a string, a URI or a date range.

    Dates are half-open ranges ``[lo, hi)`` in microseconds since the epoch, which is what FHIR's
    date search prefixes are defined on (a day-precision date covers the whole day).
    """

    __tablename__ = "search_index"
    __table_args__ = (
        ForeignKeyConstraint(
            ["res_type", "res_id"], ["resources.res_type", "resources.res_id"], ondelete="CASCADE"
        ),
        Index("ix_search_token", "res_type", "param", "code"),
        Index("ix_search_value", "res_type", "param", "value"),
        Index("ix_search_date", "res_type", "param", "lo"),
        # Per-resource look-ups: the correlated sort key (`_sort=date`) and deleting a resource's rows.
        Index("ix_search_resource", "res_type", "res_id", "param", "lo"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    res_type: Mapped[str] = mapped_column(String(64))
    res_id: Mapped[str] = mapped_column(String(64))
    param: Mapped[str] = mapped_column(String(64))
    system: Mapped[str | None] = mapped_column(String(512))
    code: Mapped[str | None] = mapped_column(String(512))
    value: Mapped[str | None] = mapped_column(String(1024))
    lo: Mapped[int | None] = mapped_column(BigInteger)
    hi: Mapped[int | None] = mapped_column(BigInteger)
