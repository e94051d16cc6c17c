"""Command-line pieces the experiment scripts share: the data options and a list of seeds.

The scripts import it as a sibling module (``python experiments/x.py`` puts this folder first on
``sys.path``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from dynas.config import apply_config
from dynas.data import DATASETS
from dynas.errors import DynasError

__all__ = ["add_data_args", "add_run_args", "parse_args", "run", "seed_list", "train_subset"]


def run(main: Callable[[], int]) -> int:
    """``main()``'s exit code; a :class:`DynasError` (bad input) is one ``dynas: error:`` line and 2, as the CLI does."""
    try:
        return main()
    except DynasError as err:
        print(f"dynas: error: {err}", file=sys.stderr)
        return 2


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser``'s arguments, where ``--config file.yaml`` sets defaults that flags override."""
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        apply_config(parser, pre.config)
    return parser.parse_args(argv)


def train_subset(args: argparse.Namespace) -> int | float | None:
    """``--train-subset`` as ``load_data`` takes it: a count (an int, >= 1) or a fraction."""
    value = args.train_subset
    return int(value) if value is not None and value >= 1 else value


def add_data_args(parser: argparse.ArgumentParser, input_size_help: str = "resize images (default: native)") -> None:
    """``--dataset`` (default cifar10), ``--data-root``, ``--input-size``, ``--val-fraction``, ``--train-subset``."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS))
    data.add_argument("--data-root", default=None, help="cifar-10-batches-py or its parent")
    data.add_argument("--input-size", type=int, default=None, help=input_size_help)
    data.add_argument("--val-fraction", type=float, default=0.1, help="held out of train for validation")
    data.add_argument("--train-subset", type=float, default=None, help="a count (>= 1) or a fraction of train")


def add_run_args(group: argparse._ArgumentGroup, seed_help: str) -> None:
    """``--max-steps-per-epoch``, ``--device``, ``--num-threads``, ``--seed`` and ``--quiet``."""
    group.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap, for a quick smoke run")
    group.add_argument("--device", default="auto")
    group.add_argument("--num-threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    group.add_argument("--seed", type=int, default=0, help=seed_help)
    group.add_argument("--quiet", action="store_true")


def seed_list(text: str) -> list[int]:
    """``"0,1"`` -> ``[0, 1]``: distinct integers, for ``--seeds``."""
    try:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, but got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"must be distinct, but got {text!r}")
    return seeds
