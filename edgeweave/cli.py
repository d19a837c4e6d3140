"""The conventions every edgeweave command follows.

`--help`, `--version`, `--config FILE` and `--log-level` everywhere; an operator's mistake
(bad flag value, bad config, unreachable peer) is one line on stderr naming what is at fault and
exit code 2, never a traceback; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edgeweave import __version__, log
from edgeweave.config import ConfigError


class UserError(Exception):
    """A problem the operator can fix (input, environment, an unreachable peer): one line."""


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags shared by all edgeweave commands."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} (edgeweave) {__version__}")
    add_common(parser)
    return parser


def add_common(parser: argparse.ArgumentParser) -> None:
    """`--config` and `--log-level`; subcommand parsers get them too so either order works."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="YAML configuration file (see docs/reference); defaults apply without one",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=argparse.SUPPRESS,
        help="log verbosity on stderr (default: info)",
    )


def run(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
        argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run `main`, and turn operator errors into one line plus exit code 2."""
    args = parser.parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    log.setup(getattr(args, "log_level", "info"))
    try:
        return main(args)
    except (UserError, ConfigError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
