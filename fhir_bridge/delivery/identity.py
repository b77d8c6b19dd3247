"""Full URLs and the app's Device, as delivery needs them to assemble Bundles.

docs/architecture.md puts these in ``mappings.identity`` (``MappedResource.full_url`` is "a UUIDv5 of
the identifier"; ``device_full_url(vendor_id)``, ``device_resource(vendor_id, vendor_name)``). That
module is being written on the mappings branch at the same time as this one, and the contract does not
fix the UUIDv5 namespace or the Device's identifier. Delivery therefore reaches them only through the
three functions below; when ``mappings.identity`` lands they must delegate to it (a one-line change
each), because the outbox bodies are produced by it and the ``urn:uuid:`` values must agree.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

CANONICAL = "https://fhir-bridge.org/fhir"
# The identifier system of the app Devices we create in EHRs.
DEVICE_SYSTEM = f"{CANONICAL}/sid/app-device"
SNOMED_SOFTWARE = {
    "system": "http://snomed.info/sct",
    "code": "706689003",
    "display": "Application program software (physical object)",
}


def full_url(ident_system: str, ident_value: str) -> str:
    """The ``urn:uuid:`` full URL of the resource with this identifier (a UUIDv5 of the identifier)."""
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ident_system}|{ident_value}"))


def _device_value(vendor_id: str) -> str:
    return hashlib.sha256(f"device|{vendor_id}".encode()).hexdigest()[:40]


def device_full_url(vendor_id: str) -> str:
    return full_url(DEVICE_SYSTEM, _device_value(vendor_id))


@dataclass(frozen=True)
class AppDevice:
    """The vendor app as a FHIR Device, with the identity delivery needs for a conditional create."""

    vendor_id: str
    ident_system: str
    ident_value: str
    full_url: str
    resource: dict[str, Any]


def device_resource(vendor_id: str, vendor_name: str) -> AppDevice:
    value = _device_value(vendor_id)
    resource: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": [{"system": DEVICE_SYSTEM, "value": value}],
        "status": "active",
        "deviceName": [{"name": vendor_name, "type": "user-friendly-name"}],
        "type": {"coding": [SNOMED_SOFTWARE], "text": "Mobile health app"},
    }
    return AppDevice(vendor_id, DEVICE_SYSTEM, value, full_url(DEVICE_SYSTEM, value), resource)
