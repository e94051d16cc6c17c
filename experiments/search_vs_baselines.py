"""Does a search beat the uniform baselines at its budget? Search, then retrain the winners and the baselines.

1. Search ``--space`` under ``--max-macs`` with TPE (``dynas.search``, from scratch, ``--proxy-epochs``
   per candidate). The search enqueues its baselines first: the most expensive uniform all-static
   and all-dynamic (K = 4) architectures within the budget (``origin`` column).
2. A random search of the same number of trials at the same budget (sampler seed ``--seed`` + 1), as a
   reference.
3. Retrain from scratch, for ``--retrain-epochs`` and every seed of ``--seeds``: the ``--top`` best
   searched architectures (by proxy val top-1), both baselines and the random search's best.
   Each gets its own row's tau schedule; the test split is used once per network, at the end.
4. Print a table of test top-1 (mean ± half the spread over seeds) with MACs and params, and
   write ``retrain.png`` (test top-1 against MACs and against params).

Everything is resumable: the searches keep their journals in ``--out/search`` and ``--out/random``
(a rerun continues them), and every retrained network is appended to ``--out/retrain.jsonl`` at
once (a rerun skips those already there).

The README's table (CIFAR-10 at 16x16, one CPU thread; about 45 minutes)::

    python ../shared/data/cifar10/to_batches.py ../shared/data/cifar10/cifar10_full_jpegq75_pack.npz ~/.cache/cifar/full
    python experiments/search_vs_baselines.py --data-root ~/.cache/cifar/full --input-size 16 \\
        --train-subset 5000 --max-macs 3M --trials 10 --proxy-epochs 3 --retrain-epochs 5 \\
        --seeds 0,1 --num-threads 1

A smoke run (seconds)::

    python experiments/search_vs_baselines.py --dataset digits --input-size 16 --max-macs 1.5M --trials 3 \\
        --proxy-epochs 1 --retrain-epochs 1 --max-steps-per-epoch 2 --seeds 0,1 --quiet --out /tmp/svb
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from _args import add_data_args, add_run_args, parse_args, run, seed_list, train_subset

import dynas
from dynas.builder import build_model
from dynas.config import write_resolved
from dynas.cost import closed_form_macs, closed_form_params, parse_count
from dynas.data import DataBundle, load_data
from dynas.spec import ArchSpec
from dynas.training import TrainConfig, evaluate, train_candidate

__all__ = ["build_parser", "main", "pick", "summarise"]

_TRAIN = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--config file.yaml`` sets defaults that flags override."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file of defaults (flag names as keys)")
    add_data_args(parser)
    search = parser.add_argument_group("search")
    search.add_argument("--space", default="mobile_cifar")
    search.add_argument("--max-macs", type=parse_count, required=True, help="the budget, e.g. 3M")
    search.add_argument("--trials", type=int, default=10, help="trained candidates per search (baselines included)")
    search.add_argument("--proxy-epochs", type=int, default=3, help="epochs per searched candidate")
    search.add_argument("--top", type=int, default=3, help="searched architectures retrained")
    search.add_argument("--pruner", default="none", help="of both searches; 'median' stops most candidates early, "
                        "which leaves fewer completed ones to pick from")
    train = parser.add_argument_group("training (searches and retraining)")
    train.add_argument("--retrain-epochs", type=int, default=6)
    train.add_argument("--seeds", type=seed_list, default=[0, 1], help="retraining seeds, comma-separated")
    train.add_argument("--batch-size", type=int, default=_TRAIN.batch_size)
    train.add_argument("--lr", type=float, default=_TRAIN.lr)
    add_run_args(train, "data split and the searches' samplers")
    parser.add_argument("--out", default="runs/search_vs_baselines", help="folder for the searches and results")
    return parser


def pick(searched: pd.DataFrame, random_run: pd.DataFrame, top: int) -> list[dict[str, Any]]:
    """The networks to retrain: ``top`` best searched, each baseline, the random search's best.

    Rows are completed trials ranked by proxy val top-1; an architecture is retrained once (under
    the first role it gets, in this order: baseline, searched, random).
    """
    picked: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(row: pd.Series, role: str) -> None:
        if row["arch_json"] not in seen:
            seen.add(row["arch_json"])
            picked.append({"role": role, **{k: row[k] for k in ("arch_json", "tau_start", "anneal_fraction", "val_top1")}})

    done = searched[searched["state"] == "complete"].sort_values("val_top1", ascending=False, kind="stable")
    for origin in ("baseline-static", "baseline-dynamic"):
        for _, row in done[done["origin"] == origin].head(1).iterrows():
            add(row, origin)
    for _, row in done[done["origin"] == "search"].head(top).iterrows():
        add(row, "searched")
    rand = random_run[random_run["state"] == "complete"].sort_values("val_top1", ascending=False, kind="stable")
    for _, row in rand.head(1).iterrows():
        add(row, "random-best")
    return picked


def _retrain(entry: dict[str, Any], data: DataBundle, config: TrainConfig, seed: int) -> dict[str, Any]:
    arch = ArchSpec.from_dict(json.loads(entry["arch_json"]))
    schedule = {k: float(entry[k]) for k in ("tau_start", "anneal_fraction") if pd.notna(entry[k])}
    config = dataclasses.replace(config, seed=seed, **schedule)
    torch.manual_seed(seed)
    model = build_model(arch)
    result = train_candidate(model, data, config)
    return {
        "role": entry["role"],
        "arch": arch.to_str(),
        "seed": seed,
        "macs": closed_form_macs(arch),
        "params": closed_form_params(arch),
        "dynamic_blocks": sum(b.num_kernels > 1 or b.op != "dy" for b in arch.blocks),
        "blocks": len(arch.blocks),
        "proxy_val_top1": float(entry["val_top1"]),
        "test_top1": evaluate(model, data, "test", device=config.device),
        "best_val_top1": result.best_val_top1,
        "train_seconds": result.train_seconds,
    }


def summarise(runs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per retrained architecture: test top-1 mean and spread over its seeds."""
    frame = pd.DataFrame(runs)
    rows = []
    for (role, arch), group in frame.groupby(["role", "arch"], sort=False):
        tops = group["test_top1"].tolist()
        first = group.iloc[0]
        rows.append({
            "role": role,
            "MACs (M)": first["macs"] / 1e6,
            "params (M)": first["params"] / 1e6,
            "dynamic blocks": f"{first['dynamic_blocks']}/{first['blocks']}",
            "proxy val top-1": first["proxy_val_top1"],
            "test top-1 mean": statistics.fmean(tops),
            "± half spread": (max(tops) - min(tops)) / 2,
            "seeds": ", ".join(f"{t:.2f}" for t in tops),
            "arch": arch,
        })
    return pd.DataFrame(rows)


def _plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"baseline-static": "tab:blue", "baseline-dynamic": "tab:orange", "searched": "tab:green", "random-best": "tab:gray"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, x in zip(axes, ("MACs (M)", "params (M)")):
        for role, group in table.groupby("role", sort=False):
            ax.errorbar(group[x], group["test top-1 mean"], yerr=group["± half spread"], fmt="o", capsize=3,
                        color=colors.get(role), label=role)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test top-1 (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run both searches, retrain the picks, print the table and write ``retrain.png``."""
    parser = build_parser()
    args = parse_args(parser, argv)
    subset = train_subset(args)
    data = load_data(args.dataset, args.data_root, input_size=args.input_size, val_fraction=args.val_fraction,
                     train_subset=subset, seed=args.seed)
    recipe = TrainConfig(
        epochs=args.proxy_epochs, batch_size=args.batch_size, lr=args.lr, max_steps_per_epoch=args.max_steps_per_epoch,
        device=args.device, num_threads=args.num_threads, quiet=args.quiet,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(args, out / "config.yaml")
    for name in ("search", "random"):
        (out / name).mkdir(exist_ok=True)
    common = {"max_macs": args.max_macs, "data": data, "n_trials": args.trials, "train_config": recipe, "keep_weights": 0,
              "pruner": args.pruner}
    searched = dynas.search(args.space, sampler="tpe", run_dir=out / "search", storage=str(out / "search" / "study.log"),
                            seed=args.seed, **common)
    # Another seed: TPE's random start-up draws with --seed are the random sampler's first draws.
    random_run = dynas.search(args.space, sampler="random", run_dir=out / "random", baselines=False,
                              storage=str(out / "random" / "study.log"), seed=args.seed + 1, **common)
    print(f"search: {searched.counters}\nrandom: {random_run.counters}")
    picks = pick(searched.frame, random_run.frame, args.top)
    path = out / "retrain.jsonl"
    runs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []
    retrain = dataclasses.replace(recipe, epochs=args.retrain_epochs)
    with path.open("a", encoding="utf-8") as log:
        for seed in args.seeds:
            for entry in picks:
                arch = ArchSpec.from_dict(json.loads(entry["arch_json"])).to_str()
                if any(r["arch"] == arch and r["seed"] == seed and r["role"] == entry["role"] for r in runs):
                    continue
                runs.append(_retrain(entry, data, retrain, seed))
                log.write(json.dumps(runs[-1]) + "\n")
                log.flush()
    wanted = {(e["role"], ArchSpec.from_dict(json.loads(e["arch_json"])).to_str()) for e in picks}
    table = summarise([r for r in runs if (r["role"], r["arch"]) in wanted and r["seed"] in args.seeds])
    table.to_csv(out / "retrain.csv", index=False)
    _plot(table, out / "retrain.png")
    print(table.drop(columns="arch").to_markdown(index=False, floatfmt=".2f"))
    for _, row in table.iterrows():
        print(f"{row['role']}: {row['arch']}")
    print(f"results: {out / 'retrain.csv'}, {out / 'retrain.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
