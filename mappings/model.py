"""The values the mapping engine takes and gives back: the public contract with the vendor API and delivery.

Everything here is immutable and made of plain Python values, so a result can cross threads, be
queued, or be compared in a test without touching the engine that produced it. They are named tuples
rather than frozen dataclasses because several are built per record on the push path, where a frozen
dataclass costs four times as much to create.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple


class MappingContext(NamedTuple):
    """Who and what a record is about. Mapping specs never decide any of this; the engine stamps it.

    :param vendor_id: the vendor's OAuth client id (part of every identifier).
    :param record_id: the vendor's id of the record (re-sending it yields the same resources).
    :param patient_reference: the enrolled patient in the target EHR, e.g. ``Patient/abc``.
    :param device_full_url: the app's Device, ``mappings.identity.device_full_url(vendor_id)``.
    :param received_at: when the record reached us (timezone-aware); timestamps later than this plus
        the catalogue's tolerance are rejected as being in the future.
    """

    vendor_id: str
    record_id: str
    patient_reference: str
    device_full_url: str
    received_at: datetime


class MappedResource(NamedTuple):
    """One FHIR resource ready for the outbox, with the identity delivery needs to write it idempotently.

    ``resource`` references the other resources of the same record (and the app's Device) by their
    ``urn:uuid:`` full URLs; delivery rewrites those when it cannot send a transaction.
    """

    resource_type: str
    identifier_system: str
    identifier_value: str
    full_url: str
    resource: dict[str, Any]


class Rejection(NamedTuple):
    """Why a record cannot be mapped: a stable machine ``code``, the ``field`` at fault, and a message.

    ``field`` is a dotted path into the record's ``data`` (``answers.item9``, ``duration.unit``), or
    ``measure`` / ``data`` for problems with the record as a whole. The message is written for the
    vendor's developer and never echoes the submitted value (it may be patient data).
    """

    code: str
    field: str
    message: str


class Measurement(NamedTuple):
    """A number a record carried, named by a stable code (``phq9.total``, ``steps.daily``).

    The rules engine keeps a local ledger of these so it can evaluate triggers without parsing FHIR.
    ``time`` is timezone-aware: the record's effective time (or the start of its period; midnight UTC
    for measures recorded by date).
    """

    code: str
    time: datetime
    value: float


class MapResult(NamedTuple):
    """What one record became: resources and measurements when it maps, rejections when it does not."""

    resources: tuple[MappedResource, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    measurements: tuple[Measurement, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.rejections
