"""settle_heap, run by every gunicorn web worker at boot: the catalogue is loaded, the startup heap is
frozen out of the cyclic GC, collection stays on, and the app still serves afterwards."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from flask import Flask

from fhir_bridge import services
from fhir_bridge.catalog import _cached, catalog_for
from fhir_bridge.server import GC_GEN0_THRESHOLD, settle_heap


@pytest.fixture
def gc_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_heap_loads_the_catalogue_and_freezes_the_startup_heap(app: Flask, gc_restored: None) -> None:
    _cached.cache_clear()
    settle_heap(app)
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD
    with app.app_context():
        settings = services.current().settings
    assert _cached.cache_info().currsize == 1
    assert "phq9" in catalog_for(settings)
    assert _cached.cache_info().hits >= 1
    assert app.test_client().get("/readyz").status_code == 200


def test_the_worker_freezes_its_startup_heap_the_same_way(gc_restored: None) -> None:
    from fhir_bridge.server import freeze_startup_heap

    gc.unfreeze()
    freeze_startup_heap()
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD
