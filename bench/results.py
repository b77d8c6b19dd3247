"""The common result type of the suite: one figure, its samples, the floor measured in the same run.

Every benchmark module hands back :class:`Figure` objects; the suite prints them as one table, writes
them as JSON, and ``python -m bench compare A.json B.json`` reads two such files back. A figure is
judged on its median (machines are noisy); the ratio is always median / median of the same run's floor.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

On = Literal["value", "ratio"]
Op = Literal[">=", "<="]


@dataclass(frozen=True)
class Condition:
    """One part of a target: the median value (or the ratio to the floor) ``op`` a bound."""

    on: On
    op: Op
    bound: float

    def holds(self, value: float | None, ratio: float | None) -> bool | None:
        x = value if self.on == "value" else ratio
        if x is None:
            return None
        return x >= self.bound if self.op == ">=" else x <= self.bound

    def text(self, unit: str) -> str:
        if self.on == "ratio":
            return f"ratio {self.op} {self.bound:g}"
        return f"{self.op} {self.bound:,.0f} {unit}".rstrip()


@dataclass
class Figure:
    """One row of the table. ``values``/``floor`` hold every repetition, so spread is visible."""

    key: str
    label: str
    unit: str
    values: list[float]
    floor: list[float] = field(default_factory=list)
    floor_label: str = ""
    target: list[Condition] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def floor_median(self) -> float | None:
        return statistics.median(self.floor) if self.floor else None

    @property
    def ratio(self) -> float | None:
        if self.median is None or not self.floor_median:
            return None
        return self.median / self.floor_median

    @property
    def met(self) -> bool | None:
        """True/False when the target can be judged, None when there is no target or no value."""
        if not self.target:
            return None
        verdicts = [c.holds(self.median, self.ratio) for c in self.target]
        if any(v is None for v in verdicts):
            return None
        return all(verdicts)

    def target_text(self) -> str:
        return " and ".join(c.text(self.unit) for c in self.target) or "-"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out |= {
            "median": self.median,
            "min": min(self.values) if self.values else None,
            "max": max(self.values) if self.values else None,
            "floor_median": self.floor_median,
            "ratio": self.ratio,
            "met": self.met,
            "target_text": self.target_text(),
        }
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Figure:
        return cls(
            key=data["key"],
            label=data["label"],
            unit=data["unit"],
            values=list(data["values"]),
            floor=list(data.get("floor") or []),
            floor_label=data.get("floor_label", ""),
            target=[Condition(**c) for c in data.get("target") or []],
            note=data.get("note", ""),
        )


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def table(figures: list[Figure]) -> str:
    """One table: figure | median | min-max | floor (same run) | ratio | target | met?"""
    header = ["figure", "median", "min-max", "floor (same run)", "ratio", "target", "met?"]
    rows = [header]
    for f in figures:
        spread = f"{fmt(min(f.values))}-{fmt(max(f.values))}" if f.values else "-"
        met = {True: "yes", False: "NO", None: "-"}[f.met]
        rows.append(
            [
                f"{f.label} ({f.unit})" if f.unit else f.label,
                fmt(f.median),
                spread,
                fmt(f.floor_median),
                fmt(f.ratio),
                f.target_text(),
                met,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append(" | ".join(cells))
        if n == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)
