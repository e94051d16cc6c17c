"""dynas command line: ``dynas COMMAND ...`` (also ``python -m dynas`` and ``python run_search.py``).

With no arguments it runs ``search --config`` on the shipped default config
(``dynas/configs/default.yaml``): a small search on the built-in digits data that ends by
printing the best architecture and where everything was written.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from dynas.config import apply_config
from dynas.errors import DynasError

__all__ = ["DEFAULT_CONFIG", "build_parser", "main"]

#: The default job's config, shipped inside the package (a wheel install runs it from any folder).
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def build_parser() -> argparse.ArgumentParser:
    """The ``dynas`` argument parser (see :mod:`dynas.cli.parser`)."""
    from dynas.cli.parser import build_parser as build

    return build()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        commands = _subparsers(parser)
        subparser = commands[args.command]
        # A run's config.yaml holds the settings of its command: `train --config RUN/config.yaml`
        # takes a search's, so keys that belong to another command are not errors here.
        own = {a.dest for a in subparser._actions}
        other = {a.dest for p in commands.values() for a in p._actions} - own
        apply_config(subparser, args.config, ignore=other)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv in (["-v"], ["--verbose"]):
        argv = [*argv, "search", "--config", str(DEFAULT_CONFIG)]
    signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM stops as cleanly as Ctrl-C
    try:
        try:
            args = _parse(argv)
        except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2), already printed
            return int(exc.code or 0)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        from dynas.cli.commands import COMMANDS

        return COMMANDS[args.command](args)
    except DynasError as err:
        print(f"dynas: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynas: interrupted; the results table is up to date, rerun the same command to continue", file=sys.stderr)
        return 130


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
