"""``python run_search.py COMMAND ...``: the dynas command line from a clone (the same as ``dynas``).

The CLI lives in :mod:`dynas.cli`; this file only keeps the clone's entry point.
"""

import sys

from dynas.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
