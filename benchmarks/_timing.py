"""Side-by-side timing for benchmarks on a shared, noisy CPU.

Candidates run interleaved: every round runs each candidate once, starting at a different
candidate each round, so that a burst of load from another process hits all of them alike.
A ratio is the median over rounds of the within-round ratio, which cancels most of that load.

Two clocks: ``wall`` (latency, what a user waits for) and ``cpu`` (CPU time of the whole process,
all threads). Under heavy load from other processes, a thread that is descheduled stalls the
others at the next OpenMP barrier and wall times swing tenfold; CPU time does not count time
spent descheduled, so with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep, not spin) it
measures the work done and stays stable.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["CLOCKS", "Timing", "compare", "environment", "set_threads"]

#: name -> a clock in seconds.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class Timing:
    """One candidate's result.

    Attributes:
        median_ms: median time of one call on the chosen clock, in milliseconds.
        ratio: median over rounds of (this candidate's time / the reference's time that round).
    """

    median_ms: float
    ratio: float


def set_threads(threads: int) -> int:
    """Fix the intra-op thread count (timings are meaningless if it floats) and return it."""
    if threads < 1:
        raise ValueError(f"`threads` must be an integer >= 1, but got {threads=}.")
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def environment() -> dict[str, object]:
    """What a result depends on, stored next to it so runs on other commits can be compared."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_count": os.cpu_count(),
    }


def compare(
    fns: Mapping[str, Callable[[], object]],
    reference: Sequence[str],
    *,
    rounds: int = 15,
    warmup: int = 3,
    clock: str = "wall",
) -> dict[str, Timing]:
    """Time candidates side by side and report each as a ratio to the fastest reference.

    Args:
        fns: name -> a call to time (it must do the whole unit of work, e.g. forward+backward).
        reference: names in ``fns`` to compare against; the one with the lowest median is used
            (e.g. a static network in contiguous and in channels_last layout).
        rounds: timed rounds (each runs every candidate once).
        warmup: untimed rounds first (allocator, oneDNN primitive caches, lazy init).
        clock: ``"wall"`` or ``"cpu"`` (see the module docstring).

    Returns:
        name -> :class:`Timing`, in the order of ``fns``.
    """
    unknown = [r for r in reference if r not in fns]
    if not reference or unknown:
        raise ValueError(f"`reference` must name candidates in `fns`, but got {reference=}.")
    if clock not in CLOCKS:
        raise ValueError(f"`clock` must be one of {sorted(CLOCKS)}, but got {clock=!r}.")
    now = CLOCKS[clock]
    if rounds < 1:
        raise ValueError(f"`rounds` must be an integer >= 1, but got {rounds=}.")
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = now()
            fns[name]()
            elapsed = now() - start
            if r >= warmup:
                times[name].append(elapsed)
    ref = min(reference, key=lambda n: statistics.median(times[n]))
    return {
        n: Timing(
            median_ms=statistics.median(times[n]) * 1e3,
            ratio=statistics.median(t / t_ref for t, t_ref in zip(times[n], times[ref])),
        )
        for n in names
    }
