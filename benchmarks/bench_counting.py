"""Speed of the closed-form MAC counter against fvcore, in architectures per second.

For every registered search space, random architectures (seeds 0, 1, ...) are counted both ways:
``closed_form_macs(arch)`` from the spec alone, and ``count_macs(arch)`` (build the model, trace
it with fvcore at batch 1). The counts must agree; the budget check of a search relies on it.
fvcore counts on one thread whatever ``--threads`` says (``count_macs`` sets it). Not in CI::

    python benchmarks/bench_counting.py --samples 20 --out counting.json --md counting.md
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import torch

from _report import add_output_args, markdown_table, write_results
from _timing import set_threads
from dynas.cost import closed_form_macs
from dynas.counting import count_macs
from dynas.spec import ArchSpec
from dynas.spaces import get_space, list_spaces


def _per_second(count: Callable[[ArchSpec], int], archs: list[ArchSpec], min_seconds: float) -> float:
    """Architectures counted per second: passes over ``archs`` until ``min_seconds`` have passed."""
    done, start = 0, time.perf_counter()
    while True:
        for arch in archs:
            count(arch)
        done += len(archs)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def bench_space(name: str, args: argparse.Namespace) -> dict[str, object]:
    """Both counters on ``args.samples`` random architectures of one space."""
    space = get_space(name)
    archs = [space.sample(seed=seed).arch for seed in range(args.samples)]
    count_macs(archs[0])  # warm-up: first trace, lazy imports
    start = time.perf_counter()
    traced = [count_macs(a).total_macs for a in archs]
    fvcore = len(archs) / (time.perf_counter() - start)
    mismatches = sum(closed_form_macs(a) != macs for a, macs in zip(archs, traced))
    closed = _per_second(closed_form_macs, archs, args.min_seconds)
    return {
        "space": name,
        "samples": len(archs),
        "input_size": archs[0].input_size,
        "closed_form_archs_per_s": closed,
        "fvcore_archs_per_s": fvcore,
        "speedup": closed / fvcore,
        "mismatches": mismatches,
    }


def _table(rows: list[dict[str, object]]) -> str:
    header = ["space", "input", "samples", "closed form arch/s", "fvcore arch/s", "speedup", "counts differ"]
    return markdown_table(header, [
        [r["space"], r["input_size"], r["samples"], f"{r['closed_form_archs_per_s']:,.0f}",
         f"{r['fvcore_archs_per_s']:.2f}", f"{r['speedup']:,.0f}x", r["mismatches"]]
        for r in rows
    ])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--threads", type=int, default=2, help="intra-op threads, fixed (default 2)")
    run.add_argument("--samples", type=int, default=20, help="random architectures per space (default 20)")
    run.add_argument("--min-seconds", type=float, default=2.0,
                     help="time the closed form over repeated passes for at least this long (default 2)")
    what = p.add_argument_group("what")
    what.add_argument("--spaces", nargs="+", default=list_spaces(), choices=list_spaces(), metavar="NAME",
                      help="registered search spaces (default: all)")
    add_output_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.samples < 1:
        raise SystemExit(f"`--samples` must be an integer >= 1, but got {args.samples}.")
    threads = set_threads(args.threads)
    print(f"torch {torch.__version__}, threads {threads}", flush=True)
    rows = []
    for name in args.spaces:
        rows.append(bench_space(name, args))
        r = rows[-1]
        print(f"{name}: closed form {r['closed_form_archs_per_s']:,.0f} arch/s, fvcore "
              f"{r['fvcore_archs_per_s']:.2f} arch/s, {r['mismatches']} mismatches", flush=True)
    write_results(__file__, argv, args, rows, _table(rows))
    return 1 if any(r["mismatches"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
