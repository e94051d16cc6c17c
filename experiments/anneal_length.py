"""How long must τ anneal in a short run? Proxy accuracy of dynamic networks against the anneal length.

Trains, for every ``--anneal-fractions`` value and every seed, the space's uniform all-dynamic
baseline at ``--max-macs`` (K = 4 in every block) and the space's largest architecture (K = K_max,
kernel 7, SE), each beside the same network with K = 1 (static, where τ plays no part), with the
candidate recipe of :class:`dynas.TrainConfig` (``--epochs``, lr 0.05), and prints final val top-1.

The README's numbers (digits at 16x16, 4 epochs; about 15 minutes on one core)::

    python experiments/anneal_length.py --num-threads 1

A smoke run: ``--epochs 1 --max-steps-per-epoch 2 --seeds 0 --anneal-fractions 0.1 --networks dynamic``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from _args import run

from dynas.baselines import baselines
from dynas.budget import Budget
from dynas.builder import build_model
from dynas.cost import parse_count
from dynas.data import DATASETS, load_data
from dynas.spaces import get_space
from dynas.spec import ArchSpec
from dynas.training import TrainConfig, train_candidate

__all__ = ["build_parser", "main", "networks", "with_kernels"]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--input-size", type=int, default=16)
    parser.add_argument("--space", default="mobile_cifar")
    parser.add_argument("--max-macs", type=parse_count, default=parse_count("1.5M"), help="budget of the all-dynamic baseline")
    parser.add_argument("--networks", default="dynamic,largest", help="comma-separated: dynamic, largest")
    parser.add_argument("--anneal-fractions", type=_floats, default=[0.1, 0.5, 1.0])
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-steps-per-epoch", type=int, default=None)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--out", default="runs/anneal_length", help="folder for results.json")
    return parser


def with_kernels(arch: ArchSpec, k: int) -> ArchSpec:
    """``arch`` with K = ``k`` in every block (1: static)."""
    stages = tuple(
        dataclasses.replace(s, blocks=tuple(dataclasses.replace(b, num_kernels=k) for b in s.blocks)) for s in arch.stages
    )
    return dataclasses.replace(arch, stages=stages)


def networks(space_name: str, input_size: int, num_classes: int, max_macs: float) -> dict[str, ArchSpec]:
    """The dynamic networks compared: the all-dynamic baseline at the budget and the space's largest."""
    space = get_space(space_name, input_size=input_size, num_classes=num_classes)
    dynamic = next(b.candidate.arch for b in baselines(space, Budget(max_macs)) if b.origin == "baseline-dynamic")
    return {"dynamic": dynamic, "largest": space.largest()}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = load_data(args.dataset, args.data_root, input_size=args.input_size)
    chosen = [n.strip() for n in args.networks.split(",")]
    nets = {n: a for n, a in networks(args.space, data.input_size, data.num_classes, args.max_macs).items() if n in chosen}
    rows = []
    for name, arch in nets.items():
        k = max(b.num_kernels for b in arch.blocks)
        runs = [(f, arch, k) for f in args.anneal_fractions] + [(None, with_kernels(arch, 1), 1)]
        for fraction, net, kernels in runs:
            for seed in args.seeds:
                config = TrainConfig(
                    epochs=args.epochs, seed=seed, quiet=True, num_threads=args.num_threads,
                    max_steps_per_epoch=args.max_steps_per_epoch, anneal_fraction=fraction or 0.0,
                )
                torch.manual_seed(seed)
                result = train_candidate(build_model(net), data, config)
                rows.append({
                    "network": name, "K": kernels, "anneal_fraction": fraction, "seed": seed,
                    "val_top1": result.val_top1[-1], "val_top1_history": result.val_top1, "train_loss": result.train_loss,
                })
                print(json.dumps({k: v for k, v in rows[-1].items() if "history" not in k and k != "train_loss"}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    frame = pd.DataFrame(rows)
    frame["anneal"] = frame["anneal_fraction"].map(lambda f: "static (K = 1)" if pd.isna(f) else f"{f:.0%}")
    table = frame.groupby(["network", "K", "anneal"], sort=False)["val_top1"].agg(
        seeds=lambda v: " / ".join(f"{x:.1f}" for x in v), mean="mean"
    )
    print(table.reset_index().to_markdown(index=False, floatfmt=".1f"))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
