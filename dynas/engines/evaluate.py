"""Evaluate one search candidate: budget check, duplicate check, training, one results row.

Both engines (Optuna and NNI) call :class:`CandidateEvaluator`, so a candidate is treated the same
whichever engine proposed it: over-budget candidates are rejected from the closed-form MAC count
before a model is even built, duplicates reuse the earlier result, and training failures (NaN loss)
become a ``failed`` row instead of ending the search.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import torch

from dynas.budget import Budget
from dynas.builder import build_model
from dynas.cost import closed_form_macs, closed_form_params
from dynas.data import DataBundle
from dynas.errors import DynasError
from dynas.latency import measure_latency
from dynas.results import ResultsTable, TrialRecord
from dynas.models import save_model
from dynas.spaces import Candidate
from dynas.spec import ArchSpec
from dynas.temperature import current_temperature
from dynas.training import EpochCallback, NonFiniteLossError, TrainConfig, train_candidate

__all__ = ["MAX_REJECTIONS_PER_TRIAL", "CandidateEvaluator", "SearchCounters"]

MAX_REJECTIONS_PER_TRIAL = 50
"""Rejected (over-budget) proposals cost no training, so they do not count as trials; a run stops
anyway after this many rejections per requested trial, when the sampler cannot find the budget."""

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SearchCounters:
    """What happened to the candidates of this process (the table holds every process' rows)."""

    proposed: int = 0
    rejected: int = 0
    trained: int = 0
    duplicates: int = 0
    failed: int = 0
    pruned: int = 0


class CandidateEvaluator:
    """Budget-check, train and record candidates of one search.

    Args:
        budget: hard limits; checked from the spec alone before any model is built.
        data: the search data (train / validation splits; the test split is never used).
        train_config: training settings; each candidate's tau schedule overrides
            ``tau_start``/``anneal_fraction``.
        results: the run's results table.
        keep_weights: keep the final weights of the best ``keep_weights`` trials (by val
            top-1) under ``run_dir/checkpoints``; 0 keeps none.
        on_record: called with every row appended (progress bars).
        objective: instead of training, ``objective(candidate, trial) -> float`` scores each
            feasible candidate (higher is better; ``trial`` is the engine's trial: an
            ``optuna.Trial``, or the trial number under NNI); its value is the row's
            ``val_top1``. The budget gate and duplicate handling stay the same.
        fidelity: the rows' ``fidelity`` (default ``scratch``, or ``objective`` with one).
    """

    def __init__(
        self,
        budget: Budget,
        data: DataBundle,
        train_config: TrainConfig,
        results: ResultsTable,
        keep_weights: int = 3,
        on_record: Callable[[TrialRecord], None] | None = None,
        objective: Callable[[Candidate, Any], float] | None = None,
        fidelity: str | None = None,
    ) -> None:
        self.budget = budget
        self.data = data
        self.train_config = train_config
        self.results = results
        self.keep_weights = keep_weights
        self.on_record = on_record
        self.objective = objective
        self.fidelity = fidelity or ("scratch" if objective is None else "objective")
        self.counters = SearchCounters()

    def cost(self, arch: ArchSpec) -> tuple[int, int, list[str]]:
        """Closed-form MACs and params of ``arch`` and the budget violations (empty if feasible)."""
        return closed_form_macs(arch), closed_form_params(arch), self.budget.check(arch)

    def evaluate(
        self,
        candidate: Candidate,
        trial: int,
        engine: str,
        callback: EpochCallback | None = None,
        resume_key: int | None = None,
        handle: Any = None,
        origin: str = "search",
    ) -> TrialRecord:
        """Evaluate ``candidate`` as trial number ``trial`` and append its row to the table.

        ``resume_key`` names the per-epoch training checkpoint (default: the trial number); a
        retried trial passes the number of the trial it retries, so training resumes from that
        trial's last finished epoch. A KeyboardInterrupt during training records the row as
        ``interrupted`` and is re-raised. ``handle`` is what a user ``objective`` gets as its
        ``trial`` (default: the trial number). ``origin`` (``dynas.baselines.ORIGINS``) says who
        proposed it.
        """
        self.counters.proposed += 1
        arch = candidate.arch
        macs, params, violations = self.cost(arch)
        row = TrialRecord(
            trial=trial,
            engine=engine,
            state="complete",
            arch=arch.to_str(),
            arch_json=json.dumps(arch.to_dict(), sort_keys=True),
            macs=macs,
            params=params,
            dynamic_blocks=sum(b.is_dynamic for s in arch.stages for b in s.blocks),
            tau_start=float(candidate.tau_start),
            anneal_fraction=float(candidate.anneal_fraction),
            params_json=json.dumps(dict(candidate.params), sort_keys=True, default=str),
            fidelity=self.fidelity,
            origin=origin,
        )
        if violations:
            self.counters.rejected += 1
            row.state, row.reason = "rejected", "; ".join(violations)
        elif (earlier := self.results.find_trained(row.arch_json, row.tau_start, row.anneal_fraction)) is not None:
            self.counters.duplicates += 1
            row.state, row.reason = "duplicate", f"same as trial {earlier['trial']}"
            for key in ("val_top1", "best_val_top1", "epochs", "checkpoint", "val_top1_history"):
                setattr(row, key, earlier[key])
        elif violations := self._latency_violations(arch, row):
            self.counters.rejected += 1
            row.state, row.reason = "rejected", "; ".join(violations)
        else:
            if resume_key is None:  # an engine that does not re-queue (NNI) proposing it again
                resume_key = self.results.find_interrupted(row.arch_json, row.tau_start, row.anneal_fraction)
            key = resume_key if resume_key is not None else trial
            running = self.results.run_dir / "checkpoints" / "running" / f"trial_{key:05d}.pt"
            try:
                if self.objective is not None:
                    self._score(candidate, row, trial if handle is None else handle)
                else:
                    self._train(candidate, row, callback, running)
            except KeyboardInterrupt:
                row.state, row.reason = "interrupted", "stopped by a signal; rerunning the command continues it"
                self._append(row)
                raise
            _unlink(running)
        self._append(row)
        return row

    def _latency_violations(self, arch: ArchSpec, row: TrialRecord) -> list[str]:
        """Measure batch-1 CPU latency (only when the budget limits it) before any training."""
        if self.budget.max_latency_ms is None:
            return []
        shape = (arch.in_channels, arch.input_size, arch.input_size)
        row.latency_ms = measure_latency(build_model(arch), shape, device="cpu", batch_size=1)
        return self.budget.check_latency(row.latency_ms)

    def _append(self, row: TrialRecord) -> None:
        self.results.append(row)
        if self.on_record is not None:
            self.on_record(row)

    def _score(self, candidate: Candidate, row: TrialRecord, handle: Any) -> None:
        start = time.perf_counter()
        value = self.objective(candidate, handle)  # type: ignore[misc]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DynasError(f"`objective` must return a finite number, but returned {value!r} for {row.arch!r}.")
        self.counters.trained += 1
        row.train_seconds = time.perf_counter() - start
        row.val_top1 = row.best_val_top1 = float(value)

    def _train(
        self, candidate: Candidate, row: TrialRecord, callback: EpochCallback | None, checkpoint: Path
    ) -> None:
        config = dataclasses.replace(
            self.train_config,
            tau_start=row.tau_start,
            anneal_fraction=row.anneal_fraction,
            seed=self.train_config.seed + row.trial,
        )
        torch.manual_seed(config.seed)  # the initial weights: the same trial of the same search trains the same
        model = build_model(candidate.arch)
        start = time.perf_counter()
        try:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            result = train_candidate(model, self.data, config, callback=callback, checkpoint_path=checkpoint)
        except NonFiniteLossError as err:
            self.counters.failed += 1
            row.state, row.reason = "failed", str(err)
            row.train_seconds = time.perf_counter() - start
            return
        self.counters.trained += 1
        row.train_seconds = result.train_seconds
        row.epochs = result.epochs_run
        row.val_top1_history = list(result.val_top1)
        row.val_top1 = result.val_top1[-1] if result.val_top1 else math.nan
        row.best_val_top1 = result.best_val_top1
        row.attention_entropy = dict(result.attention_entropy)
        if result.pruned:
            self.counters.pruned += 1
            row.state, row.reason = "pruned", f"stopped after epoch {result.epochs_run}"
        elif self.keep_weights > 0:
            row.checkpoint = self._keep(model, candidate.arch, row)

    def _keep(self, model: torch.nn.Module, arch: ArchSpec, row: TrialRecord) -> str:
        """Save this trial's weights if it ranks among the best ``keep_weights``; drop the rest."""
        ranked = sorted(
            (r for r in self.results.records() if r["state"] == "complete" and r["checkpoint"]),
            key=lambda r: r["val_top1"],
            reverse=True,
        )
        if len(ranked) >= self.keep_weights and row.val_top1 <= ranked[self.keep_weights - 1]["val_top1"]:
            return ""
        rel = f"checkpoints/trial_{row.trial:05d}.pt"
        path = self.results.run_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # tau is not part of the state dict: keep the one training ended at, for inference (a
        # custom or unfinished schedule may stop above tau_end).
        tau = current_temperature(model, default=self.train_config.tau_end)
        save_model(path, model, arch, tau, trial=row.trial)
        for old in ranked[self.keep_weights - 1 :]:
            _unlink(self.results.run_dir / old["checkpoint"])
        return rel


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
