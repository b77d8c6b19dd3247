"""Declarative mappings from app data to FHIR R4 resources, and the engine that loads them.

The public surface (see ``docs/architecture.md``)::

    from mappings import load_catalog, MappingContext

    catalog = load_catalog()        # raises MappingSpecError listing every (file, line, message)
    result = catalog.map("phq9", data, MappingContext(...))
    result.ok, result.resources, result.rejections, result.measurements
"""

from __future__ import annotations

from mappings.bundle import transaction_bundle
from mappings.catalog import Catalog, load_catalog
from mappings.model import MappedResource, MappingContext, MapResult, Measurement, Rejection
from mappings.specfile import MappingSpecError, SpecProblem

__all__ = [
    "Catalog",
    "MapResult",
    "MappedResource",
    "MappingContext",
    "MappingSpecError",
    "Measurement",
    "Rejection",
    "SpecProblem",
    "load_catalog",
    "transaction_bundle",
]
