"""Datasets: every format's shapes / dtypes / labels, splits, augmentation, loader, and errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynas.data import (
    Augmentation,
    BatchLoader,
    DataBundle,
    Split,
    load_data,
    normalize,
    random_crop,
    random_hflip,
    resize,
)
from dynas.errors import DynasError


def _check_bundle(data: DataBundle, num_classes: int, channels: int, size: int) -> None:
    for part in (data.train, data.val, data.test):
        assert part.images.dtype == torch.uint8
        assert part.images.shape[1:] == (channels, size, size)
        assert part.labels.dtype == torch.int64
        assert 0 <= int(part.labels.min()) and int(part.labels.max()) < num_classes
    assert (data.num_classes, data.in_channels, data.input_size) == (num_classes, channels, size)
    assert len(data.class_names) == num_classes
    assert len(data.mean) == len(data.std) == channels
    assert all(0 < s < 1 for s in data.std)


# ----------------------------------------------------------------------------- digits / CIFAR-10


def test_digits_default_is_32px_rgb_without_flip():
    data = load_data("digits")
    _check_bundle(data, 10, 3, 32)
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert data.augmentation == Augmentation(crop_padding=4, hflip=False)
    assert torch.equal(data.train.images[:, 0], data.train.images[:, 2])  # gray repeated


def test_digits_test_split_does_not_depend_on_seed():
    a, b = load_data("digits", seed=0), load_data("digits", seed=1)
    assert torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.val.labels, b.val.labels)


def test_cifar10_mini_accepts_folder_or_parent(cifar10_mini: Path):
    data = load_data("cifar10", cifar10_mini)
    _check_bundle(data, 10, 3, 32)
    assert (len(data.train), len(data.val), len(data.test)) == (900, 100, 500)
    assert data.class_names[:2] == ("airplane", "automobile")
    assert data.augmentation == Augmentation(crop_padding=4, hflip=True)
    parent = load_data("cifar10", cifar10_mini.parent)
    assert torch.equal(parent.train.images, data.train.images)
    # Real CIFAR-10 statistics (about 0.49 / 0.25 per channel), not a constant or a mistake.
    assert 0.4 < data.mean[0] < 0.55 and 0.2 < data.std[0] < 0.3


def test_split_is_seeded_disjoint_and_subset_and_resize_apply(cifar10_mini: Path):
    a = load_data("cifar10", cifar10_mini, val_fraction=0.2, train_subset=100, input_size=16, seed=3)
    b = load_data("cifar10", cifar10_mini, val_fraction=0.2, train_subset=100, input_size=16, seed=3)
    c = load_data("cifar10", cifar10_mini, val_fraction=0.2, seed=4)
    _check_bundle(a, 10, 3, 16)
    assert (len(a.train), len(a.val), len(c.train)) == (100, 200, 800)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.val.labels, c.val.labels)
    assert len(load_data("cifar10", cifar10_mini, train_subset=0.5).train) == 450
    assert load_data("cifar10", cifar10_mini, input_size=64).augmentation.crop_padding == 8
    full = load_data("cifar10", cifar10_mini, val_fraction=0.2, seed=4)
    rows = {bytes(x.numpy()) for x in full.train.images}
    assert not any(bytes(x.numpy()) in rows for x in full.val.images)  # no leak into val


# ----------------------------------------------------------------------------- CIFAR-100 / npz / folders


def _write_cifar100(root: Path, n_train: int = 30, n_test: int = 10, label_max: int = 99) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 100, n).tolist()
        labels[0] = label_max
        with open(folder / name, "wb") as f:
            pickle.dump(
                {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": labels, b"coarse_labels": [0] * n},
                f,
            )
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    return folder


def test_cifar100_pickles(tmp_path: Path):
    _write_cifar100(tmp_path)
    data = load_data("cifar100", tmp_path, val_fraction=0.1)
    _check_bundle(data, 100, 3, 32)
    assert (len(data.train) + len(data.val), len(data.test)) == (30, 10)
    assert data.class_names[99] == "c99"


def _write_npz(path: Path, x_train: np.ndarray, x_test: np.ndarray, **extra: np.ndarray) -> Path:
    arrays = {"y_train": np.arange(len(x_train)) % 3, "y_test": np.arange(len(x_test)) % 3}
    np.savez(path, x_train=x_train, x_test=x_test, **(arrays | extra))
    return path


@pytest.mark.parametrize(
    "shape,channels",
    [((20, 12, 12, 3), 3), ((20, 3, 12, 12), 3), ((20, 12, 12), 1), ((20, 12, 12, 1), 1)],
    ids=["nhwc", "nchw", "gray-nhw", "gray-nhwc"],
)
def test_npz_layouts(tmp_path: Path, shape: tuple[int, ...], channels: int):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    path = _write_npz(tmp_path / "d.npz", x, x[:6])
    data = load_data("npz", path, val_fraction=0.25)
    _check_bundle(data, 3, channels, 12)
    assert data.augmentation.crop_padding == round(4 * 12 / 32)
    if shape == (20, 12, 12, 3):  # NHWC pixel (n, h, w, c) must land at (n, c, h, w)
        assert int(data.test.images[1, 2, 4, 5]) == int(x[1, 4, 5, 2])
    assert load_data("npz", path, input_size=24).input_size == 24


def test_npz_float_images_and_class_names(tmp_path: Path):
    x = np.random.default_rng(0).random((10, 8, 8, 3)).astype(np.float32)
    path = _write_npz(tmp_path / "f.npz", x, x[:4], class_names=np.array(["a", "b", "c", "d"]))
    data = load_data("npz", path, val_fraction=0.2)
    _check_bundle(data, 4, 3, 8)
    assert data.class_names == ("a", "b", "c", "d")


def _write_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (20, 14)) -> None:
    for i, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for j in range(count):
            color = (40 * i, 255 - 40 * i, 7 * j)
            Image.new("RGB", size, color).save(root / name / f"{j}.png")


def test_imagefolder_seeded_split_resizes(tmp_path: Path):
    _write_folder(tmp_path, {"cat": 6, "dog": 5, "eel": 5})
    data = load_data("imagefolder", tmp_path, input_size=16, val_fraction=0.2)
    _check_bundle(data, 3, 3, 16)
    assert data.class_names == ("cat", "dog", "eel")
    assert len(data.train) + len(data.val) + len(data.test) == 16
    assert sorted(data.test.labels.tolist()) == [0, 1, 2]  # 20% of each class, at least one
    eel = data.train.images[data.train.labels == 2]
    assert int(eel[0, 0, 0, 0]) == 80  # the class' own color survives loading


def test_imagefolder_train_test_subfolders(tmp_path: Path):
    _write_folder(tmp_path / "train", {"a": 4, "b": 4})
    _write_folder(tmp_path / "test", {"b": 2})
    data = load_data("imagefolder", tmp_path, val_fraction=0.25)
    _check_bundle(data, 2, 3, 32)
    assert data.test.labels.tolist() == [1, 1]  # labels follow train/'s class order


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="cifar"), r"`name` must be one of .*but got 'cifar'\. Did you mean 'cifar10'\?"),
        (dict(name="digits", val_fraction=1.0), r"`val_fraction` must lie in \(0, 1\), but got val_fraction=1.0"),
        (dict(name="digits", train_subset=0), r"`train_subset` must be a count >= 1 .*train_subset=0"),
        (dict(name="digits", train_subset=1.5), r"`train_subset` must be .*train_subset=1.5"),
        (dict(name="digits", train_subset=10**6), r"must not exceed the 1293 training images"),
        (dict(name="digits", input_size=0), r"`input_size` must be an integer >= 1, but got input_size=0"),
        (dict(name="cifar10"), r"dataset 'cifar10' needs `root`"),
        (dict(name="npz"), r"dataset 'npz' needs `root`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(DynasError, match=match):
        load_data(**kwargs)


def test_missing_cifar_folder_and_file(tmp_path: Path, cifar10_mini: Path):
    with pytest.raises(DynasError, match=r"no 'cifar-10-batches-py' folder at or under"):
        load_data("cifar10", tmp_path)
    folder = _write_cifar100(tmp_path)
    (folder / "test").unlink()
    with pytest.raises(DynasError, match=r"file '.*cifar-100-python/test' is missing"):
        load_data("cifar100", tmp_path)


def test_corrupt_pickle_names_the_file(tmp_path: Path):
    folder = _write_cifar100(tmp_path)
    (folder / "train").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(DynasError, match=r"file '.*cifar-100-python/train' is not a readable pickle"):
        load_data("cifar100", tmp_path)


def test_out_of_range_cifar_label_names_the_file(tmp_path: Path):
    _write_cifar100(tmp_path, label_max=100)
    with pytest.raises(DynasError, match=r"file '.*train': labels must lie in \[0, 99\], but got values from 0 to 100"):
        load_data("cifar100", tmp_path)


def test_wrong_cifar_shape_names_the_file(tmp_path: Path):
    folder = _write_cifar100(tmp_path)
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((10, 100), np.uint8), b"fine_labels": [0] * 10}, f)
    with pytest.raises(DynasError, match=r"file '.*test': 'data' must be uint8 of shape \(N, 3072\)"):
        load_data("cifar100", tmp_path)


def test_npz_errors_name_the_file(tmp_path: Path):
    x = np.zeros((10, 8, 8, 3), np.uint8)
    short = tmp_path / "short.npz"
    np.savez(short, x_train=x, y_train=np.zeros(9, np.int64), x_test=x, y_test=np.zeros(10, np.int64))
    with pytest.raises(DynasError, match=r"npz file '.*short.npz', y_train: expected 10 labels"):
        load_data("npz", short)
    missing = tmp_path / "missing.npz"
    np.savez(missing, x_train=x, y_train=np.zeros(10, np.int64))
    with pytest.raises(DynasError, match=r"npz file '.*missing.npz' lacks \['x_test', 'y_test'\]"):
        load_data("npz", missing)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DynasError, match=r"npz file '.*junk.npz' cannot be read"):
        load_data("npz", junk)
    with pytest.raises(DynasError, match=r"npz file '.*absent.npz' does not exist"):
        load_data("npz", tmp_path / "absent.npz")
    bad = _write_npz(tmp_path / "bad.npz", np.zeros((6, 8, 8, 5), np.uint8), np.zeros((3, 8, 8, 5), np.uint8))
    with pytest.raises(DynasError, match=r"bad.npz', x_train: images must be .*shape \(6, 8, 8, 5\)"):
        load_data("npz", bad)
    labels = _write_npz(tmp_path / "labels.npz", x, x, class_names=np.array(["a", "b"]))
    with pytest.raises(DynasError, match=r"labels.npz', y_train: labels must lie in \[0, 1\], but got values from 0 to 2"):
        load_data("npz", labels)


def test_unreadable_image_names_the_file(tmp_path: Path):
    _write_folder(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "b" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DynasError, match=r"image '.*broken.png' cannot be read"):
        load_data("imagefolder", tmp_path)


def test_empty_class_folder(tmp_path: Path):
    _write_folder(tmp_path, {"a": 3})
    (tmp_path / "b").mkdir()
    with pytest.raises(DynasError, match=r"class folder '.*b' holds no images"):
        load_data("imagefolder", tmp_path)


def test_split_name_suggests():
    with pytest.raises(DynasError, match=r"`split` must be one of .*'tset'.*Did you mean 'test'\?"):
        load_data("digits").split("tset")


# ----------------------------------------------------------------------------- transforms / loader


def test_random_crop_equals_per_image_slicing():
    images = torch.randint(0, 256, (16, 3, 10, 10), dtype=torch.uint8)
    out = random_crop(images, 2, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    dy, dx = torch.randint(0, 5, (16,), generator=gen), torch.randint(0, 5, (16,), generator=gen)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    expected = torch.stack([padded[i, :, dy[i] : dy[i] + 10, dx[i] : dx[i] + 10] for i in range(16)])
    assert torch.equal(out, expected)
    assert not torch.equal(out, images)


def test_random_hflip_flips_some_images_exactly():
    images = torch.randint(0, 256, (64, 3, 5, 5), dtype=torch.uint8)
    out = random_hflip(images, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_normalize_and_resize():
    images = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(images, mean, std), expected)
    flat = torch.full((2, 3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(resize(flat, 20), torch.full((2, 3, 20, 20), 77, dtype=torch.uint8))


def test_batch_loader_shapes_order_and_seed():
    split = Split(torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8), torch.arange(50) % 7)
    kwargs = dict(mean=(0.5,) * 3, std=(0.25,) * 3, augmentation=Augmentation(2, True), shuffle=True, drop_last=True)
    loader = BatchLoader(split, 16, generator=torch.Generator().manual_seed(0), **kwargs)
    batches = list(loader)
    assert len(loader) == len(batches) == 3  # 50 // 16, remainder dropped
    x, y = batches[0]
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    again = list(BatchLoader(split, 16, generator=torch.Generator().manual_seed(0), **kwargs))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    plain = list(BatchLoader(split, 16, mean=(0.5,) * 3, std=(0.25,) * 3))
    assert len(plain) == 4 and torch.equal(torch.cat([b[1] for b in plain]), split.labels)
    assert len(BatchLoader(split, 16, mean=(0.5,) * 3, std=(0.25,) * 3, max_batches=2)) == 2
