"""The command line every daemon shares before its components exist: config check and print."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from edgeweave.cli import UserError, base_parser, run
from edgeweave.config import dump_yaml, load_config


def daemon_main(prog: str, description: str, config_cls: type[Any], components: str,
                argv: Sequence[str] | None) -> int:
    """Parse the shared flags, load and check the config, print it on `--print-config`."""
    parser = base_parser(prog, description)
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration (file plus defaults) and exit")

    def main(args: argparse.Namespace) -> int:
        config = load_config(config_cls, args.config)
        if args.print_config:
            print(dump_yaml(config), end="")
            return 0
        raise UserError(f"no component of {prog} can run in this release yet ({components}); "
                        "--print-config checks a configuration file")

    return run(main, parser, argv)
