"""The in-memory dataset a search trains on: uint8 image tensors split into train / val / test.

Images stay uint8 ``(N, C, H, W)`` (a quarter of the memory of float32, and a quarter of the
host-to-device traffic); they become normalized floats only batch by batch, on the device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from dynas.errors import DynasError, did_you_mean

__all__ = ["SPLITS", "Augmentation", "DataBundle", "Split", "channel_stats"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """One split: ``images`` uint8 ``(N, C, H, W)`` and ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DynasError(
                f"`images` must be a uint8 tensor (N, C, H, W), but got {self.images.dtype} "
                f"of shape {tuple(self.images.shape)}."
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DynasError(
                f"`labels` must be int64 of shape ({self.images.shape[0]},), but got "
                f"{self.labels.dtype} of shape {tuple(self.labels.shape)}."
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> Split:
        """The samples at ``index`` (a 1-D long tensor), in that order."""
        return Split(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation of a dataset (its per-dataset defaults live in the readers).

    Attributes:
        crop_padding: pixels of zero padding before a random crop back to the input size
            (4 at 32x32, scaled with the size); 0 disables the crop.
        hflip: random horizontal flips; off for digits, whose meaning a flip can change.
    """

    crop_padding: int = 4
    hflip: bool = True

    @classmethod
    def for_size(cls, input_size: int, hflip: bool) -> Augmentation:
        """The CIFAR recipe (4 px padding at 32x32) scaled to ``input_size``."""
        return cls(crop_padding=round(4 * input_size / 32), hflip=hflip)


@dataclass(frozen=True)
class DataBundle:
    """A dataset held in memory, split for a search.

    Attributes:
        name: the dataset name given to :func:`dynas.data.load_data`.
        train: the training split (after holding out ``val`` and taking any subset).
        val: seeded hold-out of the original training set; what a search ranks on.
        test: the dataset's own test split; a search never looks at it.
        class_names: one name per class, index = label.
        mean, std: per-channel statistics of ``train`` on the [0, 1] scale.
        augmentation: the dataset's default training augmentation.
    """

    name: str
    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: Augmentation = field(default_factory=Augmentation)

    def with_full_train(self) -> DataBundle:
        """The same data with the validation split folded back into training (statistics redone)."""
        train = Split(torch.cat([self.train.images, self.val.images]), torch.cat([self.train.labels, self.val.labels]))
        mean, std = channel_stats(train.images)
        return dataclasses.replace(self, train=train, mean=mean, std=std)

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are ``0 .. num_classes - 1``)."""
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        """Image channels (3 for RGB, 1 for grayscale npz data)."""
        return int(self.train.images.shape[1])

    @property
    def input_size(self) -> int:
        """Square image resolution (height = width)."""
        return int(self.train.images.shape[2])

    def split(self, name: str) -> Split:
        """The split called ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in SPLITS:
            raise DynasError(f"`split` must be one of {SPLITS}, but got {name!r}.{did_you_mean(name, SPLITS)}")
        return getattr(self, name)

    def __repr__(self) -> str:
        return (
            f"DataBundle(name={self.name!r}, train={len(self.train)}, val={len(self.val)}, "
            f"test={len(self.test)}, num_classes={self.num_classes}, "
            f"shape=({self.in_channels}, {self.input_size}, {self.input_size}))"
        )


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``images`` (N, C, H, W) on the [0, 1] scale.

    Summed chunk by chunk in float64 so that 50k images never become one big float tensor.
    """
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0  # (b, C, H, W)
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    # A constant channel would divide by ~0; fall back to 1 so normalization stays finite.
    std = torch.where(std < 1e-3, torch.ones_like(std), std)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
