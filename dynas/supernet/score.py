"""Score a subnet with inherited weights: extract it, recalibrate BatchNorm, validate top-1.

The running statistics a supernet keeps are a blend over every subnet trained through the same
channels, so a subnet is scored only after its BatchNorm statistics are recomputed on a few
training images, as Once-for-All's ``set_running_statistics`` does. That runs on the extracted
network, so scoring never changes the supernet.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynas.checks import check_int
from dynas.data import DataBundle, normalize
from dynas.errors import DynasError
from dynas.spec import ArchSpec
from dynas.supernet.model import Supernet
from dynas.training import evaluate, resolve_device

__all__ = ["SubnetScore", "recalibrate_bn", "score_subnet"]


@dataclass(frozen=True)
class SubnetScore:
    """What scoring one subnet gave.

    Attributes:
        arch: the subnet's architecture.
        top1: top-1 accuracy (%) on ``split`` with the inherited weights, after recalibration.
        split: the split scored (``"val"`` in a search).
        calib_images: training images the BatchNorm statistics were recomputed on.
        seconds: wall time of extraction, recalibration and validation.
    """

    arch: ArchSpec
    top1: float
    split: str
    calib_images: int
    seconds: float


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    data: DataBundle,
    num_images: int = 2000,
    *,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "auto",
) -> int:
    """Recompute every BatchNorm's running statistics of ``model`` on seeded training images.

    The statistics become the average over batches of the batch statistics (``momentum=None``),
    on ``num_images`` training images drawn with ``seed`` (all of them when the training split
    is smaller), without augmentation. Batches hold at least 2 images (BatchNorm's minimum on a
    1x1 map), so some hold up to ``2 * batch_size - 1``. Other layers are untouched; the
    model's train / eval mode is restored.

    Returns:
        How many images were used.
    """
    check_int("num_images", num_images, 2)
    check_int("batch_size", batch_size, 1)
    dev = resolve_device(device)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    n = min(num_images, len(data.train))
    index = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:n]
    images = data.train.images[index.sort().values]  # (n, C, H, W) uint8
    momenta = [m.momentum for m in norms]
    was_training = model.training
    model.to(dev).train()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    try:
        for chunk in torch.tensor_split(images, max(1, n // max(batch_size, 2))):
            model(normalize(chunk.to(dev), data.mean, data.std))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return n


def score_subnet(
    supernet: Supernet,
    arch: ArchSpec | Mapping[str, Any] | str | Any,
    data: DataBundle,
    *,
    calib_images: int = 2000,
    seed: int = 0,
    split: str = "val",
    batch_size: int = 256,
    device: str | torch.device = "auto",
    amp: str = "auto",
) -> SubnetScore:
    """Top-1 of ``arch`` with the supernet's weights, after BatchNorm recalibration.

    Args:
        supernet: a trained supernet (it is not modified).
        arch: an architecture of the supernet's space (see :meth:`Supernet.resolve`); its
            ``tau_start`` / ``anneal_fraction`` play no part: the inherited weights were trained
            on the supernet's own schedule and run at the supernet's current temperature.
        data: the dataset; ``calib_images`` of its training images recalibrate BatchNorm.
        calib_images: images for the recalibration (>= 2).
        seed: which training images recalibrate.
        split: the split validated on (``"val"``; a search never looks at ``"test"``).
        batch_size: images per batch, recalibration and validation.
        device, amp: as in :func:`dynas.training.evaluate`.

    Raises:
        DynasError: ``arch`` is not in the supernet's space, or ``data`` does not fit it.
    """
    start = time.perf_counter()
    supernet.check_data(data)
    data.split(split)  # a typo in `split` fails before any work
    model = supernet.extract(arch)
    used = recalibrate_bn(model, data, calib_images, seed=seed, batch_size=batch_size, device=device)
    top1 = evaluate(model, data, split, batch_size=batch_size, device=device, amp=amp)
    return SubnetScore(
        arch=model.arch, top1=top1, split=split, calib_images=used, seconds=time.perf_counter() - start
    )
