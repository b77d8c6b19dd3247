"""The documentation vendors and hospital IT read matches the catalogue it describes."""

from __future__ import annotations

import re
from pathlib import Path

from mappings import load_catalog
from mappings.catalog import DEFAULT_FOLDER
from mappings.spec import ObservationSpec

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "mappings" / "README.md").read_text()


def _section(measure: str) -> str:
    match = re.search(rf"^### `{re.escape(measure)}`.*?(?=^##)", GUIDE, flags=re.S | re.M)
    assert match, f"mappings/README.md has no section for {measure}"
    return match.group(0)


def test_every_measure_its_fields_items_and_measurements_are_documented() -> None:
    catalog = load_catalog()
    for measure in catalog.measures():
        section = _section(measure)
        spec = catalog.spec(measure)
        if isinstance(spec, ObservationSpec):
            names = [f.name for f in spec.fields]
            measurements = [m.code for m in spec.measurements]
            units = [u for f in spec.fields for u in f.accept_units]
        else:
            names = [i.name for i in spec.items if i.name not in {f"item{n}" for n in range(2, 9)}]
            measurements = [s.measurement for s in spec.scores if s.measurement]
            measurements += [o.measurement for o in spec.item_observations if o.measurement]
            units = []
        for name in names + measurements + units:
            assert f"`{name}`" in section or name in section, f"{measure}: {name} is not documented"


def test_the_readme_example_is_the_shipped_spec() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(# Resting heart rate.*?)```", readme, flags=re.S)
    assert block is not None
    assert block.group(1) == (DEFAULT_FOLDER / "resting-heart-rate.yaml").read_text()
