"""`python -m bench [NAME ...]`: run the benchmark modules (all of them by default)."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def discover() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_")
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all: {', '.join(discover())})")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.names or discover():
        module = importlib.import_module(f"bench.{name}")
        started = time.time()
        print(f"== {name}", flush=True)
        result = module.run()
        result.setdefault("benchmark", name)
        result.setdefault("finished_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        result.setdefault("wall_s", round(time.time() - started, 1))
        out = RESULTS / f"{name.removeprefix('bench_')}.json"
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"   wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
