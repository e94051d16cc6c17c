"""Static vs dynamic convolution (K = 4) at nearly equal MACs on CIFAR-10, in one command.

Both networks are MobileNetV2 in its CIFAR form (stem stride 1, first stride-2 block at stride 1).
The static one has width ``--width``; the dynamic one (K kernels in both 1x1 convs of every block
and in the head conv, as in the paper's DY-MobileNetV2) gets the width whose closed-form MACs come
closest to the static network's, so the comparison is at equal cost, not equal width. Both are
trained with the same recipe, seed and budget; tau anneals from ``--tau-start`` to 1 (the static
network has no dynamic layer, so tau does not touch it). The test split is used once, at the end.

    python ../shared/data/cifar10/to_batches.py ../shared/data/cifar10/cifar10_full_jpegq75_pack.npz ~/.cache/cifar/full
    python experiments/static_vs_dynamic.py --data-root ~/.cache/cifar/full --epochs 10

The README's numbers (a short, fixed CPU budget: 10k training images, 4 epochs, about 13 minutes)::

    python experiments/static_vs_dynamic.py --data-root ~/.cache/cifar/full --width 0.35 \
        --epochs 4 --train-subset 10000 --num-threads 1

The shared CIFAR-10 pack is JPEG (q75): absolute accuracies sit 1-2.5 points below exact pixels;
the static / dynamic comparison holds. Results (and the resolved settings) go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dynas.builder import build_model
from dynas.config import apply_config, write_resolved
from dynas.cost import closed_form_macs, closed_form_params
from dynas.data import DATASETS, BatchLoader, DataBundle, load_data
from dynas.presets import cifar_variant, mobilenet_v2
from dynas.spec import ArchSpec
from dynas.training import TrainConfig, evaluate, train_candidate

__all__ = ["build_parser", "main", "matched_pair", "train_and_test"]

_WIDTH_GRID = [round(0.1 + 0.01 * i, 2) for i in range(191)]  # 0.10 .. 2.00, the dynamic width search


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--config file.yaml`` sets defaults that flags override."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file of defaults (flag names as keys)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS))
    data.add_argument("--data-root", default=None, help="cifar-10-batches-py or its parent")
    data.add_argument("--val-fraction", type=float, default=0.1, help="held out of train for validation")
    data.add_argument("--train-subset", type=float, default=None, help="a count (>= 1) or a fraction of train")
    models = parser.add_argument_group("models")
    models.add_argument("--width", type=float, default=0.5, help="width multiplier of the static MobileNetV2")
    models.add_argument("--num-kernels", type=int, default=4, help="K of the dynamic network")
    models.add_argument("--dynamic-width", type=float, default=None, help="default: matched to the static MACs")
    train = parser.add_argument_group("training (the same for both)")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=0.05, help="peak; 0.1 collapsed the attention in short runs")
    train.add_argument("--weight-decay", type=float, default=4e-5)
    train.add_argument("--tau-start", type=float, default=30.0)
    train.add_argument("--anneal-fraction", type=float, default=0.1, help="share of steps annealing tau to 1")
    train.add_argument("--anneal-epochs", type=float, default=None, help="anneal over epochs instead (paper: 10)")
    train.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap, for a quick smoke run")
    train.add_argument("--device", default="auto")
    train.add_argument("--num-threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", default="runs/static_vs_dynamic", help="folder for results.json and config.yaml")
    return parser


def matched_pair(
    width: float,
    num_kernels: int = 4,
    dynamic_width: float | None = None,
    num_classes: int = 10,
    input_size: int = 32,
) -> tuple[ArchSpec, ArchSpec]:
    """(static, dynamic) CIFAR MobileNetV2 specs; the dynamic width matches the static MACs if not given."""

    def spec(w: float, k: int) -> ArchSpec:
        return cifar_variant(mobilenet_v2(w, num_kernels=k), num_classes=num_classes, input_size=input_size)

    static = spec(width, 1)
    if dynamic_width is None:
        target = closed_form_macs(static)
        dynamic_width = min(_WIDTH_GRID, key=lambda w: abs(closed_form_macs(spec(w, num_kernels)) - target))
    return static, spec(dynamic_width, num_kernels)


def train_and_test(arch: ArchSpec, data: DataBundle, config: TrainConfig) -> dict[str, Any]:
    """Build ``arch`` (seeded), train it, and report its cost, accuracy and speed."""
    torch.manual_seed(config.seed)  # the same init stream for both networks
    model = build_model(arch)
    result = train_candidate(model, data, config)
    return {
        "arch": arch.to_str(),
        "macs": closed_form_macs(arch),
        "params": closed_form_params(arch),
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


def _summary(static: dict[str, Any], dynamic: dict[str, Any], tau: str) -> str:
    rows = [("", "static", "dynamic")]
    rows += [
        ("MACs", f"{static['macs'] / 1e6:.2f}M", f"{dynamic['macs'] / 1e6:.2f}M"),
        ("params", f"{static['params'] / 1e6:.2f}M", f"{dynamic['params'] / 1e6:.2f}M"),
        ("test top-1 (%)", f"{static['test_top1']:.2f}", f"{dynamic['test_top1']:.2f}"),
        ("best val top-1 (%)", f"{static['best_val_top1']:.2f}", f"{dynamic['best_val_top1']:.2f}"),
        ("seconds / epoch", f"{static['seconds_per_epoch']:.1f}", f"{dynamic['seconds_per_epoch']:.1f}"),
    ]
    lines = [f"{a:<20}{b:>12}{c:>12}" for a, b, c in rows]
    ratio = dynamic["seconds_per_epoch"] / static["seconds_per_epoch"]
    lines += [
        f"MACs ratio dynamic / static: {dynamic['macs'] / static['macs']:.3f}; "
        f"time per epoch ratio: {ratio:.2f} (on {static['device']})",
        f"tau: {tau}",
        f"static:  {static['arch']}",
        f"dynamic: {dynamic['arch']}",
    ]
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
    """Train both networks, print the comparison and write ``results.json``."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        apply_config(parser, pre.config)
    args = parser.parse_args(argv)
    subset = int(args.train_subset) if args.train_subset is not None and args.train_subset >= 1 else args.train_subset
    data = load_data(args.dataset, args.data_root, val_fraction=args.val_fraction, train_subset=subset, seed=args.seed)
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
        seed=args.seed,
        num_threads=args.num_threads,
        quiet=args.quiet,
    )
    static_arch, dynamic_arch = matched_pair(
        args.width, args.num_kernels, args.dynamic_width, data.num_classes, data.input_size
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(args, out / "config.yaml")
    static = train_and_test(static_arch, data, config)
    dynamic = train_and_test(dynamic_arch, data, config)
    tau = _tau_text(config, data)
    results = {"static": static, "dynamic": dynamic, "tau": tau, "data": repr(data)}
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(_summary(static, dynamic, tau))
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
