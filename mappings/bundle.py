"""A record's resources as a FHIR transaction Bundle with conditional creates: what `fhir-bridge map` prints.

This is the plain form, for people debugging a mapping and for EHRs without quirks. The delivery
worker builds its own requests per EHR (``Tenant.quirks``), but from the same resources and identifiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mappings.model import MappedResource


def transaction_bundle(resources: Sequence[MappedResource]) -> dict[str, Any]:
    """A ``transaction`` Bundle: one ``POST`` per resource with ``ifNoneExist`` on its identifier.

    Re-sending the same Bundle creates nothing new, and the ``urn:uuid:`` references between entries
    (to the QuestionnaireResponse, to the app's Device) are resolved by the EHR.
    """
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": r.full_url,
                "resource": r.resource,
                "request": {
                    "method": "POST",
                    "url": r.resource_type,
                    "ifNoneExist": f"identifier={r.identifier_system}|{r.identifier_value}",
                },
            }
            for r in resources
        ],
    }
