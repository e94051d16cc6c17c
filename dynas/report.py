"""Report of a run directory: where does dynamic convolution pay off?

:func:`write_report` writes ``report.md`` and its figures into the run directory and returns the
markdown (what ``report RUN_DIR`` prints):

* the run's settings, its trials by state, and the best searched architecture against the best
  all-static and the best all-dynamic one within the budget;
* ``results.png``: val top-1 vs MACs of every trained trial, static-only, mixed and all-dynamic
  apart (pruned trials hollow, at their last epoch), the budget and the Pareto front;
* ``blocks.png``: per block, how often it is dynamic, and with which K, among the best quarter
  of completed trials against the rest;
* ``entropy.png``: the attention entropy of each dynamic layer of the best trial;
* ``optuna_history.png`` and ``optuna_importance.png``: Optuna's own plots of the study.

Damaged input never stops a report: values that cannot be read are listed and left out, a figure
that cannot be drawn is one line saying why, and the report of a folder that cannot be written is
still printed.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dynas.config import read_run_config
from dynas.cost import parse_count
from dynas.errors import DynasError
from dynas.results import COLUMNS, STATES, ResultsTable, pareto_front
from dynas.spec import ArchSpec

__all__ = [
    "COLLAPSED_NATS",
    "KINDS",
    "Plot",
    "Run",
    "block_shares",
    "entropy_table",
    "optuna_plots",
    "plot_blocks",
    "plot_entropy",
    "plot_results",
    "read_run",
    "write_report",
]

COLLAPSED_NATS = 0.1
"""Attention entropy below which a dynamic layer effectively uses one kernel (uniform K=4: 1.39)."""

KINDS = ("static", "mixed", "all-dynamic")
"""static: no dynamic block (``dynamic_blocks == 0``); all-dynamic: every block dynamic; mixed: the rest."""

_NUMBERS = (
    "macs", "params", "dynamic_blocks", "val_top1", "best_val_top1", "tau_start", "anneal_fraction", "epochs",
    "train_seconds", "latency_ms",
)
_STYLE = {"static": ("o", "tab:blue"), "mixed": ("^", "tab:orange"), "all-dynamic": ("s", "tab:red")}
_FIGURES = ("results.png", "blocks.png", "entropy.png", "optuna_history.png", "optuna_importance.png")
_LAYER = re.compile(r"stages\.(\d+)\.(\d+)\.")  # a dynamic layer's module name -> its block


@dataclass
class Run:
    """A run directory read for a report.

    ``frame`` holds the results rows with every number a float (NaN where missing or unreadable)
    and these derived columns: ``origin`` (``"search"`` where the run has none), ``block_kernels``
    (``{"s1_b1": K, ...}``, stages and blocks counted from 1 as the samplers' labels are; empty
    when the arch cannot be read), ``head_kernels``, ``n_blocks``, ``kind`` (one of :data:`KINDS`,
    or ``"unknown"``), ``shown_top1`` (val top-1 at the last epoch trained) and
    ``min_attention_entropy``.
    """

    run_dir: Path
    frame: pd.DataFrame
    settings: dict[str, Any]
    max_macs: float | None = None
    max_params: float | None = None
    notes: list[str] = field(default_factory=list)  # what could not be read, one line each

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name

    def completed(self) -> pd.DataFrame:
        """Completed trials with a val top-1, best first (ties: the earlier trial)."""
        done = self.frame[(self.frame["state"] == "complete") & self.frame["val_top1"].notna()]
        return done.sort_values(["val_top1", "trial"], ascending=[False, True])

    def within_budget(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The rows of ``frame`` whose MACs and params fit the run's budget."""
        keep = pd.Series(True, index=frame.index)
        if self.max_macs is not None:
            keep &= frame["macs"] <= self.max_macs
        if self.max_params is not None:
            keep &= frame["params"] <= self.max_params
        return frame[keep]


@dataclass(frozen=True)
class Plot:
    """A rendered figure: its file name in the run directory, its PNG bytes, the values drawn."""

    name: str
    png: bytes
    data: pd.DataFrame  # one row per mark drawn


# ----------------------------------------------------------------------------- reading a run


def read_run(run_dir: str | os.PathLike) -> Run:
    """The results and settings of ``run_dir``, cleaned; what could not be read is in ``notes``.

    Raises:
        DynasError: ``run_dir`` has no ``results.jsonl``.
    """
    run_dir = Path(run_dir)
    notes: list[str] = []
    frame = _clean(_read_rows(run_dir, notes), notes)
    try:
        settings = read_run_config(run_dir)
    except (DynasError, OSError) as err:
        settings = {}
        notes.append(f"config.yaml could not be read ({_why(err)}); the settings are unknown.")
    max_macs, max_params = _limit(settings, "max_macs", notes), _limit(settings, "max_params", notes)
    return Run(run_dir, frame, settings, max_macs, max_params, notes)


def _read_rows(run_dir: Path, notes: list[str]) -> pd.DataFrame:
    """The rows of results.jsonl that parse, with every key they have (columns newer than this dynas too)."""
    jsonl = ResultsTable(run_dir).jsonl
    if not jsonl.is_file():
        raise DynasError(f"{str(run_dir)!r} is not a dynas run directory (no results.jsonl in it).")
    rows = []
    text = jsonl.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # e.g. the half-written last line of a killed worker
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            notes.append(f"line {number} of results.jsonl is not a JSON row; it is left out.")
    frame = pd.DataFrame(rows)
    return frame.reindex(columns=[*COLUMNS, *(c for c in frame.columns if c not in COLUMNS)])


def _clean(frame: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """Numbers as floats, the derived columns added (see :class:`Run`)."""
    frame = frame.reset_index(drop=True)
    frame["trial"] = _numbers(frame, "trial", notes, lambda i: f"row {i + 1}")
    for column in _NUMBERS:
        frame[column] = _numbers(frame, column, notes, lambda i: f"trial {_trial(frame.at[i, 'trial'])}")
    origin = frame["origin"] if "origin" in frame else pd.Series("search", index=frame.index)
    frame["origin"] = origin.map(lambda v: v if isinstance(v, str) and v else "search")
    frame["state"] = frame["state"].map(lambda v: v if isinstance(v, str) else "?")
    unknown = sorted(set(frame["state"]) - set(STATES))
    if unknown:
        notes.append(f"unknown state(s) {', '.join(map(repr, unknown))}: such trials are counted, not plotted.")
    _add_arch_columns(frame, notes)
    _add_training_columns(frame, notes)
    missing = frame[(frame["state"] == "complete") & frame[["val_top1", "macs"]].isna().any(axis=1)]
    if not missing.empty:
        notes.append(f"{_trials(missing)} completed without a readable val_top1 or macs; left out of rankings and plots.")
    return frame


def _numbers(frame: pd.DataFrame, column: str, notes: list[str], who: Callable[[int], str]) -> pd.Series:
    """``frame[column]`` as finite floats; values given but unreadable become NaN and a note."""
    raw = frame[column]
    values = pd.to_numeric(raw.map(lambda v: np.nan if isinstance(v, bool) else v), errors="coerce").astype(float)
    values = values.where(np.isfinite(values))
    given = raw.map(lambda v: v is not None and not (isinstance(v, float) and math.isnan(v)))
    bad = list(frame.index[values.isna() & given])
    if bad:
        shown = ", ".join(f"{who(i)}: {raw[i]!r}" for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        notes.append(f"`{column}` is not a finite number in {len(bad)} row(s) ({shown}); read as missing.")
    return values


def _add_arch_columns(frame: pd.DataFrame, notes: list[str]) -> None:
    archs = [_arch(a, j) for a, j in zip(frame["arch"], frame["arch_json"])]
    frame["block_kernels"] = [_block_kernels(a) for a in archs]
    frame["head_kernels"] = [a.head_num_kernels if a else np.nan for a in archs]
    frame["n_blocks"] = [len(a.blocks) if a else np.nan for a in archs]
    counted = [sum(k > 1 for k in b.values()) if b else np.nan for b in frame["block_kernels"]]
    dynamic = frame["dynamic_blocks"].fillna(pd.Series(counted, index=frame.index, dtype=float))
    frame["kind"] = [_kind(d, n) for d, n in zip(dynamic, frame["n_blocks"])]
    unread = frame[[a is None for a in archs]]
    if not unread.empty:
        notes.append(f"the arch of {_trials(unread)} cannot be read (neither `arch` nor `arch_json`); its blocks are unknown.")


def _arch(text: Any, data: Any) -> ArchSpec | None:
    try:
        return ArchSpec.from_str(text)
    except (ValueError, TypeError):
        pass
    try:
        return ArchSpec.from_dict(json.loads(data))
    except (ValueError, TypeError):
        return None


def _block_kernels(arch: ArchSpec | None) -> dict[str, int]:
    if arch is None:
        return {}
    return {f"s{i}_b{j}": b.num_kernels for i, stage in enumerate(arch.stages, 1) for j, b in enumerate(stage.blocks, 1)}


def _kind(dynamic: float, n_blocks: float) -> str:
    if math.isnan(dynamic):
        return "unknown"
    if dynamic == 0:
        return "static"
    return "all-dynamic" if dynamic == n_blocks else "mixed"


def _add_training_columns(frame: pd.DataFrame, notes: list[str]) -> None:
    history = frame["val_top1_history"].map(_finite_list)
    last = history.map(lambda h: h[-1] if h else np.nan)
    frame["shown_top1"] = last.fillna(frame["val_top1"])
    entropy = frame["attention_entropy"].map(_finite_dict)
    damaged = frame[[e is None for e in entropy]]
    if not damaged.empty:
        notes.append(f"the attention entropies of {_trials(damaged)} are not numbers per layer; left out.")
    frame["attention_entropy"] = entropy.map(lambda e: e or {})
    frame["min_attention_entropy"] = frame["attention_entropy"].map(lambda e: min(e.values()) if e else np.nan).astype(float)


def _finite_list(value: Any) -> list[float]:
    if not isinstance(value, list):
        return []
    return [float(v) for v in value if _is_finite(v)]


def _finite_dict(value: Any) -> dict[str, float] | None:
    """The layer -> nats mapping; None when it is damaged."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {}
    if not isinstance(value, dict) or not all(_is_finite(v) for v in value.values()):
        return None
    return {str(k): float(v) for k, v in value.items()}


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _limit(settings: dict[str, Any], key: str, notes: list[str]) -> float | None:
    value = settings.get(key)
    if value is None:
        return None
    try:
        return float(parse_count(value))
    except ValueError:
        notes.append(f"config.yaml: `{key}` = {value!r} is not a count such as 5M; that budget is left out.")
        return None


# ----------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    return Figure(figsize=(width, height), layout="constrained")


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def plot_results(run: Run) -> Plot:
    """``results.png``: val top-1 vs MACs of every trained trial, kinds apart, budget and Pareto front.

    Raises:
        ValueError: no trained trial has both MACs and a val top-1.
    """
    frame = run.frame
    points = frame[frame["state"].isin(["complete", "pruned"]) & frame["kind"].isin(KINDS)]
    points = points.dropna(subset=["macs", "shown_top1"])
    if points.empty:
        raise ValueError("no trained trial has MACs and a val top-1 to plot.")
    fig = _figure(7.2, 4.8)
    ax = fig.subplots()
    for kind in KINDS:
        marker, color = _STYLE[kind]
        done = points[(points["kind"] == kind) & (points["state"] == "complete")]
        pruned = points[(points["kind"] == kind) & (points["state"] == "pruned")]
        ax.scatter(done["macs"] / 1e6, done["shown_top1"], marker=marker, color=color, alpha=0.85,
                   label=f"{kind} ({len(done)})")
        ax.scatter(pruned["macs"] / 1e6, pruned["shown_top1"], marker=marker, facecolors="none", edgecolors=color,
                   alpha=0.85)
    n_pruned = int((points["state"] == "pruned").sum())
    if n_pruned:
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="gray",
                   label=f"pruned, at its last epoch ({n_pruned})")
    _draw_front_and_budget(ax, run)
    for row in points[points["origin"].astype(str).str.startswith("baseline")].itertuples():
        ax.annotate(row.origin, (row.macs / 1e6, row.shown_top1), xytext=(4, -10), textcoords="offset points",
                    fontsize=7)
    ax.set(xlabel="MACs (millions, batch 1)", ylabel="validation top-1 (%)", title=f"run {run.name}: trained trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return Plot("results.png", _png(fig), points[["trial", "origin", "state", "kind", "macs", "shown_top1"]])


def _front(run: Run) -> pd.DataFrame:
    """The Pareto front of the completed trials (``pareto_front`` cannot take a frame without any)."""
    done = run.completed().dropna(subset=["macs"])
    return pareto_front(done) if not done.empty else done


def _draw_front_and_budget(ax: Any, run: Run) -> None:
    front = _front(run).sort_values("macs")
    if not front.empty:
        ax.step(front["macs"] / 1e6, front["val_top1"], where="post", color="gray", lw=1,
                label=f"Pareto front ({len(front)})")
    if run.max_macs is not None:
        ax.axvline(run.max_macs / 1e6, color="black", ls="--", lw=1, label=f"budget {run.max_macs / 1e6:.2f}M MACs")


def _best_quarter(run: Run) -> tuple[pd.DataFrame, pd.DataFrame]:
    done = run.completed()
    done = done[done["block_kernels"].map(bool)]
    if len(done) < 2:
        raise ValueError(
            f"the per-block picture needs at least 2 completed trials with a readable arch, but the run has {len(done)}."
        )
    n_best = max(1, len(done) // 4)
    return done.iloc[:n_best], done.iloc[n_best:]


def block_shares(run: Run) -> pd.DataFrame:
    """Per block and group (best quarter / rest): trials having the block, and how many chose each K.

    Columns: ``block``, ``group``, ``trials``, ``num_kernels`` (1 = static), ``count``, ``share``.
    """
    return _shares(*_best_quarter(run))


def _shares(best: pd.DataFrame, rest: pd.DataFrame) -> pd.DataFrame:
    labels = sorted({b for kernels in [*best["block_kernels"], *rest["block_kernels"]] for b in kernels}, key=_block_order)
    rows = []
    for group, part in (("best quarter", best), ("rest", rest)):
        for label in labels:
            chosen = pd.Series([k[label] for k in part["block_kernels"] if label in k], dtype=int)
            for num_kernels, count in sorted(chosen.value_counts().items()):
                rows.append({"block": label, "group": group, "trials": len(chosen), "num_kernels": num_kernels, "count": count})
    shares = pd.DataFrame(rows, columns=["block", "group", "trials", "num_kernels", "count"])
    shares["share"] = shares["count"] / shares["trials"]
    return shares


def _block_order(label: str) -> tuple[int, int]:
    stage, block = re.fullmatch(r"s(\d+)_b(\d+)", label).groups()
    return int(stage), int(block)


def plot_blocks(run: Run) -> Plot:
    """``blocks.png``: per block, the share of trials making it dynamic, stacked by K, best quarter vs rest.

    Raises:
        ValueError: fewer than 2 completed trials with a readable arch.
    """
    import matplotlib

    best, rest = _best_quarter(run)
    shares = _shares(best, rest)
    labels = list(dict.fromkeys(shares["block"]))
    dynamic = shares[shares["num_kernels"] > 1]
    kernels = sorted(dynamic["num_kernels"].unique())
    colors = matplotlib.colormaps["viridis"](np.linspace(0.15, 0.85, max(len(kernels), 1)))
    fig = _figure(max(6.4, 0.55 * len(labels) + 2.0), 4.4)
    ax = fig.subplots()
    x = np.arange(len(labels))
    for offset, group, style in ((-0.2, "best quarter", {}), (0.2, "rest", {"alpha": 0.45, "hatch": "///"})):
        bottom = np.zeros(len(labels))
        for k, color in zip(kernels, colors):
            part = dynamic[(dynamic["group"] == group) & (dynamic["num_kernels"] == k)].set_index("block")["share"]
            height = part.reindex(labels).fillna(0.0).to_numpy() * 100
            ax.bar(x + offset, height, 0.38, bottom=bottom, color=color, edgecolor="white", **style)
            bottom += height
        _bar_counts(ax, x + offset, bottom, shares[shares["group"] == group], labels)
    _blocks_legend(ax, kernels, colors, best, rest)
    ax.set_xticks(x, labels, rotation=45 if len(labels) > 8 else 0, ha="right" if len(labels) > 8 else "center")
    ax.set(ylim=(0, 108), ylabel="trials with the block dynamic (%)",
           title="where trials use dynamic conv: left bar best quarter, right bar the rest (dynamic/trials above)")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    return Plot("blocks.png", _png(fig), shares)


def _bar_counts(ax: Any, x: np.ndarray, tops: np.ndarray, shares: pd.DataFrame, labels: list[str]) -> None:
    """``dynamic/trials`` above each bar: a share of 1 trial is not one of 20."""
    trials = shares.groupby("block")["trials"].first().reindex(labels)
    dynamic = shares[shares["num_kernels"] > 1].groupby("block")["count"].sum().reindex(labels).fillna(0)
    for xi, top, d, n in zip(x, tops, dynamic, trials):
        if not math.isnan(n):
            ax.text(xi, top + 1, f"{d:.0f}/{n:.0f}", ha="center", va="bottom", fontsize=6)


def _blocks_legend(ax: Any, kernels: list[int], colors: Any, best: pd.DataFrame, rest: pd.DataFrame) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=f"K={k}") for k, c in zip(kernels, colors)]
    cut = best["val_top1"].min()
    handles += [
        Patch(facecolor="gray", label=f"best quarter: {len(best)} trials, val top-1 >= {cut:.2f}%"),
        Patch(facecolor="gray", alpha=0.45, hatch="///", label=f"rest: {len(rest)} trials"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _entropy_trial(run: Run) -> tuple[pd.Series, str]:
    """The best completed trial with attention entropies, and a phrase saying which it is."""
    done = run.completed()
    if done.empty:
        raise ValueError("no completed trial.")
    best = done.iloc[0]
    if best["attention_entropy"]:
        return best, f"trial {_trial(best['trial'])}, the best"
    with_entropy = done[done["attention_entropy"].map(bool)]
    if with_entropy.empty:
        raise ValueError("no completed trial recorded attention entropies.")
    why = "is all-static" if best["kind"] == "static" else "recorded none"
    row = with_entropy.iloc[0]
    best_trial = _trial(best["trial"])
    return row, f"trial {_trial(row['trial'])}, the best with dynamic layers (the best trial, {best_trial}, {why})"


def entropy_table(run: Run) -> tuple[pd.DataFrame, str]:
    """Per dynamic layer of the best trial: K, entropy and uniform entropy ln K, in nats."""
    row, which = _entropy_trial(run)
    layers = []
    for layer, nats in row["attention_entropy"].items():
        k = _layer_kernels(layer, row)
        uniform = math.log(k) if k > 1 else np.nan
        layers.append({"layer": layer, "num_kernels": k, "entropy_nats": nats, "uniform_nats": uniform})
    return pd.DataFrame(layers), which


def _layer_kernels(layer: str, row: pd.Series) -> float:
    match = _LAYER.match(layer)
    if match:
        return float(row["block_kernels"].get(f"s{int(match[1]) + 1}_b{int(match[2]) + 1}", np.nan))
    return float(row["head_kernels"]) if layer.startswith("head.") else np.nan


def plot_entropy(run: Run) -> Plot:
    """``entropy.png``: attention entropy per dynamic layer of the best trial, against ln K and collapse.

    Raises:
        ValueError: no completed trial recorded attention entropies.
    """
    table, which = entropy_table(run)
    fig = _figure(7.2, 0.28 * len(table) + 1.6)
    ax = fig.subplots()
    y = np.arange(len(table))[::-1]
    colors = ["tab:red" if v < COLLAPSED_NATS else "tab:blue" for v in table["entropy_nats"]]
    ax.barh(y, table["entropy_nats"], color=colors, height=0.7)
    ax.scatter(table["uniform_nats"], y, marker="|", s=200, color="black", label="uniform over K (ln K)")
    ax.axvline(COLLAPSED_NATS, color="tab:red", ls="--", lw=1, label=f"collapsed (< {COLLAPSED_NATS} nats)")
    ax.set_yticks(y, table["layer"], fontsize=7)
    ax.set(xlabel="attention entropy (nats)", title=f"attention of {which}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return Plot("entropy.png", _png(fig), table)


# ----------------------------------------------------------------------------- Optuna's plots


def optuna_plots(run: Run) -> tuple[list[Plot], list[str]]:
    """Optuna's optimization history and parameter importances of the run's study, over trained trials.

    Returns the plots drawn and one line for each that could not be (no study, too few trials, ...).
    """
    import optuna

    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study, why = _load_study(run)
        if study is None:
            return [], [f"Optuna plots skipped: {why}"]
        return _draw_optuna(_trained_study(study))
    finally:
        optuna.logging.set_verbosity(previous)


def _load_study(run: Run) -> tuple[Any, str]:
    import optuna

    from dynas.engines.storage import default_storage, make_storage, redact_url

    url = str(run.settings.get("storage") or default_storage(run.run_dir))
    if "://" not in url and not Path(url).is_file():
        return None, f"no study file {url!r}."
    name = run.settings.get("study_name") or run.name
    try:
        storage = make_storage(url, heartbeat_interval=None)
        names = optuna.get_all_study_names(storage)
        if name not in names and len(names) == 1:
            name = names[0]
        if name not in names:
            return None, f"no study {name!r} in {redact_url(url)!r} (it holds {names})."
        return optuna.load_study(study_name=name, storage=storage), ""
    except Exception as err:  # storages raise many types: damaged file, unreachable database, ...
        return None, f"cannot read the study in {redact_url(url)!r}: {_why(err)}"


_NUMBER = "dynas:trial"  # the trial's number in the run (the copy numbers its trials afresh)


def _trained_study(study: Any) -> Any:
    """An in-memory copy of the study on val top-1 alone, without budget rejections (told as 0).

    A multi-objective study (top1-macs) keeps its first objective, so that both plots need no
    ``target`` (with one, Optuna's importance evaluator warns that it minimises it).
    """
    import optuna
    from optuna.trial import TrialState

    copy = optuna.create_study(direction=study.directions[0])
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.user_attrs.get("state") != "rejected":
            value = t.values[0] if t.values else None
            copy.add_trial(optuna.trial.create_trial(
                state=t.state, value=value, params=t.params, distributions=t.distributions,
                user_attrs={**t.user_attrs, _NUMBER: t.number}, intermediate_values=t.intermediate_values,
            ))
    return copy


def _draw_optuna(study: Any) -> tuple[list[Plot], list[str]]:
    from optuna.visualization import matplotlib as optuna_mpl

    draws = {
        "optuna_history.png": lambda: optuna_mpl.plot_optimization_history(study, target_name="val top-1 (%)"),
        "optuna_importance.png": lambda: optuna_mpl.plot_param_importances(study, target_name="val top-1 (%)"),
    }
    trials = study.get_trials(deepcopy=False)
    data = pd.DataFrame([{"trial": t.user_attrs[_NUMBER], "value": t.value} for t in trials if t.values], columns=["trial", "value"])
    plots, lines = [], []
    for name, draw in draws.items():
        try:
            plots.append(Plot(name, _optuna_png(draw), data))
        except Exception as err:  # Optuna's plots raise many types (too few trials, no parameters, ...)
            lines.append(f"({name} skipped: {_why(err)})")
    return plots, lines


def _optuna_png(draw: Callable[[], Any]) -> bytes:
    """Draw with Optuna's matplotlib backend; a warning it gives (e.g. too few trials) is a failure."""
    import matplotlib
    import optuna

    matplotlib.use("Agg")  # Optuna draws through pyplot
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(), warnings.catch_warnings(record=True) as caught:  # Optuna sets ggplot style
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = draw()
        fig = ax.figure
        try:
            if caught:
                raise ValueError(str(caught[0].message))
            labels = len(ax.get_yticklabels())
            if labels > 12:  # one bar per parameter: dynas spaces have dozens
                fig.set_size_inches(8.0, 0.24 * labels + 1.5)
            fig.set_layout_engine("constrained")
            return _png(fig)
        finally:
            plt.close(fig)


# ----------------------------------------------------------------------------- markdown


def _header(run: Run) -> list[str]:
    s = run.settings
    lines = [f"# dynas run {run.name}"]
    if s:
        parts = [f"space `{s.get('space', '?')}`", f"dataset `{s.get('dataset', '?')}`"]
        if s.get("input_size") is not None:
            parts.append(f"input {s['input_size']}x{s['input_size']}")
        parts += [f"budget {_budget(run)}", _engine(s)]
        if s.get("objective") is not None:
            parts.append(f"objective {s['objective']}")
        if s.get("trials") is not None:
            parts.append(f"{s['trials']} trials asked")
        lines.append("; ".join(parts))
    else:
        lines.append("Settings unknown: the run directory has no readable config.yaml.")
    lines.append("Trials by state: " + _counts(run.frame))
    return lines


def _budget(run: Run) -> str:
    limits = [f"<= {v / 1e6:.2f}M {unit}" for v, unit in ((run.max_macs, "MACs"), (run.max_params, "params")) if v is not None]
    if _is_finite(run.settings.get("max_latency_ms")):
        limits.append(f"<= {run.settings['max_latency_ms']:g} ms latency")
    return ", ".join(limits) or "none recorded"


def _engine(s: dict[str, Any]) -> str:
    engine = s.get("engine", "?")
    keys = ("sampler", "pruner") if engine == "optuna" else ("strategy",) if engine == "nni" else ()
    detail = ", ".join(f"{k} {s[k]}" for k in keys if s.get(k) is not None)
    return f"engine {engine}" + (f" ({detail})" if detail else "")


def _counts(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "none (results.jsonl has no rows)"
    counts = frame["state"].value_counts()
    order = [s for s in STATES if s in counts] + sorted(set(counts.index) - set(STATES))
    text = ", ".join(f"{s} {counts[s]}" for s in order)
    origins = frame["origin"].value_counts()
    if set(origins.index) != {"search"}:
        text += "; by origin: " + ", ".join(f"{o} {n}" for o, n in origins.items())
    return text


def _best_line(run: Run) -> str:
    done = run.completed()
    kinds = {
        "searched": ~done["origin"].astype(str).str.startswith("baseline"),
        "all-static": done["kind"] == "static",
        "all-dynamic": done["kind"] == "all-dynamic",
    }
    best = {name: _first(run.within_budget(done[mask])) for name, mask in kinds.items()}
    parts = []
    for name, mask in kinds.items():
        over = _first(done[mask]) if best[name] is None else None
        parts.append(f"{name} none within budget, {_describe(over)} over it" if over is not None else f"{name} {_describe(best[name])}")
    where = "(no budget recorded)" if run.max_macs is None and run.max_params is None else f"at {_budget(run)}"
    gaps = [f"searched - {name} {_gap(best['searched'], best[name])}" for name in ("all-static", "all-dynamic")]
    return f"**Best {where}:** " + "; ".join(parts) + ". **Gap:** " + ", ".join(gaps) + "."


def _first(frame: pd.DataFrame) -> pd.Series | None:
    return frame.iloc[0] if not frame.empty else None


def _describe(row: pd.Series | None) -> str:
    if row is None:
        return "none"
    return (
        f"{row['val_top1']:.2f}% (trial {_trial(row['trial'])}, {_dynamic(row)} dynamic, "
        f"{row['macs'] / 1e6:.2f}M MACs, {row['params'] / 1e6:.3f}M params)"
    )


def _gap(a: pd.Series | None, b: pd.Series | None) -> str:
    return "n/a" if a is None or b is None else f"{a['val_top1'] - b['val_top1']:+.2f} points"


def _kinds_table(run: Run) -> str:
    done = run.within_budget(run.completed())
    trained = run.frame[run.frame["state"].isin(["complete", "pruned"])]
    rows = []
    for kind in KINDS:
        part = done[done["kind"] == kind]
        top = part.iloc[0] if not part.empty else None
        rows.append({
            "kind": kind,
            "trained": int((trained["kind"] == kind).sum()),
            "completed within budget": len(part),
            "best val_top1": f"{top['val_top1']:.2f}" if top is not None else "-",
            "median val_top1": f"{part['val_top1'].median():.2f}" if top is not None else "-",
            "best trial": _trial(top["trial"]) if top is not None else "-",
            "its macs": f"{top['macs'] / 1e6:.2f}M" if top is not None else "-",
        })
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _blocks_summary(shares: pd.DataFrame) -> str:
    """The blocks whose dynamic share differs most between the best quarter and the rest."""
    shares = shares.assign(dynamic=shares["count"].where(shares["num_kernels"] > 1, 0))
    per = shares.groupby(["group", "block"]).agg(dynamic=("dynamic", "sum"), trials=("trials", "first"))
    best, rest = per.loc["best quarter"], per.loc["rest"]
    gap = (best["dynamic"] / best["trials"] - rest["dynamic"] / rest["trials"]).dropna()  # blocks both groups have
    lines = []
    for word, blocks in (("more", gap[gap > 0].sort_values(ascending=False)), ("less", gap[gap < 0].sort_values())):
        shown = [f"{b} ({_ratio(best.loc[b])} vs {_ratio(rest.loc[b])})" for b in blocks.index[:3]]
        lines.append(f"Dynamic {word} often in the best quarter than in the rest: {', '.join(shown) or 'no block'}.")
    return " ".join(lines)


def _ratio(row: pd.Series) -> str:
    return f"{row['dynamic']:.0f}/{row['trials']:.0f}"


def _entropy_section(run: Run) -> str:
    try:
        table, which = entropy_table(run)
    except ValueError as err:
        return f"## Attention entropy\n\nNo entropies to show: {err}"
    rows = pd.DataFrame({
        "layer": table["layer"],
        "K": table["num_kernels"].map(_trial),
        "entropy (nats)": table["entropy_nats"].map("{:.3f}".format),
        "uniform ln K": table["uniform_nats"].map(lambda v: f"{v:.3f}" if math.isfinite(v) else "?"),
        "": table["entropy_nats"].map(lambda v: "collapsed" if v < COLLAPSED_NATS else ""),
    })
    return f"## Attention entropy of {which}\n\n" + rows.to_markdown(index=False, disable_numparse=True)


def _collapse_warning(frame: pd.DataFrame) -> list[str]:
    """A warning when trained dynamic candidates ended with a layer's attention on one kernel."""
    trained = frame[frame["state"].isin(["complete", "pruned"]) & frame["min_attention_entropy"].notna()]
    collapsed = trained[trained["min_attention_entropy"] < COLLAPSED_NATS]
    if collapsed.empty:
        return []
    return [
        f"**Warning:** in {len(collapsed)} of {len(trained)} trained dynamic candidates some layer's "
        f"attention collapsed onto one kernel (entropy < {COLLAPSED_NATS} nats; trials "
        f"{', '.join(map(_trial, collapsed['trial'].tolist()))}). Such a layer acts as a static conv, so "
        "the search under-rates dynamic blocks; a lower peak lr or a longer tau anneal usually helps."
    ]


def _table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no completed trials)"
    rows = pd.DataFrame({
        "trial": frame["trial"].map(_trial),
        "origin": frame["origin"],
        "val_top1": frame["val_top1"].map("{:.2f}".format),
        "macs": frame["macs"].map(lambda v: f"{v / 1e6:.2f}M"),
        "params": frame["params"].map(lambda v: f"{v / 1e6:.3f}M"),
        "dynamic": [_dynamic(row) for _, row in frame.iterrows()],
        "tau_start": frame["tau_start"].map("{:g}".format),
        "train_seconds": frame["train_seconds"].map("{:.1f}".format),
        "arch": frame["arch"].map(str),
    })
    return rows.to_markdown(index=False, disable_numparse=True)


def _dynamic(row: pd.Series) -> str:
    return f"{_trial(row['dynamic_blocks'])}/{_trial(row['n_blocks'])}"


def _trial(value: Any) -> str:
    return str(int(value)) if _is_finite(value) else "?"


def _trials(rows: pd.DataFrame) -> str:
    numbers = [_trial(t) for t in rows["trial"]]
    more = ", ..." if len(numbers) > 10 else ""
    return ("trial " if len(numbers) == 1 else "trials ") + ", ".join(numbers[:10]) + more


def _why(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------------------------- the report


@dataclass
class _Figures:
    plots: dict[str, Plot]  # by file name
    skipped: dict[str, str]  # file name -> why it could not be drawn
    optuna_lines: list[str] | None  # None: not an Optuna run
    saved: set[str] = field(default_factory=set)  # the file names written

    def image(self, name: str) -> str:
        """The markdown of figure ``name``: its image, or a line saying why there is none."""
        if name in self.saved:
            return f"![{name}]({name})"
        if name in self.skipped:
            return f"({name} skipped: {self.skipped[name]})"
        return f"({name} not written)" if name in self.plots else ""


def _figures(run: Run) -> _Figures:
    """Every figure that can be drawn, and why each other one cannot."""
    plots, skipped, optuna_lines = {}, {}, None
    for name, draw in (("results.png", plot_results), ("blocks.png", plot_blocks), ("entropy.png", plot_entropy)):
        try:
            plots[name] = draw(run)
        except ValueError as err:
            skipped[name] = str(err)
    if run.settings.get("engine", "optuna") == "optuna":
        drawn, optuna_lines = optuna_plots(run)
        plots.update({p.name: p for p in drawn})
    return _Figures(plots, skipped, optuna_lines)


def _save(run_dir: Path, plots: dict[str, Plot]) -> tuple[set[str], str | None]:
    """Write the figures (atomically); remove stale ones of figures not drawn this time."""
    for name in set(_FIGURES) - set(plots):
        try:
            (run_dir / name).unlink(missing_ok=True)
        except OSError:
            pass  # a stale figure is not referenced by the new report.md
    saved: set[str] = set()
    for name, plot in plots.items():
        try:
            _write_atomic(run_dir / name, plot.png)
        except OSError as err:
            return saved, _why(err)
        saved.add(name)
    return saved, None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _markdown(run: Run, top: int, figures: _Figures) -> str:
    image = figures.image
    blocks = [image("blocks.png")]
    if "blocks.png" in figures.plots:
        blocks.insert(0, _blocks_summary(figures.plots["blocks.png"].data))
    optuna = [image(n) for n in ("optuna_history.png", "optuna_importance.png") if n in figures.plots]
    if optuna:
        optuna.insert(0, "Over the trained trials in trial order: budget rejections (told to Optuna as 0) are left "
                         "out, so the x axis counts trained trials, not trial numbers.")
    notes = "\n".join(f"- {n}" for n in run.notes)
    sections = [
        *_header(run),
        _best_line(run),
        *([f"**Data problems** (left out of what follows):\n{notes}"] if notes else []),
        *_collapse_warning(run.frame),
        "## Overview: val top-1 vs MACs\n\n" + image("results.png"),
        "## Static, mixed and all-dynamic\n\n" + _kinds_table(run),
        "## Where blocks are dynamic\n\n" + "\n\n".join(blocks),
        _entropy_section(run) + ("\n\n" + image("entropy.png") if "entropy.png" in figures.plots else ""),
        *(["## Optuna\n\n" + "\n\n".join(optuna + figures.optuna_lines)] if figures.optuna_lines is not None else []),
        f"## Top {top} by validation top-1\n\n" + _table(run.completed().head(top)),
        "## Pareto front (max val top-1, min MACs)\n\n" + _table(_front(run)),
    ]
    return "\n\n".join(sections)


def write_report(run_dir: str | os.PathLike, top: int = 10) -> str:
    """Write ``report.md`` and its figures into ``run_dir`` and return the markdown.

    A folder that cannot be written still gets its report returned, with a last line saying so.

    Raises:
        DynasError: ``run_dir`` has no ``results.jsonl``.
    """
    run = read_run(run_dir)
    figures = _figures(run)
    figures.saved, failure = _save(run.run_dir, figures.plots)
    text = _markdown(run, top, figures)
    if failure is None:
        try:
            _write_atomic(run.run_dir / "report.md", (text + "\n").encode("utf-8"))
        except OSError as err:
            failure = _why(err)
    if failure is not None:
        where = str(run.run_dir)
        text += f"\n\nCould not write report.md and the figures into {where!r} ({failure}); the report is printed only."
    return text
