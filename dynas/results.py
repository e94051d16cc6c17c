"""One results table for every search engine: a pandas DataFrame kept as CSV and JSON lines.

Each finished trial appends one row to ``results.jsonl`` (append-only, one JSON object a line, so
a crash loses at most the trial in flight); ``results.csv`` is rewritten from it after each row so
spreadsheets always see the whole table. Columns carry their unit.

A full disk or a crash never makes a run unreadable: a failed append is cut back to the rows before
it, and a torn last line (a crash mid-append) is cut off on the next read or append, after a copy
of the whole file is kept beside it. Any other line that is not a row stops the run with its number.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dynas.errors import DynasError

__all__ = [
    "COLUMNS",
    "STATES",
    "ResultsTable",
    "TrialRecord",
    "append_durably",
    "cannot_write",
    "cut_torn_tail",
    "load_results",
    "pareto_front",
    "scan_json_lines",
]

logger = logging.getLogger(__name__)

STATES = ("complete", "pruned", "rejected", "failed", "duplicate", "interrupted")
"""complete: trained to the end; pruned: stopped early by the pruner; rejected: over budget, never
trained; failed: training raised (e.g. NaN loss); duplicate: same architecture and temperature
settings as an earlier trial, whose result was reused; interrupted: stopped by SIGINT/SIGTERM."""


@dataclass
class TrialRecord:
    """One row of the results table."""

    trial: int
    engine: str
    state: str
    arch: str  # one-line string form of the ArchSpec
    arch_json: str  # canonical JSON of the ArchSpec
    macs: int
    params: int
    dynamic_blocks: int  # blocks with dynamic convs (DY with K >= 2, ODConv, DCD)
    val_top1: float = math.nan  # %, at the last epoch trained
    best_val_top1: float = math.nan  # %, best epoch
    tau_start: float = math.nan
    anneal_fraction: float = math.nan
    epochs: int = 0
    train_seconds: float = 0.0
    latency_ms: float = math.nan
    reason: str = ""  # why rejected / pruned / failed, or which trial a duplicate reused
    checkpoint: str = ""  # path of the kept weights, relative to the run directory
    val_top1_history: list[float] = field(default_factory=list)
    attention_entropy: dict[str, float] = field(default_factory=dict)
    params_json: str = ""  # the sampler's flat dict of choices
    origin: str = "search"  # who proposed it: search, baseline-static, baseline-dynamic, enqueued
    fidelity: str = "scratch"  # how val_top1 was measured: scratch (trained), supernet (inherited weights), objective (yours)

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"`state` must be one of {STATES}, but got state={self.state!r}.")


COLUMNS = list(TrialRecord.__dataclass_fields__)
# Columns without a default: every row has them, whichever dynas version wrote it.
_REQUIRED = [
    name for name, spec in TrialRecord.__dataclass_fields__.items()
    if spec.default is MISSING and spec.default_factory is MISSING
]


class ResultsTable:
    """Append-only results of one run directory."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "results.jsonl"
        self.csv = self.run_dir / "results.csv"

    def append(self, record: TrialRecord) -> None:
        """Add one row, synced to disk; a DynasError, and the file as it was, if it cannot be written."""
        line = (json.dumps(asdict(record), allow_nan=True) + "\n").encode("utf-8")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with self._locked() as fd:
                self._recover(fd)  # never glue the new row onto a torn one
                append_durably(fd, line)
        except OSError as err:
            raise cannot_write(self.jsonl, err) from None
        self._write_csv()

    def records(self) -> list[dict[str, Any]]:
        if not self.jsonl.exists():
            return []
        rows, cut = scan_json_lines(self.jsonl, self.jsonl.read_bytes(), _row_problem)
        if cut is None:
            return rows
        try:
            with self._locked() as fd:  # a worker's append in flight looks torn until it ends
                return self._recover(fd)
        except OSError as err:  # a full disk or a read-only copy: read the rows, leave the file
            reason = err.strerror or err
            logger.warning("%s: cannot repair its last line (%s); reading the complete rows", self.jsonl, reason)
            return rows

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """``results.jsonl`` opened for appending, locked against the other workers of the run."""
        fd = os.open(self.jsonl, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def _recover(self, fd: int) -> list[dict[str, Any]]:
        data = self.jsonl.read_bytes()
        rows, cut = scan_json_lines(self.jsonl, data, _row_problem)
        if cut is not None:
            cut_torn_tail(self.jsonl, fd, data, cut)
        return rows

    def frame(self) -> pd.DataFrame:
        """The table as a DataFrame (one row per finished trial, in finishing order).

        ``min_attention_entropy`` (nats, derived): the lowest attention entropy of the trial's
        dynamic layers at the end of training; near 0 means some layer's attention collapsed onto
        one kernel (uniform over K kernels is ln K). NaN for static or untrained candidates.
        """
        frame = pd.DataFrame(self.records(), columns=COLUMNS)
        frame["min_attention_entropy"] = frame["attention_entropy"].map(
            lambda layers: min(layers.values()) if isinstance(layers, dict) and layers else math.nan
        ).astype(float)
        return frame

    def find_trained(self, arch_json: str, tau_start: float, anneal_fraction: float) -> dict | None:
        """The earliest completed trial with this architecture and temperature settings."""
        for row in self.records():
            if (
                row["state"] == "complete"
                and row["arch_json"] == arch_json
                and _same(row["tau_start"], tau_start)
                and _same(row["anneal_fraction"], anneal_fraction)
            ):
                return row
        return None

    def find_interrupted(self, arch_json: str, tau_start: float, anneal_fraction: float) -> int | None:
        """The number of the latest interrupted trial of this candidate that never finished since."""
        number = None
        for row in self.records():
            if row["arch_json"] == arch_json and _same(row["tau_start"], tau_start) and _same(row["anneal_fraction"], anneal_fraction):
                number = row["trial"] if row["state"] == "interrupted" else None
        return number

    def _write_csv(self) -> None:
        frame = self.frame().drop(columns=["val_top1_history", "attention_entropy"])
        tmp = self.csv.with_suffix(f".csv.{os.getpid()}.tmp")  # workers may share the folder
        try:
            frame.to_csv(tmp, index=False)
            os.replace(tmp, self.csv)
        except OSError as err:  # the rows are safe in results.jsonl; the next row rewrites the CSV
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise cannot_write(self.csv, err) from None


def _row_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"is a JSON {type(entry).__name__}, not an object"
    missing = [key for key in _REQUIRED if key not in entry]
    return f"misses the keys {missing}" if missing else None


def scan_json_lines(path: Path, data: bytes, problem: Callable[[Any], str | None]) -> tuple[list[Any], int | None]:
    """The entries of a JSON-lines file's bytes, and where to cut a torn last line (None: nothing to cut).

    A last line that is not valid JSON is a write cut short (a crash or a full disk): it is left out
    and the cut falls where it starts. A complete last entry that lacks its newline gives the cut
    ``len(data)``: keep everything, add the newline. Any other line that is not valid JSON, or that
    ``problem(entry)`` describes (a non-empty string), raises DynasError naming the file and the line.
    """
    lines = data.split(b"\n")  # the last piece is what follows the last newline
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    entries, offset = [], 0
    for i, line in enumerate(lines):
        if line.strip():
            try:
                entry = json.loads(line)
            except ValueError as err:  # UnicodeDecodeError is a ValueError too
                if i == last:
                    return entries, offset
                reason = getattr(err, "msg", "not UTF-8")
                raise _bad_line(path, i + 1, line, f"is not valid JSON ({reason})") from None
            found = problem(entry)
            if found:
                raise _bad_line(path, i + 1, line, found)
            entries.append(entry)
        offset += len(line) + 1
    return entries, (None if not data or data.endswith(b"\n") else len(data))


def _bad_line(path: Path, number: int, line: bytes, problem: str) -> DynasError:
    text = line.decode("utf-8", "replace").strip()
    value = text if len(text) <= 80 else text[:77] + "..."
    return DynasError(
        f"every line of {str(path)!r} must be one JSON object, but line {number} {problem}: {value!r}; "
        f"only a torn last line is repaired automatically: fix or delete line {number} (the file is unchanged)."
    )


def cut_torn_tail(path: Path, fd: int, data: bytes, cut: int) -> None:
    """Copy the whole file beside it, then cut it to ``cut`` bytes ending in a newline; say so in one line.

    ``fd`` is the file opened for writing (and locked against other writers); ``data`` its bytes.
    """
    backup = _backup_path(path)
    try:
        with open(backup, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            backup.unlink(missing_ok=True)
        raise
    os.ftruncate(fd, cut)
    if cut and data[cut - 1 : cut] != b"\n":
        os.pwrite(fd, b"\n", cut)
    os.fsync(fd)
    if cut == len(data):
        what = "its last line lacked its newline (a crash mid-write): added it"
    else:
        what = f"its last line was torn (a crash or a full disk mid-write): cut its {len(data) - cut} bytes"
    logger.warning("%s: %s; the file as it was is kept in %s", path, what, backup)


def _backup_path(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidates = (path.with_name(f"{path.name}.torn-{stamp}" + (f".{n}" if n else "")) for n in range(1000))
    return next(c for c in candidates if not c.exists())


def append_durably(fd: int, data: bytes) -> None:
    """Append ``data`` to ``fd`` (opened with O_APPEND, locked) and sync it; on an OSError cut it back.

    The file then holds what it held before, never a half line, and the OSError is raised again.
    """
    size = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:  # a regular file writes it all at once unless the disk fills mid-write
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):  # if even this fails, the next read cuts the torn line
            os.ftruncate(fd, size)
        raise


def cannot_write(path: str | os.PathLike, err: OSError) -> DynasError:
    """The user-facing error of a failed write (a full disk, a read-only folder, a quota)."""
    return DynasError(
        f"cannot write {str(path)!r}: {err.strerror or err}; what it held before is intact "
        f"(free some space or fix the permissions, then rerun the command)."
    )


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def pareto_front(frame: pd.DataFrame, objectives: dict[str, str] | None = None) -> pd.DataFrame:
    """Rows of completed trials not dominated in ``objectives`` (column -> "max" or "min").

    Defaults to maximising ``val_top1`` while minimising ``macs``. Sorted by the first objective.
    """
    objectives = objectives or {"val_top1": "max", "macs": "min"}
    done = frame[frame["state"] == "complete"].dropna(subset=list(objectives))
    if done.empty:
        return done
    signs = {c: (-1.0 if d == "max" else 1.0) for c, d in objectives.items()}
    values = [[signs[c] * float(row[c]) for c in objectives] for _, row in done.iterrows()]
    keep = []
    for i, vi in enumerate(values):
        dominated = any(
            all(a <= b for a, b in zip(vj, vi)) and any(a < b for a, b in zip(vj, vi))
            for j, vj in enumerate(values)
            if j != i
        )
        keep.append(not dominated)
    first = next(iter(objectives))
    return done[keep].sort_values(first, ascending=objectives[first] == "min")


def load_results(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The results table of ``run_dir``; a clear error if it is not a dynas run directory."""
    table = ResultsTable(run_dir)
    if not table.jsonl.is_file():
        raise DynasError(f"{str(run_dir)!r} is not a dynas run directory (no results.jsonl in it).")
    return table.frame()
