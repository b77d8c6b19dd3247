"""``python -m bench NAME [options]``: run one benchmark (``python -m bench`` lists them)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
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


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in BENCHMARKS:
        print("usage: python -m bench NAME [options]\n\nbenchmarks:")
        for name, (_, doc) in BENCHMARKS.items():
            print(f"  {name:10} {doc}")
        return 0 if not argv or argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
