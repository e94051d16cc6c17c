"""Wall-clock latency of a built model: warm-up, then the median of timed forward passes.

Latency needs a built model on real hardware, so it is kept apart from the closed-form MAC and
parameter checks of :mod:`dynas.budget`, which need only the spec.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dynas.checks import check_int
from dynas.cost import input_shape
from dynas.training import torch_threads

__all__ = ["measure_latency"]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics, no dropout) for the block, then restore."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without a sync the timer measures the launch only.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    model(x)
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3


def measure_latency(
    model: nn.Module,
    input_size: int | tuple[int, ...],
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 20,
    num_threads: int | None = None,
) -> float:
    """Measure the median latency of one forward pass, in milliseconds.

    The model runs in eval mode under ``torch.no_grad`` on ``device``; its training flag and
    torch's thread count are restored afterwards. The model is moved to ``device`` (and stays
    there, as ``nn.Module.to`` moves in place).

    Args:
        model: the model to time.
        input_size: one image: an int (square, 3 channels), ``(height, width)`` (3 channels)
            or ``(channels, height, width)`` -- e.g. ``arch.input_size``.
        device: where to run (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        batch_size: images per forward pass.
        warmup: untimed passes first (allocator, cuDNN autotuning, caches).
        repeats: timed passes; the median is returned, robust to a stray slow pass.
        num_threads: torch intra-op threads during the measurement; ``None`` keeps the
            current setting. Set it explicitly to compare latencies across machines.

    Returns:
        The median latency in milliseconds (> 0).

    Raises:
        ValueError: a count is out of range, or ``input_size`` is malformed.
    """
    check_int("batch_size", batch_size, 1)
    check_int("warmup", warmup, 0)
    check_int("repeats", repeats, 1)
    if num_threads is not None:
        check_int("num_threads", num_threads, 1)
    shape = input_shape(input_size)
    device = torch.device(device)
    model.to(device)
    dtype = next(model.parameters(), torch.empty(0)).dtype
    x = torch.randn(batch_size, *shape, device=device, dtype=dtype)
    with torch_threads(num_threads), _eval_mode(model), torch.no_grad():
        for _ in range(warmup):
            model(x)
        times = [_time_ms(model, x, device) for _ in range(repeats)]
    return statistics.median(times)
