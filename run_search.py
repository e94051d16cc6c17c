"""dynas command line: ``python run_search.py COMMAND ...`` (also installed as ``dynas``).

With no arguments it runs ``search --config experiments/default.yaml``: a small search on the
built-in digits data that ends by printing the best architecture and where everything was written.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from dynas.config import apply_config, parse_count, write_resolved
from dynas.errors import DynasError

__all__ = ["build_parser", "main"]

DEFAULT_CONFIG = Path(__file__).resolve().parent / "experiments" / "default.yaml"
ENGINES = ("optuna", "nni")


def _count(text: str) -> int:
    try:
        return parse_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, but got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, but got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), but got {text}")
    return value


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="digits", help="digits (built in), cifar10, cifar100, imagefolder, npz")
    group.add_argument("--data-root", default=None, help="folder or file of the dataset (not needed for digits)")
    group.add_argument("--input-size", type=_positive_int, default=None, help="resize images to this square size")
    group.add_argument("--val-fraction", type=_fraction, default=0.1, help="share of the training set held out")
    group.add_argument("--train-subset", type=float, default=None, help="seeded training subset: a count or a fraction")


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=_positive_int, default=3)
    group.add_argument("--batch-size", type=_positive_int, default=64)
    group.add_argument("--lr", type=_positive_float, default=0.05)
    group.add_argument("--weight-decay", type=float, default=4e-5)
    group.add_argument("--label-smoothing", type=float, default=0.1)
    group.add_argument("--tau-start", type=_positive_float, default=30.0, help="initial temperature")
    group.add_argument("--anneal-fraction", type=float, default=0.1, help="share of steps annealing tau to 1")
    group.add_argument("--max-steps-per-epoch", type=_positive_int, default=None)
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--num-threads", type=_positive_int, default=None, help="CPU threads for torch (1 per worker when several share a machine)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (`dynas search: error: ...`) with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dynas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    search = sub.add_parser("search", aliases=["worker"], help="search architectures under a MAC budget (`worker` joins a shared study)")
    search.add_argument("--config", help="YAML file of defaults (flags override it)")
    group = search.add_argument_group("search")
    group.add_argument("--space", default="mobile_cifar", help="registered search space (see `spaces`)")
    group.add_argument("--engine", default="optuna", choices=ENGINES)
    group.add_argument("--sampler", default="tpe", help="optuna: tpe, random, nsga2, gp, grid")
    group.add_argument("--pruner", default="median", help="optuna: median, hyperband, none")
    group.add_argument("--strategy", default="evolution", help="nni: random, evolution, tpe, grid")
    group.add_argument("--execution", default="sequential", help="nni: sequential (in process) or local (NNI web UI)")
    group.add_argument("--host", default="127.0.0.1", help="nni local: address of the web UI (loopback by default)")
    group.add_argument("--port", type=_positive_int, default=8081, help="nni local: port of the web UI")
    group.add_argument("--objective", default="top1", help="top1 (single) or top1-macs (Pareto)")
    group.add_argument("--trials", type=_positive_int, default=10)
    group.add_argument("--max-macs", type=_count, default=None, help="MAC budget, e.g. 5M")
    group.add_argument("--max-params", type=_count, default=None, help="parameter budget, e.g. 1M")
    group.add_argument("--max-latency-ms", type=_positive_float, default=None, help="CPU latency budget at batch 1 (measured before training)")
    group.add_argument("--timeout", type=_positive_float, default=None, help="seconds")
    group.add_argument("--keep-weights", type=int, default=3, help="keep the weights of the best N trials")
    group.add_argument("--enqueue", default=None, help="optuna: JSON file of choice dicts to evaluate first (a dict or a list)")
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
    search.set_defaults(func=_cmd_search)

    train = sub.add_parser("train", help="(re)train one architecture from its spec")
    train.add_argument("--config", help="YAML file of defaults (flags override it)")
    train.add_argument("--arch", required=True, help="arch JSON file, a preset name or a one-line arch string")
    train.add_argument("--out", default="runs/train", help="folder for model.pt and metrics.json")
    _add_data_args(train)
    _add_train_args(train)
    train.set_defaults(func=_cmd_train)

    export = sub.add_parser("export", help="export the best / top-k / Pareto trials as deployable models")
    export.add_argument("run_dir")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--best", dest="select", action="store_const", const="best", help="the best trial (default)")
    which.add_argument("--top", type=_positive_int, default=None, help="the best K trials")
    which.add_argument("--pareto", dest="select", action="store_const", const="pareto", help="the Pareto front (val top-1 vs MACs)")
    which.add_argument("--trial", type=int, action="append", dest="trials", help="a trial number (repeatable)")
    export.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export)")
    export.add_argument("--retrain-epochs", type=_positive_int, default=None, help="retrain on the full training set instead of using kept weights")
    export.add_argument("--no-latency", dest="latency", action="store_false", help="skip the CPU latency measurement")
    export.set_defaults(func=_cmd_export, select="best")

    report = sub.add_parser("report", help="results table, Pareto front and plot of a run")
    report.add_argument("run_dir")
    report.add_argument("--top", type=_positive_int, default=10)
    report.set_defaults(func=_cmd_report)

    spaces = sub.add_parser("spaces", help="list registered search spaces and their cost ranges")
    spaces.set_defaults(func=_cmd_spaces)

    profile = sub.add_parser("profile", help="MACs, params and latency of an architecture")
    profile.add_argument("arch", help="arch JSON file, a preset name or a one-line arch string")
    profile.add_argument("--by-module", action="store_true", help="print the per-module breakdown")
    profile.add_argument("--latency", action="store_true", help="also measure CPU latency at batch 1")
    profile.set_defaults(func=_cmd_profile)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        subparser = parser._subparsers._group_actions[0].choices[argv[0]]  # type: ignore[union-attr]
        apply_config(subparser, args.config)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["search", "--config", str(DEFAULT_CONFIG)]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM stops as cleanly as Ctrl-C
    try:
        try:
            args = _parse(argv)
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
            return int(exc.code or 0)
        return args.func(args)
    except DynasError as err:
        print(f"dynas: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynas: interrupted; the results table is up to date, rerun the same command to continue", file=sys.stderr)
        return 130


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------- helpers


def _load_arch(text: str):
    from dynas.presets import get_preset, list_presets
    from dynas.spec import ArchSpec

    path = Path(text)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise DynasError(f"arch file {text!r} does not exist.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DynasError(f"arch file {text!r} is not valid JSON: {err}") from None
        return ArchSpec.from_dict(data.get("arch", data) if isinstance(data, dict) else data)
    if text in list_presets():
        return get_preset(text)
    if any(c in text for c in " |/"):
        return ArchSpec.from_str(text)
    return get_preset(text)  # raises with close-match suggestions


def _load_data(args: argparse.Namespace):
    from dynas.data import load_data

    subset = args.train_subset
    if subset is not None and subset >= 1:
        subset = int(subset)
    return load_data(
        args.dataset,
        root=args.data_root,
        val_fraction=args.val_fraction,
        train_subset=subset,
        input_size=args.input_size,
        seed=args.seed,
    )


def _train_config(args: argparse.Namespace, quiet: bool | None = None):
    from dynas.training import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        tau_start=args.tau_start,
        anneal_fraction=args.anneal_fraction,
        max_steps_per_epoch=args.max_steps_per_epoch,
        device=args.device,
        seed=args.seed,
        num_threads=args.num_threads,
        quiet=args.quiet if quiet is None else quiet,
    )


def _fmt(n: float) -> str:
    return f"{n / 1e6:.2f}M"


# ----------------------------------------------------------------------------- commands


def _default_storage(run_dir: Path) -> str:
    """The run directory's journal file, or its SQLite study (the earlier default) if it has one: resume it."""
    legacy = run_dir / "study.db"
    return f"sqlite:///{legacy.as_posix()}" if legacy.is_file() else str(run_dir / "study.log")


def _cmd_search(args: argparse.Namespace) -> int:
    from dynas.budget import Budget, ensure_feasible
    from dynas.search.evaluate import CandidateEvaluator
    from dynas.search.results import ResultsTable
    from search_spaces import get_space

    if args.max_macs is None:
        raise DynasError("a search needs a MAC budget: give --max-macs (e.g. 5M) or `max_macs` in the config.")
    _check_engine_names(args)  # before loading any data
    _check_space_name(args.space)
    enqueued = _read_enqueue(args.enqueue)
    run_dir = _prepare_run_dir(args.run_dir)
    data = _load_data(args)
    space = get_space(args.space, input_size=data.input_size, num_classes=data.num_classes)
    budget = Budget(max_macs=args.max_macs, max_params=args.max_params, max_latency_ms=args.max_latency_ms)
    ensure_feasible(space, budget)  # before any training
    for params in enqueued:
        space.decode(params)  # a bad label or value (e.g. K outside the space) fails here
    storage = None
    if args.engine == "optuna":  # a bad --storage fails before the trial bar appears
        from dynas.search.optuna_engine import make_storage, run_optuna_search

        url = args.storage or _default_storage(run_dir)
        storage = make_storage(url, args.heartbeat_interval, args.grace_period)
    write_resolved(args, run_dir / "config.yaml")
    results = ResultsTable(run_dir)
    progress = _TrialProgress(args.trials, quiet=args.quiet)
    # Candidates train quietly: the trial bar shows progress and the best so far.
    evaluator = CandidateEvaluator(
        budget, data, _train_config(args, quiet=True), results, keep_weights=args.keep_weights, on_record=progress.update
    )
    if args.engine == "optuna":
        run_optuna_search(
            space,
            evaluator,
            n_trials=args.trials,
            storage=storage,
            study_name=args.study_name or run_dir.name,
            sampler=args.sampler,
            pruner=args.pruner,
            objective=args.objective,
            seed=args.seed,
            timeout=args.timeout,
            enqueue=enqueued,
        )
    else:
        from dynas.search.nni_engine import run_nni_search

        run_nni_search(
            space,
            evaluator,
            n_trials=args.trials,
            strategy=args.strategy,
            seed=args.seed,
            execution=args.execution,
            port=args.port,
            host=args.host,
            verbose=False,
        )
    progress.close()
    _print_summary(results, evaluator, run_dir)
    return 0


def _check_engine_names(args: argparse.Namespace) -> None:
    from dynas.errors import did_you_mean

    if args.engine == "optuna":
        from dynas.search.optuna_engine import OBJECTIVES, PRUNERS, SAMPLERS

        checks = [("sampler", args.sampler, SAMPLERS), ("pruner", args.pruner, PRUNERS), ("objective", args.objective, list(OBJECTIVES))]
    else:
        from dynas.search.nni_engine import EXECUTIONS, STRATEGIES

        checks = [("strategy", args.strategy, STRATEGIES), ("execution", args.execution, EXECUTIONS)]
    for kind, name, options in checks:
        if name not in options:
            raise DynasError(f"unknown {kind} {name!r}; choose one of {', '.join(options)}.{did_you_mean(name, options)}")


def _check_space_name(name: str) -> None:
    from dynas.errors import did_you_mean
    from search_spaces import list_spaces

    if name not in list_spaces():
        raise DynasError(f"unknown search space {name!r}; registered: {', '.join(list_spaces())}.{did_you_mean(name, list_spaces())}")


def _read_enqueue(path: str | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DynasError(f"enqueue file {path!r} does not exist.") from None
    except json.JSONDecodeError as err:
        raise DynasError(f"enqueue file {path!r} is not valid JSON: {err}") from None
    items = data if isinstance(data, list) else [data]
    if not all(isinstance(item, dict) for item in items):
        raise DynasError(f"enqueue file {path!r} must hold a JSON object of choices or a list of them.")
    return items


def _prepare_run_dir(path: str) -> Path:
    run_dir = Path(path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise DynasError(f"run directory {path!r} is not writable: {err.strerror}.") from None
    return run_dir


class _TrialProgress:
    """A progress bar over trials that shows the best validation top-1 so far.

    Over-budget proposals are not trials (they cost no training): they show as a count only.
    """

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="trials", unit="trial", disable=quiet)
        self.best = float("-inf")
        self.rejected = 0

    def update(self, record: Any) -> None:
        if record.state in ("complete", "duplicate"):
            self.best = max(self.best, record.val_top1)
        self.rejected += record.state == "rejected"
        best = f"{self.best:.2f}" if self.best > float("-inf") else "-"
        self.bar.set_postfix(best_top1=best, rejected=self.rejected)
        if record.state != "rejected":
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _print_summary(results: Any, evaluator: Any, run_dir: Path) -> None:
    frame = results.frame()
    c = evaluator.counters
    print(
        f"\nthis run: {c.proposed} candidates proposed, {c.rejected} rejected over budget (never trained), "
        f"{c.trained} trained ({c.pruned} pruned, {c.failed} failed), {c.duplicates} duplicates reused"
    )
    done = frame[frame["state"] == "complete"]
    if done.empty:
        print("no trial completed yet; rerun the same command to continue.")
    else:
        best = done.sort_values("val_top1", ascending=False).iloc[0]
        print(
            f"best architecture (trial {best['trial']}): {best['arch']}\n"
            f"  MACs {_fmt(best['macs'])}, params {_fmt(best['params'])}, val top-1 {best['val_top1']:.2f}%"
        )
    print(f"results: {results.csv} and {results.jsonl}\nrun directory: {run_dir.resolve()}")


def _cmd_train(args: argparse.Namespace) -> int:
    from dynas.builder import build_model
    from dynas.counting import closed_form_macs, closed_form_params
    from dynas.export import save_model
    from dynas.temperature import current_temperature
    from dynas.training import evaluate, train_candidate

    arch = _load_arch(args.arch)
    data = _load_data(args)
    if (arch.input_size, arch.num_classes) != (data.input_size, data.num_classes):
        raise DynasError(
            f"the architecture expects {arch.input_size}x{arch.input_size} inputs and {arch.num_classes} "
            f"classes, but dataset {args.dataset!r} gives {data.input_size}x{data.input_size} and "
            f"{data.num_classes}; pass --input-size or use a matching architecture."
        )
    out = _prepare_run_dir(args.out)
    write_resolved(args, out / "config.yaml")
    model = build_model(arch)
    config = _train_config(args)
    result = train_candidate(model, data, config, checkpoint_path=out / "checkpoint.pt")
    test_top1 = evaluate(model, data, "test", device=config.device)
    tau = current_temperature(model, default=config.tau_end)  # where training's schedule ended
    save_model(out / "model.pt", model, arch, tau, mean=list(data.mean), std=list(data.std))
    metrics = {
        "arch": arch.to_str(),
        "macs": closed_form_macs(arch),
        "params": closed_form_params(arch),
        "val_top1_history": result.val_top1,
        "best_val_top1": result.best_val_top1,
        "test_top1": test_top1,
        "train_seconds": result.train_seconds,
        "final_loss": result.final_loss,
        "attention_entropy": result.attention_entropy,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    print(f"test top-1 {test_top1:.2f}%; wrote {out / 'model.pt'} and {out / 'metrics.json'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dynas.export import export_run

    select = "top" if args.top else args.select
    exported = export_run(
        args.run_dir,
        args.out,
        select=select,
        top=args.top or 3,
        trials=args.trials,
        retrain_epochs=args.retrain_epochs,
        latency=args.latency,
    )
    for item in exported:
        print(f"trial {item.trial}: {item.folder} (ONNX max abs diff {item.onnx_max_abs_diff:.1e})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from dynas.search.report import write_report

    print(write_report(Path(args.run_dir), top=args.top))
    return 0


def _cmd_spaces(args: argparse.Namespace) -> int:
    from dynas.counting import closed_form_macs
    from search_spaces import get_space, list_spaces

    for name in list_spaces():
        space = get_space(name)
        lo, hi = closed_form_macs(space.smallest()), closed_form_macs(space.largest())
        print(f"{name}: {len(space.choices())} choices, {_fmt(lo)}-{_fmt(hi)} MACs at {space.smallest().input_size}px")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from dynas.builder import build_model
    from dynas.counting import count_macs
    from dynas.latency import measure_latency

    arch = _load_arch(args.arch)
    report = count_macs(arch)
    print(f"{arch.to_str()}\nMACs {_fmt(report.total_macs)}, params {_fmt(report.params)}")
    if args.by_module:
        print(report.by_module.to_string(index=False))
    if args.latency:
        ms = measure_latency(build_model(arch), (arch.in_channels, arch.input_size, arch.input_size))
        print(f"CPU latency at batch 1: {ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
