"""Run every benchmark into one folder: ``NAME.json`` and ``NAME.md`` each, and ``results.md``.

``results.md`` is the markdown tables of every ``NAME.md`` in the folder (also those of earlier
``--only`` runs), each under the command that made it: what ``benchmarks/README.md`` quotes. Options after ``--`` go to every timing benchmark
(ops, networks), e.g. the clock on a busy machine. Not in CI::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/run_all.py --out-dir bench-results -- --clock cpu
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import bench_counting
import bench_networks
import bench_ops
import bench_search

#: name -> (main, takes the timing options after `--`, title in results.md)
BENCHMARKS: dict[str, tuple[Callable[[Sequence[str]], int], bool, str]] = {
    "networks": (bench_networks.main, True, "Whole networks: dynamic / static"),
    "ops": (bench_ops.main, True, "Per layer: DynamicConv2d / nn.Conv2d"),
    "counting": (bench_counting.main, False, "MAC counting: closed form vs fvcore"),
    "search": (bench_search.main, False, "Search overhead"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, passed = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True, help="folder for the JSON and markdown files")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="benchmarks to run")
    args = p.parse_args(own)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only:
        run, timing, _ = BENCHMARKS[name]
        print(f"\n=== {name}", flush=True)
        paths = ["--out", str(args.out_dir / f"{name}.json"), "--md", str(args.out_dir / f"{name}.md")]
        if run((passed if timing else []) + paths) != 0:
            failed.append(name)
    sections = [
        f"### {title}\n\n" + (args.out_dir / f"{name}.md").read_text()
        for name, (_, _, title) in BENCHMARKS.items()
        if (args.out_dir / f"{name}.md").is_file()
    ]
    (args.out_dir / "results.md").write_text("\n".join(sections))
    print(f"\nwrote {args.out_dir / 'results.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
