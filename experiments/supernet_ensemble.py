"""Rank subnets by the mean score of several supernets: Kendall tau of each supernet and of every ensemble.

Reads the results folders of ``supernet_ranking.py`` runs over the same subnets and stand-alone
truth (the same ``--num-subnets``, band, seed and ``standalone.jsonl``; the supernets differ: their
kernel bank, sandwich flags or ``--supernet-seed``), and ranks the subnets by the mean of the
supernets' inherited top-1s, as ``dynas search --evaluator supernet --supernet A.pt B.pt`` scores a
candidate. Nothing is trained or scored again: each folder's ``results.jsonl`` holds its scores.

    python experiments/supernet_ensemble.py experiments/results/supernet_ranking/residual_20ep \\
        experiments/results/supernet_ranking/separate_largest_static_20ep --size 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _args import parse_args, run
from supernet_ranking import _summary

from dynas.errors import DynasError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of defaults (flags override it)")
    parser.add_argument("runs", nargs="+", help="results folders of supernet_ranking.py (each with results.jsonl)")
    parser.add_argument("--size", type=int, default=2, help="supernets per ensemble: every combination of this many")
    parser.add_argument("--out", default=None, help="write every row of the table as JSON lines here")
    return parser


def read_scores(folder: Path) -> dict[str, dict[str, Any]]:
    """``folder/results.jsonl`` as rows by architecture (a bad folder or file: one DynasError naming it)."""
    path = folder / "results.jsonl"
    if not path.is_file():
        raise DynasError(f"results folder {str(folder)!r} has no results.jsonl (a supernet_ranking.py --out folder).")
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        by_arch = {row["arch"]: row for row in rows}
        for row in rows:
            float(row["supernet_top1"]), float(row["standalone_top1_mean"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DynasError(f"results file {str(path)!r} is not a supernet_ranking.py results table: {err}") from None
    if len(by_arch) < 2:
        raise DynasError(f"results file {str(path)!r} must hold at least 2 subnets, but holds {len(by_arch)}.")
    return by_arch


def check_same_truth(runs: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Every run must hold the same subnets with the same stand-alone top-1: one truth, several supernets."""
    (first, base), *rest = runs.items()
    for name, rows in rest:
        if set(rows) != set(base):
            raise DynasError(
                f"results folder {name!r} holds other subnets than {first!r} ({len(set(rows) ^ set(base))} differ); "
                "an ensemble needs supernet_ranking.py runs of the same --num-subnets, band and seed."
            )
        for arch, row in rows.items():
            if not math.isclose(row["standalone_top1_mean"], base[arch]["standalone_top1_mean"], abs_tol=1e-9):
                raise DynasError(
                    f"results folder {name!r} has stand-alone top-1 {row['standalone_top1_mean']} for {arch!r}, "
                    f"but {first!r} has {base[arch]['standalone_top1_mean']}: the runs must share standalone.jsonl."
                )


def _supernet_seconds(folder: Path) -> float:
    try:
        return float(json.loads((folder / "summary.json").read_text(encoding="utf-8"))["supernet_train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.nan


def ensemble_summary(members: Sequence[dict[str, dict[str, Any]]], seconds: float) -> dict[str, Any]:
    """supernet_ranking.py's summary with each subnet scored by the mean of ``members``' top-1s (seconds summed)."""
    rows = []
    for arch, row in members[0].items():
        rows.append({
            **row,
            "supernet_top1": sum(m[arch]["supernet_top1"] for m in members) / len(members),
            "score_seconds": sum(m[arch]["score_seconds"] for m in members),
        })
    return _summary(rows, len(rows[0]["standalone_top1"]), seconds)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if len(args.runs) < 2:
        raise DynasError(f"an ensemble needs at least 2 results folders, but got {len(args.runs)}.")
    if not 1 <= args.size <= len(args.runs):
        raise DynasError(f"`--size` must be an integer in [1, {len(args.runs)}] (the folders given), but got size={args.size}.")
    if len(set(args.runs)) != len(args.runs):
        raise DynasError("each results folder must be given once, but one is repeated.")
    folders = [Path(r) for r in args.runs]
    runs = {str(f): read_scores(f) for f in folders}
    check_same_truth(runs)
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise DynasError(f"--out {str(out)!r} is a folder; give a file name (e.g. ensembles.jsonl).")
    names = {str(f): f.name for f in folders}
    table = []
    for size in sorted({1, args.size}):
        for combo in itertools.combinations(runs, size):
            seconds = sum(_supernet_seconds(Path(c)) for c in combo)
            summary = ensemble_summary([runs[c] for c in combo], seconds)
            table.append({"supernets": [names[c] for c in combo], **summary})
    first = table[0]
    print(f"{first['subnets']} subnets; ceiling (stand-alone seed vs seed) {first['kendall_tau_seed_to_seed']:+.2f}, "
          f"MACs alone {first['kendall_tau_macs']:+.2f}")
    print("| supernets | Kendall tau (90% interval) | static-only | mixed | across | twins, mixed - static | s per score |")
    print("|---|---|---|---|---|---|---|")
    def f(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:+.2f}"

    for row in table:
        lo, hi = row["kendall_tau_supernet_interval"]
        print(f"| {' + '.join(row['supernets'])} | {f(row['kendall_tau_supernet'])} ({f(lo)} to {f(hi)}) | "
              f"{f(row['kendall_tau_supernet_static'])} | {f(row['kendall_tau_supernet_dynamic'])} | "
              f"{f(row['kendall_tau_supernet_across'])} | {f(row['twin_gap_supernet'])} | "
              f"{row['seconds_per_scored_subnet']:.1f} |")
    if out is not None:
        def strict(v: Any) -> Any:  # NaN is not JSON: null
            if isinstance(v, list):
                return [strict(x) for x in v]
            return None if isinstance(v, float) and math.isnan(v) else v

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps({k: strict(v) for k, v in r.items()}) + "\n" for r in table), encoding="utf-8")
        print(f"table: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
