"""``python -m bench [--quick] [--only NAMES] [--json PATH]``: the whole suite, one table (TARGETS.md).

``python -m bench compare A.json B.json``: the change of every figure between two runs.
``python -m bench NAME [options]``: one benchmark module on its own, with its detailed output.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODULES = {
    "mapping": ("bench.bench_mapping", "map 10,000 native records to FHIR on one core (TARGETS.md row 1)"),
    "delivery": (
        "bench.bench_delivery",
        "outbox -> sekmet resources/s next to prebuilt Bundles (TARGETS.md row 3)",
    ),
    "push": ("bench.bench_push", "push API throughput per server CPU second, SQLite and PostgreSQL"),
    "rules": ("bench.bench_rules", "rule evaluation cost per accepted record vs the push without rules"),
    "dashboard": (
        "bench.bench_dashboard",
        "SMART dashboard: server time for 10,000 Observations vs a bare client, and time to interactive",
    ),
}
if (ROOT / "bench" / "bench_rules.py").exists():
    MODULES["rules"] = ("bench.bench_rules", "rule evaluation cost")
if (ROOT / "bench" / "soak.py").exists():
    MODULES["soak"] = ("bench.soak", "sustained pushes under EHR faults and a killed worker")


def usage() -> None:
    print(__doc__)
    print("single modules:")
    for name, (_, doc) in MODULES.items():
        print(f"  {name:10} {doc}")


def main(argv: list[str]) -> int:
    # The suite imports tests.support (servers and seeds): the checkout must be importable.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if argv and argv[0] in {"-h", "--help"}:
        usage()
        return 0
    if argv and argv[0] == "compare":
        from bench.suite import compare

        return compare(argv[1:])
    if argv and not argv[0].startswith("-"):
        if argv[0] not in MODULES:
            usage()
            return 2
        module = importlib.import_module(MODULES[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    from bench.suite import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
