"""Report of a run directory: the table sorted, the Pareto front, a plot of val top-1 vs MACs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dynas.errors import DynasError
from dynas.search.results import ResultsTable, pareto_front

__all__ = ["load_results", "plot_results", "write_report"]

_SHOWN = ["trial", "engine", "state", "macs", "params", "val_top1", "dynamic_blocks", "tau_start", "train_seconds", "arch"]

COLLAPSED_NATS = 0.1
"""Attention entropy below which a dynamic layer effectively uses one kernel (uniform K=4: 1.39)."""


def load_results(run_dir: Path) -> pd.DataFrame:
    """The results table of ``run_dir``; a clear error if it is not a dynas run directory."""
    table = ResultsTable(run_dir)
    if not table.jsonl.is_file():
        raise DynasError(f"{str(run_dir)!r} is not a dynas run directory (no results.jsonl in it).")
    return table.frame()


def plot_results(frame: pd.DataFrame, path: Path) -> Path:
    """Scatter val top-1 vs MACs, static-only and dynamic architectures told apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame[frame["state"] == "complete"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, mask, marker in [
        ("static only", done["dynamic_blocks"] == 0, "o"),
        ("with dynamic conv", done["dynamic_blocks"] > 0, "^"),
    ]:
        part = done[mask]
        ax.scatter(part["macs"] / 1e6, part["val_top1"], marker=marker, label=f"{label} ({len(part)})", alpha=0.8)
    front = pareto_front(frame)
    if not front.empty:
        front = front.sort_values("macs")
        ax.step(front["macs"] / 1e6, front["val_top1"], where="post", color="gray", lw=1, label="Pareto front")
    ax.set_xlabel("MACs (millions, batch 1)")
    ax.set_ylabel("validation top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dir: Path, top: int = 10) -> str:
    """Write ``report.md`` and ``report.png`` into ``run_dir`` and return the markdown."""
    frame = load_results(run_dir)
    counts = frame["state"].value_counts().to_dict()
    ranked = frame[frame["state"] == "complete"].sort_values("val_top1", ascending=False)
    front = pareto_front(frame)
    png = plot_results(frame, run_dir / "report.png")
    text = "\n\n".join(
        [
            f"# dynas run {run_dir.name}",
            "trials by state: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
            *_collapse_warning(frame),
            f"## Top {top} by validation top-1\n\n" + _markdown(ranked.head(top)),
            "## Pareto front (max val top-1, min MACs)\n\n" + _markdown(front),
            f"Plot: {png}",
        ]
    )
    (run_dir / "report.md").write_text(text + "\n", encoding="utf-8")
    return text


def _collapse_warning(frame: pd.DataFrame) -> list[str]:
    """A warning when trained dynamic candidates ended with a layer's attention on one kernel."""
    trained = frame[frame["state"].isin(["complete", "pruned"]) & frame["min_attention_entropy"].notna()]
    collapsed = trained[trained["min_attention_entropy"] < COLLAPSED_NATS]
    if collapsed.empty:
        return []
    return [
        f"**Warning:** in {len(collapsed)} of {len(trained)} trained dynamic candidates some layer's "
        f"attention collapsed onto one kernel (entropy < {COLLAPSED_NATS} nats; trials "
        f"{', '.join(map(str, collapsed['trial'].tolist()))}). Such a layer acts as a static conv, so "
        "the search under-rates dynamic blocks; a lower peak lr or a longer tau anneal usually helps."
    ]


def _markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no completed trials)"
    rows = frame[_SHOWN].copy()
    rows["macs"] = (rows["macs"] / 1e6).map("{:.2f}M".format)
    rows["params"] = (rows["params"] / 1e6).map("{:.3f}M".format)
    rows["val_top1"] = rows["val_top1"].map("{:.2f}".format)
    rows["train_seconds"] = rows["train_seconds"].map("{:.1f}".format)
    header = "| " + " | ".join(rows.columns) + " |\n|" + "---|" * len(rows.columns)
    lines = ["| " + " | ".join(str(v) for v in row) + " |" for row in rows.itertuples(index=False)]
    return "\n".join([header, *lines])
