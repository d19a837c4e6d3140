"""`python -m bench SUITE [--quick] [--json]` (see ../shared/bench.md and bench/RESULTS.md)."""

from __future__ import annotations

import argparse
import json
import sys

from bench.harness import Suite, machine_line, render_table
from bench.suites import SUITES


def main(argv: list[str] | None = None) -> int:
    """Run one suite and print its report."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suite", choices=sorted(SUITES), help="which suite to run")
    parser.add_argument("--quick", action="store_true", help="a short run (< 2 min)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    suite: Suite = SUITES[args.suite]
    results = suite.run(args.quick)
    report = {"suite": suite.name, "machine": machine_line(), "quick": args.quick,
              "results": results}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"suite {suite.name} ({'quick' if args.quick else 'full'}): {report['machine']}")
        print(render_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
