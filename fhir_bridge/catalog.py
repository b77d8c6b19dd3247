"""The mapping catalogue as this deployment configures it: built once per process from the settings.

Loading compiles and FHIR-validates every spec (a fraction of a second), so the service, the worker and
the CLI share one catalogue per distinct configuration instead of loading it per request.
"""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path

from fhir_bridge.settings import Settings
from mappings import Catalog, load_catalog


def catalog_for(settings: Settings) -> Catalog:
    """The catalogue with this deployment's licensed item text and future tolerance.

    :raises mappings.MappingSpecError: listing every problem of the specs or of the item-text file.
    """
    return _cached(settings.item_text_file, settings.future_tolerance_seconds)


@lru_cache(maxsize=4)
def _cached(item_text_file: Path | None, tolerance_seconds: int) -> Catalog:
    return load_catalog(item_text_file=item_text_file, future_tolerance=timedelta(seconds=tolerance_seconds))
