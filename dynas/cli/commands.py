"""The commands behind ``dynas COMMAND``: each takes the parsed arguments and returns an exit code.

They are thin: the work is done by the library (:func:`dynas.study.search`,
:func:`dynas.export.export_run`, :func:`dynas.report.write_report`, ...); a command reads its
arguments, calls it and prints what a person needs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from dynas.checks import check_heartbeat, check_input_size, check_train_batches
from dynas.config import load_run_data, supernet_paths, train_config, write_resolved
from dynas.errors import DynasError

__all__ = ["COMMANDS"]

logger = logging.getLogger("dynas")


def _fmt(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def _read_enqueue(path: str | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DynasError(f"enqueue file {path!r} does not exist.") from None
    except IsADirectoryError:
        raise DynasError(f"enqueue file {path!r} is a folder, not a JSON file.") from None
    except UnicodeDecodeError:
        raise DynasError(f"enqueue file {path!r} is not UTF-8 text.") from None
    except json.JSONDecodeError as err:
        raise DynasError(f"enqueue file {path!r} is not valid JSON: {err}") from None
    except RecursionError:
        raise DynasError(f"enqueue file {path!r} is not valid JSON: too deeply nested.") from None
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
    """A progress bar over trials that shows the best validation top-1 so far (and, verbose, a line per trial).

    Over-budget proposals are not trials (they cost no training): they show as a count only.
    """

    def __init__(self, total: int, quiet: bool, verbose: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="trials", unit="trial", disable=quiet)
        self.verbose = verbose
        self.best = float("-inf")
        self.rejected = 0

    def update(self, record: Any) -> None:
        if record.state in ("complete", "duplicate"):
            self.best = max(self.best, record.val_top1)
        self.rejected += record.state == "rejected"
        if self.verbose:
            top1 = "" if record.val_top1 != record.val_top1 else f", val top-1 {record.val_top1:.2f}%"
            why = f" ({record.reason})" if record.reason else ""
            self.bar.write(f"trial {record.trial}: {record.state}{why}, MACs {_fmt(record.macs)}{top1}: {record.arch}")
        best = f"{self.best:.2f}" if self.best > float("-inf") else "-"
        self.bar.set_postfix(best_top1=best, rejected=self.rejected)
        if record.state != "rejected":
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _print_summary(result: Any, run_dir: Path) -> None:
    c = result.counters
    print(
        f"\nthis run: {c.proposed} candidates proposed, {c.rejected} rejected over budget (never trained), "
        f"{c.trained} trained ({c.pruned} pruned, {c.failed} failed), {c.duplicates} duplicates reused"
    )
    frame = result.frame
    base = frame[frame["origin"].astype(str).str.startswith("baseline")] if "origin" in frame else frame.iloc[:0]
    if not base.empty:
        kinds = ", ".join(f"{row['origin']} trial {row['trial']} ({row['state']}"
                          + (f", val top-1 {row['val_top1']:.2f}%" if row["state"] == "complete" else "") + ")"
                          for _, row in base.iterrows())
        print(f"baselines: {len(base)} of the trials ({kinds})")
    best = result.best
    if best is None:
        if not (c.failed and not c.trained):  # when every trial failed, the command's error line says so
            print("no trial completed yet; rerun the same command to continue.")
    else:
        print(
            f"best architecture (trial {best['trial']}): {best['arch']}\n"
            f"  MACs {_fmt(best['macs'])}, params {_fmt(best['params'])}, val top-1 {best['val_top1']:.2f}%"
        )
    print(f"results: {run_dir / 'results.csv'} and {run_dir / 'results.jsonl'}\nrun directory: {run_dir.resolve()}")


def cmd_search(args: argparse.Namespace) -> int:
    from dynas.engines.storage import default_storage
    from dynas.study import search

    if args.max_macs is None:
        raise DynasError("a search needs a MAC budget: give --max-macs (e.g. 5M) or `max_macs` in the config.")
    check_heartbeat(args.heartbeat_interval, args.grace_period)
    _check_engine_names(args)  # before loading any data
    _check_space_name(args.space)
    enqueued = _read_enqueue(args.enqueue)
    config = _checked_train_config(args, quiet=True)  # candidates train quietly: the trial bar shows progress
    if args.evaluator == "supernet":
        _check_supernet_file(args.supernet)
    data = load_run_data(vars(args))
    _check_fits(args, data)
    objective = _supernet_objective(args, data) if args.evaluator == "supernet" else None
    run_dir = _prepare_run_dir(args.run_dir)  # after every check: a refused run creates no folder
    progress: _TrialProgress | None = None

    def ready() -> None:  # everything checked, the study open: now the run's record is written
        nonlocal progress
        write_resolved(args, run_dir / "config.yaml")
        progress = _TrialProgress(args.trials, quiet=args.quiet, verbose=args.verbose)

    result = search(
        args.space,
        max_macs=args.max_macs,
        max_params=args.max_params,
        max_latency_ms=args.max_latency_ms,
        data=data,
        objective=objective,
        fidelity=args.evaluator,
        baselines=args.baselines,
        n_trials=args.trials,
        engine=args.engine,
        sampler=args.sampler,
        pruner=args.pruner,
        metric=args.objective,
        storage=(args.storage or default_storage(run_dir)) if args.engine == "optuna" else None,
        study_name=args.study_name or run_dir.name,
        run_dir=run_dir,
        train_config=config,
        keep_weights=args.keep_weights,
        enqueue=enqueued,
        seed=args.seed,
        timeout=args.timeout,
        strategy=args.strategy,
        execution=args.execution,
        host=args.host,
        port=args.port,
        heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period,
        on_record=lambda record: progress.update(record) if progress is not None else None,
        on_ready=ready,
    )
    if progress is not None:
        progress.close()
    _print_summary(result, run_dir)
    return _failed_run(result.counters, args, run_dir)


def _failed_run(counters: Any, args: argparse.Namespace, run_dir: Path) -> int:
    """1, with one line saying so, when every trial this run started failed (nothing trained); else 0."""
    if not counters.failed or counters.trained or counters.duplicates:
        return 0
    where = (f"NNI's trial logs under {run_dir / 'nni'}" if args.engine == "nni" and args.execution == "local"
             else f"the `reason` column of {run_dir / 'results.csv'}")
    print(f"dynas: error: every trial of this run failed ({counters.failed}), none trained; see {where}.", file=sys.stderr)
    return 1


def _checked_train_config(args: argparse.Namespace, **overrides: Any) -> Any:
    """The run's TrainConfig, its device checked here (a missing GPU is refused before anything is written)."""
    from dynas.training import resolve_device

    config = train_config(vars(args), **overrides)
    resolve_device(config.device)
    return config


def _total_stride(arch: Any) -> int:
    stride = arch.stem_stride
    for stage in arch.stages:
        for block in stage.blocks:
            stride *= block.stride
    return stride


def _check_fits(args: argparse.Namespace, data: Any) -> None:
    """The space's strides fit the data's input size, and the training split makes batches BatchNorm can use."""
    from dynas.spaces import get_space

    subset = f" (train_subset={args.train_subset})" if args.train_subset is not None else ""
    check_train_batches(args.batch_size, len(data.train), subset)
    space = get_space(args.space, input_size=data.input_size)
    stride = max(_total_stride(space.smallest()), _total_stride(space.largest()))
    check_input_size(data.input_size, stride, f"space {args.space!r}")


def _check_supernet_file(value: str | list[str] | None) -> None:
    paths = supernet_paths(value)
    if not paths:
        raise DynasError("--evaluator supernet needs --supernet PATH (the supernet.pt of `dynas supernet`).")
    for path in paths:
        if Path(path).is_dir():
            raise DynasError(f"supernet file {path!r} is a folder; give its supernet.pt.")


def _supernet_objective(args: argparse.Namespace, data: Any) -> Any:
    """Score candidates with the supernet's weights; a file of another space, size or class count is refused here."""
    from dynas.spaces import get_space
    from dynas.study import supernet_objective
    from dynas.supernet import load_supernet

    space = get_space(args.space, input_size=data.input_size, num_classes=data.num_classes)
    supernets = [load_supernet(path, space=space) for path in supernet_paths(args.supernet)]
    return supernet_objective(supernets, data, calib_images=args.calib_images, seed=args.seed, device=args.device)


def cmd_supernet(args: argparse.Namespace) -> int:
    from dynas.spaces import get_space
    from dynas.supernet import Supernet, SupernetTrainConfig, train_supernet
    from dynas.supernet.train import CHECKPOINT_NAME

    _check_space_name(args.space)
    config = SupernetTrainConfig(
        train=_checked_train_config(args, quiet=args.quiet), num_random=args.num_random, distill=args.distill,
        largest_static=args.largest_static, static_twins=args.static_twins, val_calib_images=args.val_calib_images,
    )
    run_dir = _prepare_run_dir(args.run_dir)
    data = load_run_data(vars(args))
    _check_fits(args, data)
    space = get_space(args.space, input_size=data.input_size, num_classes=data.num_classes)
    supernet = Supernet(space, kernel_bank=args.kernel_bank, zero_init_residual=args.zero_init_residual)
    # A resumed run's settings replace the recorded ones only once its checkpoint was accepted.
    recorded = not (run_dir / CHECKPOINT_NAME).exists()
    if recorded:
        write_resolved(args, run_dir / "config.yaml")

    def resumed(epoch: int, top1: float) -> bool:
        nonlocal recorded
        if not recorded:
            write_resolved(args, run_dir / "config.yaml")
            recorded = True
        return False

    result = train_supernet(supernet, data, config, run_dir=run_dir, callback=resumed)
    last = lambda values: f"{values[-1]:.2f}%" if values and not math.isnan(values[-1]) else "-"  # noqa: E731
    print(f"supernet trained for {result.epochs_run} epochs in {result.train_seconds:.0f} s: val top-1 "
          f"{last(result.val_top1_largest)} (largest), {last(result.val_top1_smallest)} (smallest)")
    print(f"supernet: {run_dir / 'supernet.pt'}; search with "
          f"`dynas search --evaluator supernet --supernet {run_dir / 'supernet.pt'} --space {args.space} ...`")
    return 0


def _check_engine_names(args: argparse.Namespace) -> None:
    from dynas.checks import check_name

    if args.engine == "optuna":
        from dynas.engines.samplers import OBJECTIVES, PRUNERS, SAMPLERS

        checks = [("sampler", args.sampler, SAMPLERS), ("pruner", args.pruner, PRUNERS), ("objective", args.objective, list(OBJECTIVES))]
    else:
        try:
            from dynas.engines.nni_engine import EXECUTIONS, STRATEGIES
        except ImportError as err:
            cause = err.__cause__ if isinstance(err.__cause__, ImportError) else err
            if cause.name == "nni":
                raise DynasError("--engine nni needs NNI, which is not installed: pip install 'dynas[nni]'") from None
            raise DynasError(f"--engine nni needs NNI, which does not import here ({cause}): pip install 'dynas[nni]'") from None

        checks = [("strategy", args.strategy, STRATEGIES), ("execution", args.execution, EXECUTIONS)]
    for kind, name, options in checks:
        check_name(kind, name, options)


def _check_space_name(name: str) -> None:
    from dynas.checks import check_name
    from dynas.spaces import list_spaces

    check_name("search space", name, list_spaces())


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from dynas.cost import closed_form_macs, closed_form_params
    from dynas.models import create_model, read_arch, save_model
    from dynas.temperature import current_temperature
    from dynas.training import evaluate, train_candidate

    arch = read_arch(args.arch)
    config = _checked_train_config(args)
    check_input_size(arch.input_size, _total_stride(arch), f"architecture {arch.to_str()!r}")
    data = load_run_data(vars(args))
    if (arch.input_size, arch.num_classes) != (data.input_size, data.num_classes):
        raise DynasError(
            f"the architecture expects {arch.input_size}x{arch.input_size} inputs and {arch.num_classes} "
            f"classes, but dataset {args.dataset!r} gives {data.input_size}x{data.input_size} and "
            f"{data.num_classes}; pass --input-size or use a matching architecture."
        )
    subset = f" (train_subset={args.train_subset})" if args.train_subset is not None else ""
    check_train_batches(args.batch_size, len(data.train), subset)
    out = _prepare_run_dir(args.out)
    write_resolved(args, out / "config.yaml")
    torch.manual_seed(config.seed)  # the initial weights: the same command trains the same model
    model = create_model(arch, in_channels=data.in_channels)
    result = train_candidate(model, data, config, checkpoint_path=out / "checkpoint.pt")
    test_top1 = evaluate(model, data, "test", device=config.device)
    tau = current_temperature(model, default=config.tau_end)  # where training's schedule ended
    save_model(out / "model.pt", model, model.arch, tau, mean=list(data.mean), std=list(data.std))
    metrics = {
        "arch": model.arch.to_str(),
        "macs": closed_form_macs(model.arch),
        "params": closed_form_params(model.arch),
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


def cmd_export(args: argparse.Namespace) -> int:
    from dynas.export import export_run
    from dynas.export.run import ONNX_MISSING

    select = "top" if args.top else args.select
    exported = export_run(
        args.run_dir,
        args.out,
        select=select,
        top=args.top or 3,
        trials=args.trials,
        retrain_epochs=args.retrain_epochs,
        finetune_epochs=args.finetune_epochs,
        latency=args.latency,
    )
    for item in exported:
        onnx = f"ONNX max abs diff {item.onnx_max_abs_diff:.1e}" if (item.folder / "model.onnx").is_file() else "no ONNX"
        print(f"trial {item.trial}: {item.folder} ({onnx})")
    if exported and not (exported[0].folder / "model.onnx").is_file():
        print(f"dynas: warning: model.onnx not written: {ONNX_MISSING}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dynas.report import write_report

    print(write_report(Path(args.run_dir), top=args.top))
    return 0


def cmd_spaces(args: argparse.Namespace) -> int:
    from dynas.cost import closed_form_macs
    from dynas.spaces import get_space, list_spaces

    for name in list_spaces():
        space = get_space(name)
        lo, hi = closed_form_macs(space.smallest()), closed_form_macs(space.largest())
        print(f"{name}: {len(space.choices())} choices, {_fmt(lo)}-{_fmt(hi)} MACs at {space.smallest().input_size}px")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from dynas.counting import count_macs
    from dynas.latency import measure_latency
    from dynas.models import create_model, read_arch

    arch = read_arch(args.arch)
    report = count_macs(arch)
    print(f"{arch.to_str()}\nMACs {_fmt(report.total_macs)}, params {_fmt(report.params)}")
    if args.by_module:
        print(report.by_module.to_string(index=False))
    if args.latency:
        ms = measure_latency(create_model(arch), (arch.in_channels, arch.input_size, arch.input_size))
        print(f"CPU latency at batch 1: {ms:.2f} ms")
    return 0


#: Subcommand (and alias) -> function.
COMMANDS = {
    "search": cmd_search,
    "worker": cmd_search,
    "supernet": cmd_supernet,
    "train": cmd_train,
    "export": cmd_export,
    "report": cmd_report,
    "spaces": cmd_spaces,
    "profile": cmd_profile,
}
