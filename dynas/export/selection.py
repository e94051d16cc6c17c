"""Which trials of a run to export: the best, the top k, the Pareto front, or numbered ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dynas.checks import check_choice, check_int
from dynas.errors import DynasError
from dynas.results import pareto_front

__all__ = ["SELECTIONS", "checkpoint_path", "rows_for", "select_trials"]

SELECTIONS = ("best", "top", "pareto")


def select_trials(frame: Any, select: str, top: int = 3) -> list[dict]:
    """Rows of the completed trials to export: the best, the top ``top``, or the Pareto front."""
    check_choice("select", select, SELECTIONS)
    check_int("top", top, 1)
    done = frame[frame["state"] == "complete"].sort_values("val_top1", ascending=False, kind="stable")
    if done.empty:
        raise DynasError("the run has no completed trial to export.")
    chosen = pareto_front(frame) if select == "pareto" else done.head(1 if select == "best" else top)
    return chosen.to_dict("records")


def rows_for(frame: Any, select: str, top: int, trials: list[int] | None, run_dir: Path) -> list[dict]:
    """The rows of ``trials`` (each a completed trial of the run), or of ``select``."""
    if trials is None:
        return select_trials(frame, select, top)
    known = sorted(int(t) for t in frame.loc[frame["state"] == "complete", "trial"])
    rows = []
    for number in dict.fromkeys(trials):  # a trial named twice is exported once
        match = frame[(frame["trial"] == number) & (frame["state"] == "complete")]
        if match.empty:
            raise DynasError(
                f"`trial` must be a completed trial of run {str(run_dir)!r}, but got trial={number}; "
                f"completed trials: {', '.join(map(str, known)) or 'none'}."
            )
        rows.append(match.iloc[0].to_dict())
    return rows


def checkpoint_path(run_dir: Path, row: dict) -> Path:
    """The kept weights of ``row``'s trial; an error saying how to retrain when they were not kept."""
    path = run_dir / row["checkpoint"] if row.get("checkpoint") else None
    if path is None or not path.is_file():
        raise DynasError(
            f"the weights of trial {row['trial']} of run {str(run_dir)!r} were not kept (only the best "
            f"trials keep theirs, see --keep-weights); export it with --retrain-epochs N to retrain it."
        )
    return path
