"""Reference architectures every search trains first: the best uniform all-static and all-dynamic.

A search answers "does dynamic convolution pay off here?" only if it has trained what it is
compared with. Among the space's uniform candidates (every block the same choices, see
:meth:`dynas.spaces.SearchSpace.uniform_candidates`) these are the most expensive (MACs, then
parameters) that fit the budget:

* ``baseline-static``: every block static (K = 1);
* ``baseline-dynamic``: every block dynamic with K = 4 (the paper's K; the largest K below it
  when the space has no 4).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dynas.budget import Budget
from dynas.cost import closed_form_macs, closed_form_params, format_count
from dynas.spaces import Candidate, SearchSpace

__all__ = ["BASELINE_K", "ORIGINS", "Baseline", "baselines"]

logger = logging.getLogger(__name__)

BASELINE_K = 4
ORIGINS = ("search", "baseline-static", "baseline-dynamic", "enqueued")
"""The ``origin`` column: who proposed a trial."""


@dataclass(frozen=True)
class Baseline:
    origin: str  # "baseline-static" or "baseline-dynamic"
    candidate: Candidate


def _ks(candidate: Candidate) -> set[int]:
    """The blocks' K under DY-conv (1 = static); a block of another operator (ODConv, DCD) counts as -1."""
    return {block.num_kernels if block.op == "dy" else -1 for stage in candidate.arch.stages for block in stage.blocks}


def baselines(space: SearchSpace, budget: Budget) -> list[Baseline]:
    """The baselines of ``space`` that fit ``budget`` (a kind that cannot fit is skipped with a log line)."""
    uniform = space.uniform_candidates()
    dynamic_ks = sorted(k for c in uniform for k in _ks(c) if k > 1)
    k = BASELINE_K if BASELINE_K in dynamic_ks else max((x for x in dynamic_ks if x < BASELINE_K), default=None)
    kinds = {"baseline-static": {1}, "baseline-dynamic": {k} if k is not None else None}
    chosen = []
    for origin, ks in kinds.items():
        fitting = [c for c in uniform if ks is not None and _ks(c) == ks and budget.is_feasible(c.arch)]
        if not fitting:
            what = "all-static" if origin.endswith("static") else f"all-dynamic (K={k})"
            logger.warning("%s skipped: no uniform %s architecture of space %r fits the budget of %s MACs.",
                           origin, what, space.name, format_count(budget.max_macs))
            continue
        best = max(fitting, key=lambda c: (closed_form_macs(c.arch), closed_form_params(c.arch)))
        chosen.append(Baseline(origin, best))
    return chosen
