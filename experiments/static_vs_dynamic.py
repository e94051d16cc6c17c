"""Static convolution against the dynamic operators at nearly equal MACs on CIFAR-10, in one command.

Every network is MobileNetV2 in its CIFAR form (stem stride 1, first stride-2 block at stride 1),
in the operator forms of the presets (:mod:`dynas.presets`):

* ``static``: width ``--width``, plain convolutions;
* ``dy``: DY-conv with ``--num-kernels`` kernels in both 1x1 convs of every block and the head;
* ``od1`` / ``od4``: ODConv with 1 or 4 kernels in all three convs of every block and the head;
* ``dcd``: DCD in both 1x1 convs of every block but the first.

Each dynamic network gets the width whose closed-form MACs come closest to the static
network's, so operators are compared at equal cost, not equal width. All are trained with the
same recipe and the same seeds (``--seeds``: initialisation, order and augmentation; the
train/val split stays the one of ``--seed``); tau anneals from ``--tau-start`` to 1 in the
operators that have one. The test split is used once per network, at the end.

    python ../shared/data/cifar10/to_batches.py ../shared/data/cifar10/cifar10_full_jpegq75_pack.npz ~/.cache/cifar/full
    python experiments/static_vs_dynamic.py --data-root ~/.cache/cifar/full --epochs 10

The README's table (a short, fixed CPU budget)::

    python experiments/static_vs_dynamic.py --data-root ~/.cache/cifar/full --width 0.35 \
        --epochs 4 --train-subset 5000 --ops static,dy,od1,od4,dcd --seeds 0,1 --num-threads 1

The shared CIFAR-10 pack is JPEG (q75): absolute accuracies sit 1-2.5 points below exact pixels;
the comparison holds. Results (and the resolved settings) go to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from _args import add_data_args, add_run_args, parse_args, run, seed_list, train_subset

from dynas.builder import build_model
from dynas.config import write_resolved
from dynas.cost import closed_form_macs, closed_form_params
from dynas.data import BatchLoader, DataBundle, load_data
from dynas.presets import cifar_variant, dcd_mobilenet_v2, mobilenet_v2
from dynas.spec import ArchSpec
from dynas.training import TrainConfig, evaluate, train_candidate

__all__ = ["OPERATORS", "build_parser", "main", "matched_archs", "matched_pair", "train_and_test"]

_WIDTH_GRID = [round(0.1 + 0.01 * i, 2) for i in range(191)]  # 0.10 .. 2.00, the matched-width search
_TRAIN = TrainConfig()


def _operator(name: str, num_kernels: int) -> Callable[[float], ArchSpec]:
    """The MobileNetV2 of operator ``name`` as a function of the width (224x224 ImageNet form)."""
    if name == "static":
        return lambda w: mobilenet_v2(w, num_kernels=1)
    if name == "dy":
        return lambda w: mobilenet_v2(w, num_kernels=num_kernels)
    if name in ("od1", "od4"):
        return lambda w: mobilenet_v2(w, op="od", num_kernels=int(name[2]), dynamic_convs="all")
    # DCD's attention squeeze: 8 at x0.5 and below (the official training default), 16 above.
    return lambda w: dcd_mobilenet_v2(w, dcd_reduction=8 if w <= 0.5 else 16)


#: The operators ``--ops`` takes, in table order.
OPERATORS = ("static", "dy", "od1", "od4", "dcd")


def _ops(text: str) -> list[str]:
    ops = [op.strip() for op in text.split(",") if op.strip()]
    bad = [op for op in ops if op not in OPERATORS]
    if not ops or bad or len(set(ops)) != len(ops):
        raise argparse.ArgumentTypeError(f"must be distinct names from {', '.join(OPERATORS)}, but got {text!r}")
    return ops


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--config file.yaml`` sets defaults that flags override."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file of defaults (flag names as keys)")
    add_data_args(parser)
    models = parser.add_argument_group("models")
    models.add_argument("--ops", type=_ops, default=["static", "dy"], help=f"comma-separated, from {', '.join(OPERATORS)}")
    models.add_argument("--width", type=float, default=0.5, help="width multiplier of the static MobileNetV2")
    models.add_argument("--num-kernels", type=int, default=4, help="K of the DY-conv network")
    models.add_argument("--dynamic-width", type=float, default=None, help="DY-conv's width (default: matched MACs)")
    train = parser.add_argument_group("training (the same for all)")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--seeds", type=seed_list, default=[0], help="comma-separated training seeds, e.g. 0,1")
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=0.05, help="peak; 0.1 collapsed the attention in short runs")
    train.add_argument("--weight-decay", type=float, default=4e-5)
    train.add_argument("--tau-start", type=float, default=30.0)
    train.add_argument("--anneal-fraction", type=float, default=_TRAIN.anneal_fraction, help="share of steps annealing tau to 1")
    train.add_argument("--anneal-epochs", type=float, default=None, help="anneal over epochs instead (paper: 10)")
    add_run_args(train, "the train/val split")
    parser.add_argument("--out", default="runs/static_vs_dynamic", help="folder for results.json and config.yaml")
    return parser


def matched_archs(
    width: float,
    ops: Sequence[str] = ("static", "dy"),
    num_kernels: int = 4,
    dynamic_width: float | None = None,
    num_classes: int = 10,
    input_size: int = 32,
) -> dict[str, ArchSpec]:
    """CIFAR MobileNetV2 specs per operator; each dynamic one at the width closest to the static MACs.

    The static network (width ``width``) sets the target even when ``"static"`` is not in ``ops``;
    ``dynamic_width`` fixes DY-conv's width instead of matching it.
    """

    def spec(op: str, w: float) -> ArchSpec:
        return cifar_variant(_operator(op, num_kernels)(w), num_classes=num_classes, input_size=input_size)

    target = closed_form_macs(spec("static", width))
    archs = {}
    for op in ops:
        if op == "static":
            archs[op] = spec(op, width)
        elif op == "dy" and dynamic_width is not None:
            archs[op] = spec(op, dynamic_width)
        else:
            best = min(_WIDTH_GRID, key=lambda w: abs(closed_form_macs(spec(op, w)) - target))
            archs[op] = spec(op, best)
    return archs


def matched_pair(
    width: float,
    num_kernels: int = 4,
    dynamic_width: float | None = None,
    num_classes: int = 10,
    input_size: int = 32,
) -> tuple[ArchSpec, ArchSpec]:
    """(static, DY-conv) CIFAR MobileNetV2 specs; the dynamic width matches the static MACs if not given."""
    archs = matched_archs(width, ("static", "dy"), num_kernels, dynamic_width, num_classes, input_size)
    return archs["static"], archs["dy"]


def train_and_test(arch: ArchSpec, data: DataBundle, config: TrainConfig) -> dict[str, Any]:
    """Build ``arch`` (seeded), train it, and report its cost, accuracy and speed."""
    torch.manual_seed(config.seed)  # the same init stream for every network
    model = build_model(arch)
    result = train_candidate(model, data, config)
    return {
        "arch": arch.to_str(),
        "macs": closed_form_macs(arch),
        "params": closed_form_params(arch),
        "seed": config.seed,
        "test_top1": evaluate(model, data, "test", device=config.device),
        "best_val_top1": result.best_val_top1,
        "val_top1_history": result.val_top1,
        "final_loss": result.final_loss,
        "seconds_per_epoch": result.seconds_per_epoch,
        "train_seconds": result.train_seconds,
        "tau_end": result.tau_end,
        "attention_entropy": result.attention_entropy,
        "device": result.device,
    }


def _summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One operator's seeds: mean and spread (max - min) of test top-1, its cost and speed."""
    tops = [r["test_top1"] for r in runs]
    return {
        "arch": runs[0]["arch"],
        "macs": runs[0]["macs"],
        "params": runs[0]["params"],
        "seeds": [r["seed"] for r in runs],
        "test_top1": tops,
        "test_top1_mean": statistics.fmean(tops),
        "test_top1_spread": max(tops) - min(tops),
        "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in runs),
        "device": runs[0]["device"],
    }


def _table(summary: dict[str, dict[str, Any]], tau: str) -> str:
    ref = summary.get("static") or next(iter(summary.values()))
    lines = [
        f"{'operator':<10}{'MACs':>9}{'params':>9}{'test top-1 (%)':>32}{'s/epoch':>9}{'x static':>9}",
    ]
    for op, row in summary.items():
        seeds = ", ".join(f"{t:.2f}" for t in row["test_top1"])
        top = f"{row['test_top1_mean']:.2f} ± {row['test_top1_spread'] / 2:.2f} ({seeds})"
        lines.append(
            f"{op:<10}{row['macs'] / 1e6:>8.2f}M{row['params'] / 1e6:>8.2f}M{top:>32}"
            f"{row['seconds_per_epoch']:>9.1f}{row['seconds_per_epoch'] / ref['seconds_per_epoch']:>9.2f}"
        )
    lines += [
        "test top-1: mean ± half the spread over seeds (each seed's value in brackets); MACs matched to static",
        f"tau: {tau}; on {ref['device']}",
    ]
    lines += [f"{op}: {row['arch']}" for op, row in summary.items()]
    return "\n".join(lines)


def _tau_text(config: TrainConfig, data: DataBundle) -> str:
    # The training loader's own count (drop_last, max_steps_per_epoch), not a re-derivation.
    loader = BatchLoader(
        data.train,
        config.batch_size,
        mean=data.mean,
        std=data.std,
        drop_last=True,
        max_batches=config.max_steps_per_epoch,
    )
    steps = len(loader)
    schedule = config.temperature_schedule(steps, steps * config.epochs)
    return (
        f"{config.tau_start:g} -> {config.tau_end:g} linearly over the first {schedule.anneal_steps} of "
        f"{steps * config.epochs} steps, then {config.tau_end:g} (validation and test at {config.tau_end:g})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Train every operator's network for every seed, print the table and write ``results.json``.

    Each finished network is added to ``results.json`` at once, and a rerun with the same ``--out``
    skips the (operator, seed) pairs already there.
    """
    parser = build_parser()
    args = parse_args(parser, argv)
    subset = train_subset(args)
    data = load_data(
        args.dataset, args.data_root, input_size=args.input_size, val_fraction=args.val_fraction,
        train_subset=subset, seed=args.seed,
    )
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        tau_start=args.tau_start,
        anneal_fraction=args.anneal_fraction,
        anneal_epochs=args.anneal_epochs,
        max_steps_per_epoch=args.max_steps_per_epoch,
        device=args.device,
        seed=args.seeds[0],
        num_threads=args.num_threads,
        quiet=args.quiet,
    )
    archs = matched_archs(args.width, args.ops, args.num_kernels, args.dynamic_width, data.num_classes, data.input_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(args, out / "config.yaml")
    path = out / "results.json"
    tau = _tau_text(config, data)
    done = json.loads(path.read_text(encoding="utf-8")).get("runs", []) if path.is_file() else []
    runs = list(done)  # every earlier network stays in the file, whatever --ops asks now

    def ours(run: dict[str, Any], op: str) -> bool:
        return run.get("op") == op and run.get("arch") == archs[op].to_str()

    for seed in args.seeds:
        for op, arch in archs.items():
            if any(ours(r, op) and r["seed"] == seed for r in runs):
                continue
            runs.append({"op": op, **train_and_test(arch, data, dataclasses.replace(config, seed=seed))})
            summary = {o: _summarise([r for r in runs if ours(r, o)]) for o in archs if any(ours(r, o) for r in runs)}
            results = {"summary": summary, "runs": runs, "tau": tau, "data": repr(data)}
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(results, indent=2), encoding="utf-8")
            tmp.replace(path)
    summary = {o: _summarise([r for r in runs if ours(r, o) and r["seed"] in args.seeds]) for o in archs}
    print(_table(summary, tau))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
