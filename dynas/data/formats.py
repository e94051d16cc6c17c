"""Readers of the dataset formats users have on disk, each returning uint8 NCHW arrays.

Every reader checks what it reads (shapes, label ranges, lengths) and raises a
:class:`~dynas.errors.DynasError` naming the file, so a corrupt download is reported as such
instead of surfacing as a shape error deep inside training.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dynas.errors import DynasError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_CLASSES",
    "check_fits_memory",
    "RawDataset",
    "read_cifar10",
    "read_cifar100",
    "read_digits",
    "read_imagefolder",
    "read_npz",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
_IMAGEFOLDER_TEST_FRACTION = 0.2  # held out as the test split when a folder has no test/
MAX_CLASSES = 100_000
"""Most classes a dataset without class names may have: its labels make the class list, so one
stray label of 2e9 would otherwise allocate two billion names before anything is checked."""


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no bound
        return None


def check_fits_memory(images: int, channels: int, size: int, dataset: str) -> None:
    """Refuse an ``input_size`` whose uint8 images (all splits) need more than this machine's memory."""
    needed, memory = images * channels * size * size, _physical_memory()
    if memory is not None and needed > memory:
        raise DynasError(
            f"`input_size` {size} needs {needed / 1e9:,.1f} GB of memory for the images of dataset "
            f"{dataset!r} ({images} images of {channels}x{size}x{size} bytes), more than this machine's "
            f"{memory / 1e9:,.1f} GB; use a smaller --input-size."
        )


@dataclass(frozen=True)
class RawDataset:
    """A dataset as read: uint8 ``(N, C, H, W)`` images, int64 labels, class names."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: tuple[str, ...]
    hflip: bool = True  # whether a left-right flip keeps an image's class


def _check_labels(labels: np.ndarray, n: int, num_classes: int, where: str) -> torch.Tensor:
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DynasError(f"{where}: expected {n} labels (one per image), but got shape {labels.shape}.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DynasError(f"{where}: labels must be integers, but got dtype {labels.dtype}.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DynasError(
            f"{where}: labels must lie in [0, {num_classes - 1}], but got values from "
            f"{labels.min()} to {labels.max()}."
        )
    return torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------- digits


def read_digits() -> RawDataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits, gray repeated to 3 channels.

    Read from the file scikit-learn ships, without importing scikit-learn (its import, through
    SciPy, took longer than the rest of loading and was paid by every search). The train/test
    split is fixed (stratified, 360 test images, seed 0) so that test accuracy means the same thing
    whatever seed a search uses.
    """
    table = np.loadtxt(_sklearn_data_file("digits.csv.gz"), delimiter=",", dtype=np.float64)
    x = np.rint(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    x = np.repeat(x[:, None], 3, axis=1)  # (N, 3, 8, 8): same models as for RGB data
    y = table[:, -1].astype(np.int64)
    train, test = _stratified_split(y, test_fraction=0.2, seed=0)
    return RawDataset(
        torch.from_numpy(x[train]), torch.from_numpy(y[train]), torch.from_numpy(x[test]), torch.from_numpy(y[test]),
        class_names=tuple(str(i) for i in range(10)),
        hflip=False,
    )


def _sklearn_data_file(name: str) -> Path:
    """A data file of scikit-learn's ``sklearn/datasets/data``, found without importing sklearn."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(next(iter(spec.submodule_search_locations)), "datasets", "data", name) if spec else None
    if path is None or not path.is_file():
        raise DynasError(f"dataset 'digits' is read from scikit-learn's {name}, which is missing: pip install scikit-learn")
    return path


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train and test indices; each class gives the test split its share (largest remainder)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    n_test = math.ceil(test_fraction * len(labels))
    exact = counts * n_test / len(labels)
    per_class = np.floor(exact).astype(np.int64)
    per_class[np.argsort(per_class - exact, kind="stable")[: n_test - per_class.sum()]] += 1
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, per_class)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    return rng.permutation(train), rng.permutation(test)


# ----------------------------------------------------------------------------- CIFAR


def _find_folder(root: str | Path | None, folder: str, dataset: str) -> Path:
    """``root`` itself if it is ``folder``, else ``root/folder``."""
    if root is None:
        raise DynasError(f"dataset {dataset!r} needs `root`: the {folder!r} folder or the folder holding it.")
    path = Path(root).expanduser()
    for candidate in (path, path / folder):
        if candidate.is_dir() and candidate.name == folder:
            return candidate
    raise DynasError(
        f"dataset {dataset!r}: no {folder!r} folder at or under {str(path)!r}; give the folder "
        f"itself or its parent (the standard python-pickle layout)."
    )


def _load_pickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DynasError(f"file {str(path)!r} is missing.")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="bytes")
    except Exception as err:  # a truncated or foreign file can raise almost anything
        raise DynasError(f"file {str(path)!r} is not a readable pickle: {type(err).__name__}: {err}") from None
    if not isinstance(data, dict):
        raise DynasError(f"file {str(path)!r} should hold a dict, but holds {type(data).__name__}.")
    # The original files have bytes keys; re-pickled copies often have str keys.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _get(data: dict[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise DynasError(f"file {str(path)!r} has no {key!r} entry (keys: {', '.join(sorted(map(str, data)))}).")
    return data[key]


def _read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = _load_pickle(path)
    x = np.asarray(_get(data, "data", path))
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise DynasError(
            f"file {str(path)!r}: 'data' must be uint8 of shape (N, 3072), but got {x.dtype} {x.shape}."
        )
    y = _check_labels(np.asarray(_get(data, label_key, path)), x.shape[0], num_classes, f"file {str(path)!r}")
    return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), y  # rows are channel-major (C, H, W)


def _class_names(path: Path, key: str, expected: int) -> tuple[str, ...]:
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _get(_load_pickle(path), key, path)]
    if len(names) != expected:
        raise DynasError(f"file {str(path)!r}: expected {expected} class names in {key!r}, but got {len(names)}.")
    return tuple(names)


def _read_cifar_splits(
    folder: Path, train_files: list[str], test_file: str, meta: tuple[str, str], label_key: str, num_classes: int
) -> RawDataset:
    names = _class_names(folder / meta[0], meta[1], num_classes)
    parts = [_read_cifar_batch(folder / f, label_key, num_classes) for f in train_files]
    x_test, y_test = _read_cifar_batch(folder / test_file, label_key, num_classes)
    return RawDataset(
        torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), x_test, y_test, names
    )


def read_cifar10(root: str | Path | None) -> RawDataset:
    """CIFAR-10 from ``cifar-10-batches-py`` (data_batch_1..5, test_batch, batches.meta)."""
    folder = _find_folder(root, "cifar-10-batches-py", "cifar10")
    train = [f"data_batch_{i}" for i in range(1, 6)]
    return _read_cifar_splits(folder, train, "test_batch", ("batches.meta", "label_names"), "labels", 10)


def read_cifar100(root: str | Path | None) -> RawDataset:
    """CIFAR-100 (100 fine classes) from ``cifar-100-python`` (train, test, meta)."""
    folder = _find_folder(root, "cifar-100-python", "cifar100")
    return _read_cifar_splits(folder, ["train"], "test", ("meta", "fine_label_names"), "fine_labels", 100)


# ----------------------------------------------------------------------------- image folders


def _class_folders(folder: Path) -> list[Path]:
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DynasError(f"image folder {str(folder)!r} has no class sub-folders (one folder per class).")
    return classes


def _read_image(path: Path, size: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Over Image.MAX_IMAGE_PIXELS PIL only warns (over twice that it refuses): a header
            # claiming 10^8 pixels would still be decoded into memory. Refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # (3, size, size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DynasError(f"image {str(path)!r} cannot be read: {err} (PIL's Image.MAX_IMAGE_PIXELS)") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DynasError(f"image {str(path)!r} cannot be read: {err}") from None


def _read_class_images(
    folder: Path, classes: list[tuple[int, str]], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of the ``(label, sub-folder name)`` pairs in ``classes``, resized to ``size``."""
    files: dict[int, list[Path]] = {}
    for label, name in classes:
        files[label] = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files[label]:
            raise DynasError(f"class folder {str(folder / name)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    check_fits_memory(sum(map(len, files.values())), 3, size, "imagefolder")
    images = [_read_image(p, size) for paths in files.values() for p in paths]
    labels = [label for label, paths in files.items() for _ in paths]
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def _stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out): ``fraction`` of every class held out, at least one each."""
    gen = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def read_imagefolder(root: str | Path | None, input_size: int, seed: int) -> RawDataset:
    """One sub-folder per class; ``train/`` and ``test/`` inside if present, else a seeded split."""
    if root is None:
        raise DynasError("dataset 'imagefolder' needs `root`: a folder with one sub-folder per class.")
    folder = Path(root).expanduser()
    if folder.is_file():
        raise DynasError(f"image folder {str(folder)!r} is a file, not a folder (one sub-folder per class).")
    if not folder.is_dir():
        raise DynasError(f"image folder {str(folder)!r} does not exist.")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        names = [p.name for p in _class_folders(folder / "train")]
        test_names = [p.name for p in _class_folders(folder / "test")]
        if unknown := sorted(set(test_names) - set(names)):
            raise DynasError(f"image folder {str(folder / 'test')!r} has classes not in train/: {unknown}.")
        x_train, y_train = _read_class_images(folder / "train", list(enumerate(names)), input_size)
        # A class may be absent from test/; labels still follow the train/ class order.
        test_classes = [(i, n) for i, n in enumerate(names) if n in test_names]
        x_test, y_test = _read_class_images(folder / "test", test_classes, input_size)
        return RawDataset(x_train, y_train, x_test, y_test, tuple(names))
    names = [p.name for p in _class_folders(folder)]
    x, y = _read_class_images(folder, list(enumerate(names)), input_size)
    if min(torch.bincount(y).tolist()) < 2:
        raise DynasError(f"image folder {str(folder)!r}: every class needs >= 2 images to split off a test set.")
    train, test = _stratified_holdout(y, _IMAGEFOLDER_TEST_FRACTION, seed)
    return RawDataset(x[train], y[train], x[test], y[test], tuple(names))


# ----------------------------------------------------------------------------- npz

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """NHWC, NCHW or NHW (grayscale) -> NCHW; channels must be 1 or 3."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[3] in (1, 3):  # NHWC wins a tie: it is what numpy users have
        return x.transpose(0, 3, 1, 2)
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    raise DynasError(
        f"{where}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C in (1, 3), "
        f"but got shape {x.shape}."
    )


def _to_uint8(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating) and x.size and np.isfinite(x).all() and 0 <= x.min() and x.max() <= 1:
        return np.rint(x * 255).astype(np.uint8)  # floats in [0, 1], as many pipelines save them
    raise DynasError(f"{where}: images must be uint8 (or floats in [0, 1]), but got {x.dtype}.")


def read_npz(root: str | Path | None) -> RawDataset:
    """A user's ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (and optionally ``class_names``)."""
    if root is None:
        raise DynasError("dataset 'npz' needs `root`: the path of a .npz file.")
    path = Path(root).expanduser()
    if path.is_dir():
        raise DynasError(f"npz file {str(path)!r} is a folder; give the .npz file.")
    if not path.is_file():
        raise DynasError(f"npz file {str(path)!r} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as pack:
            if missing := [k for k in _NPZ_KEYS if k not in pack.files]:
                has = sorted(pack.files)
                listed = ", ".join(has[:6]) + (f", ... ({len(has)} in all)" if len(has) > 6 else "")
                raise DynasError(f"npz file {str(path)!r} lacks {missing} (it has {listed or 'nothing'}).")
            arrays = {k: pack[k] for k in pack.files if k in (*_NPZ_KEYS, "class_names")}
    except DynasError:
        raise
    except Exception as err:  # zip, pickle and format errors all mean "not a usable npz"
        raise DynasError(f"npz file {str(path)!r} cannot be read: {type(err).__name__}: {err}") from None
    where = f"npz file {str(path)!r}"
    x_train = _to_uint8(_to_nchw(arrays["x_train"], f"{where}, x_train"), f"{where}, x_train")
    x_test = _to_uint8(_to_nchw(arrays["x_test"], f"{where}, x_test"), f"{where}, x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DynasError(f"{where}: x_train images are {x_train.shape[1:]} but x_test images are {x_test.shape[1:]}.")
    names = _npz_class_names(arrays, where)
    y_train = _check_labels(arrays["y_train"].reshape(-1), len(x_train), len(names), f"{where}, y_train")
    y_test = _check_labels(arrays["y_test"].reshape(-1), len(x_test), len(names), f"{where}, y_test")
    return RawDataset(
        torch.from_numpy(np.ascontiguousarray(x_train)), y_train,
        torch.from_numpy(np.ascontiguousarray(x_test)), y_test, names,
    )


def _npz_class_names(arrays: dict[str, np.ndarray], where: str) -> tuple[str, ...]:
    """``class_names`` if stored, else ``"0" .. str(max label)`` from both label arrays."""
    if "class_names" in arrays:
        return tuple(str(n) for n in arrays["class_names"].reshape(-1))
    labels = [arrays[k].reshape(-1) for k in ("y_train", "y_test")]
    if not all(np.issubdtype(y.dtype, np.integer) for y in labels):
        raise DynasError(f"{where}: labels must be integers, but got {[str(y.dtype) for y in labels]}.")
    for key, y in zip(("y_train", "y_test"), labels):
        if y.size and int(y.max()) >= MAX_CLASSES:  # checked before making one name per class
            raise DynasError(
                f"{where}, {key}: labels must lie in [0, {MAX_CLASSES - 1}] (at most {MAX_CLASSES} classes "
                f"without `class_names`), but got values from {y.min()} to {y.max()}."
            )
    top = max((int(y.max()) for y in labels if y.size), default=-1)
    if top < 0:
        raise DynasError(f"{where}: no labels found (y_train and y_test are empty or negative).")
    return tuple(str(i) for i in range(top + 1))
