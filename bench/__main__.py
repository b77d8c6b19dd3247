"""`python -m bench NAME [args]` runs bench/bench_NAME.py's main(args); `python -m bench` lists them."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main() -> None:
    found = pkgutil.iter_modules([str(Path(__file__).parent)])
    names = sorted(m.name.removeprefix("bench_") for m in found if m.name.startswith("bench_"))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        print("usage: python -m bench {" + "|".join(names) + "} [options]")
        sys.exit(2)
    module = importlib.import_module(f"bench.bench_{sys.argv[1]}")
    module.main(sys.argv[2:])


main()
