"""Command-line options every benchmark shares, and its results as JSON and a markdown table.

Both files record what a number depends on (date, commit, torch, threads, clock, the command),
so results of different commits can be compared: ``--out X.json`` for tools, ``--md X.md`` for
the README.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _timing import CLOCKS, environment

__all__ = ["add_output_args", "add_run_args", "markdown_table", "write_results"]

_REPO = Path(__file__).resolve().parent.parent


def add_run_args(parser: argparse.ArgumentParser, rounds: int = 15) -> None:
    """``--threads``, ``--rounds``, ``--warmup``, ``--clock`` (see ``_timing.compare``)."""
    run = parser.add_argument_group("run")
    run.add_argument("--threads", type=int, default=2, help="intra-op threads, fixed (default 2)")
    run.add_argument("--rounds", type=int, default=rounds, help=f"timed rounds (default {rounds})")
    run.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    run.add_argument("--clock", choices=CLOCKS, default="wall",
                     help="wall time, or process CPU time on a busy machine (with OMP_WAIT_POLICY=PASSIVE)")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--out`` (JSON) and ``--md`` (markdown table)."""
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, help="write the results as JSON here")
    out.add_argument("--md", type=Path, help="write the results as a markdown table here")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table of already formatted cells (``str()`` of each), by ``DataFrame.to_markdown``."""
    import pandas as pd

    frame = pd.DataFrame([[str(cell) for cell in row] for row in rows], columns=list(header))
    return frame.to_markdown(index=False, disable_numparse=True)


def _commit() -> str:
    """The checked-out commit, with ``+dirty`` when tracked files differ from it (read-only git)."""
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        # GIT_OPTIONAL_LOCKS=0: no opportunistic index refresh, the repository is left untouched.
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
        return subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, check=False, env=env)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown"
    dirty = git("diff", "--no-ext-diff", "--quiet", "HEAD", "--").returncode != 0
    return head.stdout.strip() + ("+dirty" if dirty else "")


def write_results(
    script: str,
    argv: Sequence[str],
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    table: str,
) -> None:
    """Print ``table`` and write the results where ``args.out`` / ``args.md`` say.

    Args:
        script: the benchmark's file (``__file__``), named in the recorded command.
        argv: the arguments it was run with.
        args: the parsed arguments (recorded in the JSON).
        rows: one dict per result row (JSON-serialisable).
        table: the rows as a markdown table.
    """
    command = f"python benchmarks/{Path(script).name} {shlex.join(argv)}".rstrip()
    env = environment()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "command": command,
    }
    print()
    print(table)
    if args.out is not None:
        options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        result = {"benchmark": Path(script).stem, **meta, "environment": env, "args": options, "rows": rows}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    if args.md is not None:
        clock = f", clock {args.clock}" if hasattr(args, "clock") else ""
        header = (
            f"`{command}`\n\n{meta['date']}, commit {meta['commit']}, torch {env['torch']}, "
            f"{env['threads']} threads{clock}, OMP_WAIT_POLICY={env['omp_wait_policy']}, "
            f"{env['cpu_count']} CPUs\n"
        )
        args.md.write_text(f"{header}\n{table}\n")
        print(f"wrote {args.md}")
