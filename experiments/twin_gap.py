"""How long must a mixed subnet train to catch up with its static twin? The gap against length.

``supernet_ranking.py`` samples subnets in a MAC band as uniform draws of the space and the same
draw made all static: a draw whose two halves both land in the band gives *twins*, one network
with static or with (partly) dynamic convolution. Trained stand-alone for 20 epochs every mixed
twin of the README's band lands under its static one; the supernet, whose weights have trained
far longer, sees them level. This script trains ``--pairs`` twins stand-alone for each length of
``--epochs`` (``--seeds`` seeds each) with the ranking experiment's recipe and reports, per
length, the points the mixed twin scores over the static one. If the gap closes with length, a
20-epoch truth measures how fast dynamic layers train, not how good they end up.

    python experiments/twin_gap.py --data-root ~/.cache/cifar/full --input-size 16 --train-subset 5000 \\
        --num-subnets 32 --strata 4 --mac-band 0.8M:2.5M --pairs 3 --epochs 20,60 --seeds 1 \\
        --num-threads 1 --quiet --out runs/twin_gap

The twins are those ``supernet_ranking.py`` samples with the same band options and ``--seed``
(``--pairs`` of them, spread over the band by MACs), and each run is a row of
``--out/standalone.jsonl`` in that script's form and setting: a copy of it seeds a ranking run of
the same recipe and ``--epochs``. Rows are appended as runs finish, a rerun skips those there,
and ``--shard I/N`` splits the runs over N copies started together on one ``--out`` (one core
each); the last to finish writes ``results.jsonl`` (a row per pair and length) and
``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _args import add_data_args, add_run_args, parse_args, run, seed_list
from supernet_ranking import (
    Subnet, _standalone, add_band_args, add_recipe_args, check_run_args, load_space, read_runs, recipe_config,
    sample_in_band, standalone_setting, twins,
)

from dynas.config import write_resolved
from dynas.errors import DynasError

__all__ = ["build_parser", "gap_summary", "main", "spread"]


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--config file.yaml`` sets defaults that flags override."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file of defaults (flag names as keys)")
    add_data_args(parser, "resize images (default: native; 32 for digits)")
    add_band_args(parser)
    parser.add_argument("--pairs", type=int, default=None, help="twins trained, spread over the band by MACs (default: all)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=seed_list, default=[20, 60], help="comma-separated stand-alone lengths")
    train.add_argument("--seeds", type=int, default=1, help="stand-alone seeds per network and length")
    train.add_argument("--calib-images", type=int, default=2000, help="BN recalibration images before validating")
    add_recipe_args(train)
    add_run_args(train, "data split and sampling (as supernet_ranking.py's)")
    parser.add_argument("--out", default="runs/twin_gap", help="folder for the runs and the results")
    parser.add_argument("--shard", default="0/1", help="I/N: train every N-th run from the I-th (N copies on one --out)")
    return parser


def spread(pairs: Sequence[Any], count: int | None) -> list[Any]:
    """``count`` items of ``pairs`` evenly spaced from first to last (all of them when ``count`` is None)."""
    if count is None or count >= len(pairs):
        return list(pairs)
    if count == 1:
        return [pairs[len(pairs) // 2]]
    return [pairs[round(i * (len(pairs) - 1) / (count - 1))] for i in range(count)]


def gap_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per length (a string key, as JSON has it): the mean, range and sign count of the mixed-minus-static gap."""
    summary: dict[str, Any] = {}
    for epochs in sorted({r["epochs"] for r in rows}):
        gaps = [r["gap_points"] for r in rows if r["epochs"] == epochs]
        summary[str(epochs)] = {
            "pairs": len(gaps),
            "mean_gap_points": statistics.fmean(gaps),
            "min_gap_points": min(gaps),
            "max_gap_points": max(gaps),
            "mixed_below_static": sum(g < 0 for g in gaps),
            "seconds_static": statistics.fmean(s for r in rows if r["epochs"] == epochs for s in r["static_seconds"]),
            "seconds_dynamic": statistics.fmean(s for r in rows if r["epochs"] == epochs for s in r["dynamic_seconds"]),
        }
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Sample the twins, train each for every length, and print the gap per length."""
    parser = build_parser()
    args = parse_args(parser, argv)
    band, shard = check_run_args(args)
    if args.pairs is not None and args.pairs < 1:
        raise DynasError(f"`--pairs` must be an integer >= 1, but got pairs={args.pairs}.")
    if min(args.epochs) < 1:
        raise DynasError(f"`--epochs` must be integers >= 1, but got epochs={','.join(map(str, args.epochs))}.")
    recipes = {epochs: recipe_config(args, epochs) for epochs in args.epochs}  # a bad value is refused here
    data, space = load_space(args)
    found = twins(sample_in_band(space, band, args.num_subnets, args.strata, seed=args.seed))
    if not found:
        raise DynasError(
            f"no twins among the {args.num_subnets} subnets sampled in `--mac-band` {args.mac_band}: sample more "
            f"(`--num-subnets`) or widen the band."
        )
    pairs = spread(found, args.pairs)
    # Alternate static / dynamic first so that two shards each get both kinds (dynamic runs are slower).
    order: list[Subnet] = [s for i, pair in enumerate(pairs) for s in (pair if i % 2 == 0 else pair[::-1])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(args, out / "config.yaml")
    setting = standalone_setting(args)  # its "epochs" is set per length below
    for epochs, recipe in recipes.items():
        _standalone(order, data, recipe, args.seeds, out / "standalone.jsonl", args.calib_images, args.seed,
                    {**setting, "epochs": epochs}, shard)
    # Read once all are done: another shard may have finished a run of an earlier length meanwhile.
    runs = {epochs: read_runs(out / "standalone.jsonl", {**setting, "epochs": epochs}) for epochs in recipes}
    missing = sum((s.arch.to_str(), seed) not in runs[e] for e in runs for s in order for seed in range(args.seeds))
    if missing:
        print(f"shard {args.shard}: done; {missing} runs are left to the other shards, and the last of them to "
              f"finish writes the results (or rerun with --shard 0/1 when they have).")
        return 0
    rows = []
    for epochs, done in runs.items():
        for static, dynamic in pairs:
            s_runs = [done[(static.arch.to_str(), seed)] for seed in range(args.seeds)]
            d_runs = [done[(dynamic.arch.to_str(), seed)] for seed in range(args.seeds)]
            rows.append({
                "epochs": epochs,
                "static_arch": static.arch.to_str(),
                "dynamic_arch": dynamic.arch.to_str(),
                "static_macs": static.macs,
                "dynamic_macs": dynamic.macs,
                "static_top1": [r["top1"] for r in s_runs],
                "dynamic_top1": [r["top1"] for r in d_runs],
                "gap_points": statistics.fmean(r["top1"] for r in d_runs) - statistics.fmean(r["top1"] for r in s_runs),
                "static_seconds": [r["seconds"] for r in s_runs],
                "dynamic_seconds": [r["seconds"] for r in d_runs],
            })
    summary = gap_summary(rows)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"{len(pairs)} twins in {band[0] / 1e6:g}M-{band[1] / 1e6:g}M MACs ({len(found)} sampled), {args.seeds} seed(s):")
    print("epochs  mixed - static (points)  range            mixed below  s/run static, mixed")
    for epochs, s in summary.items():
        print(f"{epochs:>6}  {s['mean_gap_points']:+23.2f}  {s['min_gap_points']:+.2f} .. {s['max_gap_points']:+.2f}"
              f"   {s['mixed_below_static']:>3} of {s['pairs']:<3}  {s['seconds_static']:.0f}, {s['seconds_dynamic']:.0f}")
    print(f"results: {out / 'results.jsonl'}, {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
