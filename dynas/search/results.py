"""One results table for every search engine: a pandas DataFrame kept as CSV and JSON lines.

Each finished trial appends one row to ``results.jsonl`` (append-only, one JSON object a line, so
a crash loses at most the trial in flight); ``results.csv`` is rewritten from it after each row so
spreadsheets always see the whole table. Columns carry their unit.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["COLUMNS", "TrialRecord", "ResultsTable", "STATES", "pareto_front"]

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
    dynamic_blocks: int  # blocks with K >= 2
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

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"`state` must be one of {STATES}, but got state={self.state!r}.")


COLUMNS = list(TrialRecord.__dataclass_fields__)


class ResultsTable:
    """Append-only results of one run directory."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "results.jsonl"
        self.csv = self.run_dir / "results.csv"

    def append(self, record: TrialRecord) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(record), allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._write_csv()

    def records(self) -> list[dict[str, Any]]:
        if not self.jsonl.exists():
            return []
        rows = []
        with self.jsonl.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
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
        frame.to_csv(tmp, index=False)
        os.replace(tmp, self.csv)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def pareto_front(frame: pd.DataFrame, objectives: dict[str, str] | None = None) -> pd.DataFrame:
    """Rows of completed trials not dominated in ``objectives`` (column -> "max" or "min").

    Defaults to maximising ``val_top1`` while minimising ``macs``. Sorted by the first objective.
    """
    objectives = objectives or {"val_top1": "max", "macs": "min"}
    done = frame[frame["state"] == "complete"].dropna(subset=list(objectives))
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
