"""The command line's parser: subcommands, argument groups, value types; defaults from the dataclasses.

Training defaults are :class:`~dynas.training.TrainConfig`'s fields and data defaults
:func:`~dynas.data.load_data`'s arguments, so a default has one home; ``--help`` shows them.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from dynas import __version__
from dynas.checks import MAX_SEED, brief, check_host
from dynas.cost import parse_count
from dynas.errors import DynasError
from dynas.supernet.model import KERNEL_BANKS
from dynas.supernet.train import SUPERNET_ANNEAL_FRACTION, SupernetTrainConfig
from dynas.training import TrainConfig

__all__ = ["ENGINES", "build_parser"]

ENGINES = ("optuna", "nni")
_TRAIN = TrainConfig()


# Each type takes the text of a flag or the value of a YAML key (a str, int, float, list, ...):
# `trials: 3.0` in YAML is read as 3, but 2.5 is refused (never truncated); on the command line
# an integer must be written as one.


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise argparse.ArgumentTypeError(f"expected a count such as 5M or 5e6, but got {brief(value)}")
    if isinstance(value, float) and math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a count such as 5M or 5e6, but got {value!r}")
    try:
        count = parse_count(value)
    except OverflowError:  # 1e400 or inf: float('inf') has no integer
        raise argparse.ArgumentTypeError(f"a count must be finite, but got {value!r}") from None
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if count < 1:  # 0.4 rounds to a budget of 0
        raise argparse.ArgumentTypeError(f"a count must be >= 1, but got {value!r}")
    return count


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise argparse.ArgumentTypeError(f"must be a number, but got {brief(value)}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, but got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, but got {value}")
    return number


def _integer(value: object) -> int:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, but got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise argparse.ArgumentTypeError(f"must be an integer, but got {brief(value)}")


def _positive_int(text: object) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, but got {value}")
    return value


def _non_negative_int(text: object) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, but got {value}")
    return value


def _bounded_int(low: int, high: int) -> Callable[[object], int]:
    def parse(text: object) -> int:
        value = _integer(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in {low}..{high}, but got {value}")
        return value

    return parse


_seed = _bounded_int(0, MAX_SEED)
_port = _bounded_int(1, 65535)


def _host(value: object) -> str:
    if not isinstance(value, str):
        raise argparse.ArgumentTypeError(f"must be a string, but got {brief(value)}")
    try:
        return check_host("host", value)
    except DynasError:
        raise argparse.ArgumentTypeError(f"must be an IP address or a host name, but got {value!r}") from None


def _positive_float(text: object) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, but got {text}")
    return value


def _fraction(text: object) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), but got {text}")
    return value


def _unit_interval(text: object) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], but got {text}")
    return value


def _subset(text: object) -> float:
    value = _positive_float(text)
    if value > 1 and value != int(value):
        raise argparse.ArgumentTypeError(f"must be a count (an integer) or a fraction in (0, 1], but got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (`dynas search: error: ...`) with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where it is None or a switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if any(action.default is v for v in (None, False, True, argparse.SUPPRESS)):
            return action.help or ""
        return super()._get_help_string(action) or ""


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="digits", help="digits (built in), cifar10, cifar100, imagefolder, npz")
    group.add_argument("--data-root", default=None, help="folder or file of the dataset (not needed for digits)")
    group.add_argument("--input-size", type=_positive_int, default=None, help="resize images to this square size")
    group.add_argument("--val-fraction", type=_fraction, default=0.1, help="share of the training set held out")
    group.add_argument("--train-subset", type=_subset, default=None, help="seeded training subset: a count or a fraction")


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=_positive_int, default=_TRAIN.epochs, help="epochs per candidate (a proxy)")
    group.add_argument("--batch-size", type=_positive_int, default=_TRAIN.batch_size, help="training batch size")
    group.add_argument("--lr", type=_positive_float, default=_TRAIN.lr, help="peak learning rate")
    group.add_argument("--weight-decay", type=_number, default=_TRAIN.weight_decay, help="on conv and linear weights")
    group.add_argument("--label-smoothing", type=_number, default=_TRAIN.label_smoothing, help="of the cross-entropy loss")
    group.add_argument("--tau-start", type=_positive_float, default=_TRAIN.tau_start, help="initial temperature")
    group.add_argument("--anneal-fraction", type=_unit_interval, default=_TRAIN.anneal_fraction, help="share of steps annealing tau to 1")
    group.add_argument("--max-steps-per-epoch", type=_positive_int, default=_TRAIN.max_steps_per_epoch, help="cap for quick proxies")
    group.add_argument("--device", default=_TRAIN.device, help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    group.add_argument("--seed", type=_seed, default=_TRAIN.seed, help="data split, initialisation and training")
    group.add_argument("--num-threads", type=_positive_int, default=_TRAIN.num_threads, help="CPU threads for torch (1 per worker when several share a machine)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_search(sub: argparse._SubParsersAction) -> None:
    search = sub.add_parser("search", aliases=["worker"], formatter_class=_Formatter,
                            help="search architectures under a MAC budget (`worker` joins a shared study)")
    search.add_argument("--config", help="YAML file of defaults (flags override it)")
    group = search.add_argument_group("search")
    group.add_argument("--space", default="mobile_cifar", help="registered search space (see `spaces`)")
    group.add_argument("--engine", default="optuna", choices=ENGINES)
    group.add_argument("--sampler", default="tpe", help="optuna: tpe, random, nsga2, gp, grid")
    group.add_argument("--pruner", default="median", help="optuna: median, hyperband, none")
    group.add_argument("--strategy", default="evolution", help="nni: random, evolution, tpe, grid")
    group.add_argument("--execution", default="sequential", help="nni: sequential (in process) or local (NNI web UI)")
    group.add_argument("--host", type=_host, default="127.0.0.1", help="nni local: address of the web UI (loopback by default)")
    group.add_argument("--port", type=_port, default=8081, help="nni local: port of the web UI")
    group.add_argument("--objective", default="top1", help="top1 (single) or top1-macs (Pareto)")
    group.add_argument("--trials", type=_positive_int, default=10, help="candidates to train (rejections do not count)")
    group.add_argument("--max-macs", type=_count, default=None, help="MAC budget, e.g. 5M")
    group.add_argument("--max-params", type=_count, default=None, help="parameter budget, e.g. 1M")
    group.add_argument("--max-latency-ms", type=_positive_float, default=None, help="CPU latency budget at batch 1 (measured before training)")
    group.add_argument("--timeout", type=_positive_float, default=None, help="seconds")
    group.add_argument("--keep-weights", type=_non_negative_int, default=3, help="keep the weights of the best N trials")
    group.add_argument("--enqueue", default=None, help="JSON file of choice dicts to evaluate first (a dict or a list)")
    group.add_argument("--no-baselines", dest="baselines", action="store_false",
                       help="skip the uniform all-static and all-dynamic (K=4) baselines trained first")
    group.add_argument("--evaluator", default="scratch", choices=("scratch", "supernet"),
                       help="scratch: train every candidate; supernet: score it with a trained supernet's weights")
    group.add_argument("--supernet", nargs="+", default=None, metavar="PATH",
                       help="supernet.pt of `dynas supernet` (with --evaluator supernet); several: the mean of their scores")
    group.add_argument("--calib-images", type=_positive_int, default=2000, help="supernet: training images recalibrating BatchNorm per candidate")
    out = search.add_argument_group("output")
    out.add_argument("--run-dir", default="runs/default", help="where results, study and weights go")
    out.add_argument("--storage", default=None,
                     help="Optuna storage: a URL (sqlite:///study.db, postgresql://...) or a journal file path "
                          "(default: RUN_DIR/study.log)")
    out.add_argument("--study-name", default=None, help="default: the run directory's name")
    out.add_argument("--heartbeat-interval", type=_positive_int, default=60, help="seconds between a worker's heartbeats")
    out.add_argument("--grace-period", type=_positive_int, default=None, help="seconds without heartbeat before a trial is failed and retried (default: 2 intervals)")
    _add_data_args(search)
    _add_train_args(search)


def build_parser() -> argparse.ArgumentParser:
    """The ``dynas`` parser; each subcommand's ``func`` default names its command in :mod:`dynas.cli.commands`."""
    parser = _Parser(prog="dynas", description="Neural architecture search with dynamic convolution under a MAC budget.")
    parser.add_argument("--version", action="version", version=f"dynas {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="a log line per trial")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_search(sub)

    supernet = sub.add_parser("supernet", formatter_class=_Formatter,
                              help="train a weight-sharing supernet of a mobile space (K nested: K = 1 is static)")
    supernet.add_argument("--config", help="YAML file of defaults (flags override it)")
    supernet.add_argument("--space", default="mobile_cifar", help="a registered mobile space")
    supernet.add_argument("--run-dir", default="runs/supernet", help="checkpoint.pt (resumed on rerun) and supernet.pt go here")
    supernet.add_argument("--num-random", type=_non_negative_int, default=SupernetTrainConfig.num_random, help="random subnets per step besides the largest and smallest")
    supernet.add_argument("--no-distill", dest="distill", action="store_false", help="train every subnet on the labels (default: distil from the largest)")
    supernet.add_argument("--largest-static", action="store_true", help="also train the largest all-static subnet every step (for --kernel-bank separate: its static kernels then learn at full width)")
    supernet.add_argument("--static-twins", action="store_true", help="make every second random subnet of a step the one before it made all static (for --kernel-bank separate: its static kernels then train at every size)")
    supernet.add_argument("--val-calib-images", type=_non_negative_int, default=1000, help="BN recalibration images for the per-epoch validation (0: none)")
    supernet.add_argument("--kernel-bank", choices=KERNEL_BANKS, default="residual", help="a dynamic layer's K kernels: residual (kernel k = W0 + D_k, centred on the static kernel), independent (kernel 0 the static one), or separate (a static kernel apart from K independent dynamic ones)")
    supernet.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=True, help="start every always-residual block as the identity (its last BN scale 0, BigNAS)")
    _add_data_args(supernet)
    _add_train_args(supernet)
    supernet.set_defaults(anneal_fraction=SUPERNET_ANNEAL_FRACTION)  # tau annealed over the whole run

    train = sub.add_parser("train", formatter_class=_Formatter, help="(re)train one architecture from its spec")
    train.add_argument("--config", help="YAML file of defaults (flags override it); a run's config.yaml works")
    train.add_argument("--arch", required=True, help="arch JSON file, a preset name or a one-line arch string")
    train.add_argument("--out", default="runs/train", help="folder for model.pt and metrics.json")
    _add_data_args(train)
    _add_train_args(train)

    export = sub.add_parser("export", formatter_class=_Formatter, help="export the best / top-k / Pareto trials as deployable models")
    export.add_argument("run_dir")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--best", dest="select", action="store_const", const="best", help="the best trial (default)")
    which.add_argument("--top", type=_positive_int, default=None, help="the best K trials")
    which.add_argument("--pareto", dest="select", action="store_const", const="pareto", help="the Pareto front (val top-1 vs MACs)")
    which.add_argument("--trial", type=_non_negative_int, action="append", dest="trials", help="a trial number (repeatable)")
    export.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export)")
    weights = export.add_mutually_exclusive_group()
    weights.add_argument("--retrain-epochs", type=_positive_int, default=None, help="retrain from scratch on the full training set instead of using the trial's weights")
    weights.add_argument("--finetune-epochs", type=_positive_int, default=None, help="train the trial's weights (kept, or the supernet's) further on the full training set")
    export.add_argument("--no-latency", dest="latency", action="store_false", help="skip the CPU latency measurement")
    export.set_defaults(select="best")

    report = sub.add_parser("report", formatter_class=_Formatter, help="results table, Pareto front and plot of a run")
    report.add_argument("run_dir")
    report.add_argument("--top", type=_positive_int, default=10, help="rows of the table")

    sub.add_parser("spaces", help="list registered search spaces and their cost ranges")

    profile = sub.add_parser("profile", formatter_class=_Formatter, help="MACs, params and latency of an architecture")
    profile.add_argument("arch", help="arch JSON file, a preset name or a one-line arch string")
    profile.add_argument("--by-module", action="store_true", help="print the per-module breakdown")
    profile.add_argument("--latency", action="store_true", help="also measure CPU latency at batch 1")
    return parser
