"""Deterministic identity for what the bridge writes: identifiers, ``urn:uuid:`` full URLs, the app's Device.

Re-sending the same record must produce byte-identical resources with the same identifiers, so an EHR
(or our own outbox) can recognise a duplicate. Identifier values are hashes, not the vendor's record
ids: they are short enough for every EHR (at most 64 characters, and made only of ``[a-z0-9]`` so they
also serve as FHIR resource ids for EHRs that need ``PUT`` with a client-chosen id), and they do not
expose a vendor's internal ids in the chart.
"""

from __future__ import annotations

import hashlib
import uuid
from functools import lru_cache
from typing import Any

from mappings.model import MappedResource

CANONICAL = "https://fhir-bridge.org/fhir"
"""Base of our CodeSystem, Questionnaires and identifier systems."""

CODE_SYSTEM_URL = f"{CANONICAL}/CodeSystem/fhir-bridge"
"""Our CodeSystem, for what LOINC has no code for (app engagement, D-WAI, severity bands, ...)."""

RECORD_IDENTIFIER_SYSTEM = f"{CANONICAL}/sid/record-resource"
"""System of the identifier on every resource mapped from a vendor record."""

DEVICE_IDENTIFIER_SYSTEM = f"{CANONICAL}/sid/app"
"""System of the identifier of the app's ``Device``."""

SNOMED = "http://snomed.info/sct"

# UUIDv5 namespace for full URLs: derived from our canonical base, so it is stable across releases.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, CANONICAL)
_NAMESPACE_BYTES = _NAMESPACE.bytes
_SEP = "\x1f"  # ASCII unit separator: cannot occur in the parts, so ("a", "bc") and ("ab", "c") differ


def _digest(*parts: str) -> str:
    """32 hex characters (128 bits of SHA-256): collision-free for our purposes, and a valid FHIR id."""
    return hashlib.sha256(_SEP.join(parts).encode("utf-8")).hexdigest()[:32]


def _uuid5(name: str) -> str:
    """``str(uuid.uuid5(_NAMESPACE, name))`` without building UUID objects (it runs per resource)."""
    h = hashlib.sha1(_NAMESPACE_BYTES + name.encode("utf-8")).hexdigest()  # noqa: S324 - UUIDv5 is SHA-1 by definition
    # Version nibble 5; variant bits 10xx (RFC 9562).
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


def identifier_value(vendor_id: str, record_id: str, measure: str, role: str) -> str:
    """The identifier value of one resource of one record (``role``: ``main``, ``total``, ``item9`` ...)."""
    return _digest("record", vendor_id, record_id, measure, role)


def full_url(identifier_system: str, identifier_value: str) -> str:
    """The ``urn:uuid:`` a Bundle entry of this resource carries (UUIDv5 of its identifier)."""
    return "urn:uuid:" + _uuid5(identifier_system + "|" + identifier_value)


def device_identifier_value(vendor_id: str) -> str:
    return _digest("app", vendor_id)


@lru_cache(maxsize=1024)
def device_full_url(vendor_id: str) -> str:
    """The full URL every mapped resource of this vendor references its app ``Device`` by.

    Cached: the push path asks for it once per record, and it depends on the vendor alone.
    """
    return full_url(DEVICE_IDENTIFIER_SYSTEM, device_identifier_value(vendor_id))


def device_resource(vendor_id: str, vendor_name: str) -> MappedResource:
    """The vendor's app as a FHIR ``Device`` (SNOMED CT 706689003, application program software).

    Delivery puts it in every Bundle with a conditional create on its identifier, so the EHR holds one
    Device per app however many records arrive.
    """
    value = device_identifier_value(vendor_id)
    resource: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": [{"system": DEVICE_IDENTIFIER_SYSTEM, "value": value}],
        "status": "active",
        "deviceName": [{"name": vendor_name, "type": "user-friendly-name"}],
        "type": {
            "coding": [
                {
                    "system": SNOMED,
                    "code": "706689003",
                    "display": "Application program software (physical object)",
                }
            ],
            "text": "Mobile health app",
        },
    }
    return MappedResource(
        resource_type="Device",
        identifier_system=DEVICE_IDENTIFIER_SYSTEM,
        identifier_value=value,
        full_url=full_url(DEVICE_IDENTIFIER_SYSTEM, value),
        resource=resource,
    )
