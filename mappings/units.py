"""The UCUM units the catalogue accepts from vendors, and how they convert.

Deliberately small: every unit here was needed by a measure and is tested. A spec names its canonical
unit and the others it accepts; loading refuses a unit not listed here or of another dimension, so a
conversion can never silently mix minutes and beats per minute.
"""

from __future__ import annotations

from dataclasses import dataclass

UCUM = "http://unitsofmeasure.org"


@dataclass(frozen=True)
class UnitDef:
    dimension: str
    factor: float  # multiply a value in this unit by `factor` to get the dimension's base unit


UNITS: dict[str, UnitDef] = {
    # time (base: second)
    "ms": UnitDef("time", 0.001),
    "s": UnitDef("time", 1.0),
    "min": UnitDef("time", 60.0),
    "h": UnitDef("time", 3600.0),
    # frequency (base: per minute)
    "/min": UnitDef("frequency", 1.0),
    "/s": UnitDef("frequency", 60.0),
    # counts per period (base: per day)
    "/d": UnitDef("count per day", 1.0),
    # dimensionless annotations
    "{score}": UnitDef("score", 1.0),
    "{steps}": UnitDef("steps", 1.0),
}


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """``value`` in ``from_unit`` expressed in ``to_unit`` (both of the same dimension)."""
    if from_unit == to_unit:
        return value
    return value * UNITS[from_unit].factor / UNITS[to_unit].factor
