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
    own: dict[str, list[str]] = {}  # suite -> the dests of its own flags
    for name, candidate in sorted(SUITES.items()):
        if candidate.options is not None:
            own[name] = candidate.options(parser.add_argument_group(f"{name} options"))
    args = parser.parse_args(argv)
    for name, dests in own.items():
        stray = [d for d in dests if name != args.suite and getattr(args, d) is not None]
        if stray:
            parser.error(f"--{stray[0].replace('_', '-')}: an option of `bench {name}` only")
    suite: Suite = SUITES[args.suite]
    results = suite.run(args.quick, **{d: getattr(args, d) for d in own.get(args.suite, [])})
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
