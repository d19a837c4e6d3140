"""`python -m netlab`: check, build (and hold) or clean up lab topologies by hand."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from edgeweave.cli import UserError, base_parser, run
from netlab import Lab, LabError, Topology, ns, signals_raise


def _parser() -> argparse.ArgumentParser:
    parser = base_parser("netlab", "Build network-namespace labs of hosts, NAT routers and pods.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a topology file and print its nodes")
    check.add_argument("topology", type=Path)
    up = sub.add_parser("up", help="build a topology and hold it until Ctrl-C or SIGTERM")
    up.add_argument("topology", type=Path)
    clean = sub.add_parser("cleanup", help="remove labs whose owner process is gone")
    clean.add_argument("--all", action="store_true", help="also remove labs of live processes")
    return parser


def _main(args: argparse.Namespace) -> int:
    if args.command == "cleanup":
        removed = ns.cleanup_all() if args.all else ns.cleanup_stale()
        print(f"removed {len(removed)} namespace(s)")
        return 0
    topo = Topology.load(args.topology)
    if args.command == "check":
        print(f"{args.topology}: ok: {len(topo.segments)} segment(s), {len(topo.routers)} "
              f"router(s), {len(topo.hosts)} host(s)")
        return 0
    signals_raise()
    try:
        with Lab(topo) as lab:
            for name, node in lab.nodes.items():
                addrs = " ".join(f"{i}={a}" for i, a in node.addresses)
                print(f"{name:16} {node.kind:7} {node.netns:40} {addrs}")
            print("lab is up; Ctrl-C tears it down", flush=True)
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    except LabError as exc:
        raise UserError(str(exc)) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m netlab`."""
    return run(_main, _parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
