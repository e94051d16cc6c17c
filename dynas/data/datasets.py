"""``load_data``: read a dataset by name and split it for a search (train / val / test)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from dynas.checks import brief
from dynas.data.bundle import Augmentation, DataBundle, Split, channel_stats
from dynas.data.formats import (
    RawDataset,
    check_fits_memory,
    read_cifar10,
    read_cifar100,
    read_digits,
    read_imagefolder,
    read_npz,
)
from dynas.data.transforms import resize
from dynas.errors import DynasError, did_you_mean

__all__ = ["DATASETS", "load_data"]

_DEFAULT_SIZE = 32  # digits are upsampled to it; image folders are resized to it


def _digits(root: str | Path | None, size: int, seed: int) -> RawDataset:
    return read_digits()


def _cifar10(root: str | Path | None, size: int, seed: int) -> RawDataset:
    return read_cifar10(root)


def _cifar100(root: str | Path | None, size: int, seed: int) -> RawDataset:
    return read_cifar100(root)


def _imagefolder(root: str | Path | None, size: int, seed: int) -> RawDataset:
    return read_imagefolder(root, size, seed)


def _npz(root: str | Path | None, size: int, seed: int) -> RawDataset:
    return read_npz(root)


DATASETS: dict[str, Callable[[str | Path | None, int, int], RawDataset]] = {
    "digits": _digits,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "imagefolder": _imagefolder,
    "npz": _npz,
}
"""Dataset readers by name: ``reader(root, input_size, seed) -> RawDataset``."""


def load_data(
    name: str,
    root: str | Path | None = None,
    *,
    val_fraction: float = 0.1,
    train_subset: int | float | None = None,
    input_size: int | None = None,
    seed: int = 0,
    hflip: bool | None = None,
) -> DataBundle:
    """Read dataset ``name`` into memory and split it for a search.

    Args:
        name: one of :data:`DATASETS` (``digits`` needs no download and no ``root``).
        root: where the data is: the ``cifar-10-batches-py`` / ``cifar-100-python`` folder or
            its parent, an image folder, or an ``.npz`` file.
        val_fraction: share of the training set held out (seeded) as the validation split a
            search ranks on; the test split is never touched by a search.
        train_subset: keep only this many (int) or this share (float in (0, 1]) of the remaining
            training images, seeded: a cheaper proxy of full training.
        input_size: resize every image to this square size (default: the native size; 32 for
            digits and image folders).
        seed: seeds the validation hold-out, the subset and (image folders without ``test/``)
            the test hold-out.
        hflip: override the dataset's default random horizontal flip (off for digits).

    Returns:
        The splits as uint8 tensors with their class names and training-split statistics.

    Raises:
        DynasError: unknown name, bad argument, or missing / corrupt / mislabelled files.
    """
    reader = DATASETS.get(name) if isinstance(name, str) else None
    if reader is None:
        raise DynasError(
            f"`name` must be one of {', '.join(DATASETS)}, but got {brief(name)}.{did_you_mean(str(name), DATASETS)}"
        )
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise DynasError(f"`root` must be a path, but got root={brief(root)}.")
    _check_args(val_fraction, train_subset, input_size, seed)
    raw = reader(root, input_size or _DEFAULT_SIZE, seed)
    size = input_size or _native_size(raw, name)
    check_fits_memory(len(raw.x_train) + len(raw.x_test), int(raw.x_train.shape[1]), size, name)
    train_all = Split(resize(raw.x_train, size), raw.y_train)
    test = Split(resize(raw.x_test, size), raw.y_test)
    train, val = _holdout(train_all, val_fraction, train_subset, seed, name)
    mean, std = channel_stats(train.images)
    return DataBundle(
        name=name,
        train=train,
        val=val,
        test=test,
        class_names=raw.class_names,
        mean=mean,
        std=std,
        augmentation=Augmentation.for_size(size, raw.hflip if hflip is None else hflip),
    )


def _check_args(val_fraction: float, train_subset: int | float | None, input_size: int | None, seed: int) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DynasError(f"`val_fraction` must lie in (0, 1), but got {val_fraction=!r}.")
    if train_subset is not None and (
        isinstance(train_subset, bool)
        or not isinstance(train_subset, (int, float))
        or (isinstance(train_subset, int) and train_subset < 1)
        or (isinstance(train_subset, float) and not 0 < train_subset <= 1)
    ):
        raise DynasError(
            f"`train_subset` must be a count >= 1 (int) or a fraction in (0, 1] (float), but got {train_subset=!r}."
        )
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
        raise DynasError(f"`input_size` must be an integer >= 1, but got {input_size=!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DynasError(f"`seed` must be an integer, but got {seed=!r}.")


def _native_size(raw: RawDataset, name: str) -> int:
    if name == "digits":
        return _DEFAULT_SIZE  # 8x8 is too small for a stride-32 mobile network
    h, w = raw.x_train.shape[2:]
    if h != w:
        raise DynasError(f"dataset {name!r} has {h}x{w} images; models take square inputs, so give `input_size`.")
    return int(h)


def _holdout(
    split: Split, val_fraction: float, train_subset: int | float | None, seed: int, name: str
) -> tuple[Split, Split]:
    """Seeded (train, val): hold out ``val_fraction``, then keep ``train_subset`` of the rest."""
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(val_fraction * n))
    if n - n_val < 1:
        raise DynasError(f"dataset {name!r} has {n} training images: too few to hold out {val_fraction=}.")
    rest = order[n_val:]
    if train_subset is not None:
        keep = train_subset if isinstance(train_subset, int) else max(1, round(train_subset * len(rest)))
        if keep > len(rest):
            raise DynasError(
                f"`train_subset` must not exceed the {len(rest)} training images left after the "
                f"validation hold-out, but got {train_subset=}."
            )
        rest = rest[:keep]
    # Sorted indices keep the original order in memory (cheaper gathers, stable across runs).
    return split.subset(rest.sort().values), split.subset(order[:n_val].sort().values)
