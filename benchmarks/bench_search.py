"""Overhead of a search: the share of its wall time not spent training candidates.

Runs a real search in this process -- ``run_search.main`` on the README's default job
(``experiments/default.yaml``: digits, no download) with fewer trials -- and compares its wall
time with the sum of the results table's ``train_seconds`` (training and validation epochs of
every candidate). The rest is overhead: loading data, sampling, budget checks, building models,
the Optuna study, checkpoints, the results table. Goal: at most 5%. Not in CI::

    python benchmarks/bench_search.py --out search.json --md search.md

The first trial also pays one-off costs (imports of Optuna and pandas, loading the data, torch's
first optimizer importing ``torch._dynamo``), so the share falls as ``--trials`` grows; the
default (12) is the default job's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from dynas.cli import DEFAULT_CONFIG, main
from _report import add_output_args, markdown_table, write_results

GOAL = 0.05


def run(args: argparse.Namespace, run_dir: Path) -> dict[str, object]:
    """One search into ``run_dir``; its wall time against the training time it recorded."""
    search_argv = [
        "search", "--config", str(args.config), "--run-dir", str(run_dir), "--trials", str(args.trials),
        "--num-threads", str(args.threads), "--quiet",
    ]
    if args.epochs is not None:
        search_argv += ["--epochs", str(args.epochs)]
    start = time.perf_counter()
    code = main(search_argv)
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"the search exited with {code}; arguments: {search_argv}")
    table = pd.read_csv(run_dir / "results.csv")
    train = float(table["train_seconds"].sum())
    states = table["state"].value_counts()
    return {
        "search_argv": search_argv,
        "proposed": len(table),
        "trained": int(states.get("complete", 0) + states.get("pruned", 0)),
        "rejected": int(states.get("rejected", 0)),
        "wall_s": wall,
        "train_s": train,
        "overhead_s": wall - train,
        "overhead_share": (wall - train) / wall,
    }


def _table(rows: list[dict[str, object]]) -> str:
    header = ["trained / proposed", "wall s", "training s", "overhead s", "overhead share", "goal <= 5%"]
    return markdown_table(header, [
        [f"{r['trained']} / {r['proposed']}", f"{r['wall_s']:.1f}", f"{r['train_s']:.1f}", f"{r['overhead_s']:.1f}",
         f"{r['overhead_share']:.1%}", "met" if r["overhead_share"] <= GOAL else "missed"]
        for r in rows
    ])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_group = p.add_argument_group("run")
    run_group.add_argument("--threads", type=int, default=2, help="torch threads of the search (default 2)")
    what = p.add_argument_group("what")
    what.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                      help="search config (default: the README's default job)")
    what.add_argument("--trials", type=int, default=12, help="trained trials (default 12, the default job's)")
    what.add_argument("--epochs", type=int, default=None, help="epochs per candidate (default: the config's)")
    add_output_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        row = run(args, Path(tmp) / "run")
    print(f"{row['trained']} trained of {row['proposed']} proposed: wall {row['wall_s']:.1f} s, "
          f"training {row['train_s']:.1f} s, overhead {row['overhead_share']:.1%}", flush=True)
    write_results(__file__, argv, args, [row], _table([row]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
