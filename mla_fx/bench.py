"""`mla-fx bench`: the benchmark suite in benchmarks/ (tables, CSV, PNG plots, results.md).

    mla-fx bench [--quick] [--out DIR] [--only NAME,...]

The suite lives in the source checkout's benchmarks/ folder (or is installed as mla_fx.benchmarks).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mla_fx.errors import MLAFXError


def _suite_main():
    try:
        from mla_fx.benchmarks.run_all import main  # installed with the package (package-dir mapping)

        return main
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("mla_fx.benchmarks"):
            raise
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "benchmarks" / "run_all.py").is_file():
        raise MLAFXError("mla-fx bench needs the benchmarks/ folder of a source checkout "
                         "(git clone the project and install it with: pip install -e '.[bench]')")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from benchmarks.run_all import main

    return main


def main(argv: list[str] | None = None) -> int:
    return _suite_main()(argv, prog="mla-fx bench")


if __name__ == "__main__":
    raise SystemExit(main())
