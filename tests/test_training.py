"""Candidate training: learning on real data, tau schedule per step, pruning, NaN, resume, seeds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dynas import DynamicConv2d, LinearAnneal
from dynas.data import Augmentation, DataBundle, Split, load_data
from dynas.errors import DynasError
from dynas.training import (
    NonFiniteLossError,
    TrainConfig,
    evaluate,
    resolve_device,
    train_candidate,
)
from dynas.training import _param_groups, _warmup_cosine

# One thread: the test machine's 2 cores are shared, and 2 threads fighting for a busy core
# were measured 5x slower than 1.
QUIET = dict(quiet=True, device="cpu", num_threads=1)


def _small_cnn(num_classes: int = 10, num_kernels: int = 4, width: int = 16) -> nn.Sequential:
    """Static stem, two dynamic 3x3 convs (the second strided), linear classifier."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        DynamicConv2d(width, 2 * width, 3, 2, 1, bias=False, num_kernels=num_kernels),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(inplace=True),
        DynamicConv2d(2 * width, 4 * width, 3, 2, 1, num_kernels=num_kernels),
        nn.BatchNorm2d(4 * width),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


def _tiny_bundle(n: int = 48, size: int = 8, seed: int = 0) -> DataBundle:
    """Random 2-class images: fast to train on where only the mechanics are under test."""
    gen = torch.Generator().manual_seed(seed)

    def split(count: int) -> Split:
        images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=gen)
        return Split(images, torch.arange(count) % 2)

    return DataBundle("tiny", split(n), split(16), split(16), ("a", "b"), (0.5,) * 3, (0.29,) * 3, Augmentation(1, True))


def _tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return _small_cnn(num_classes=2, num_kernels=3, width=4)


# ----------------------------------------------------------------------------- real data


def test_few_epochs_on_cifar10_mini_beat_chance(cifar10_mini: Path):
    data = load_data("cifar10", cifar10_mini)
    torch.manual_seed(0)
    model = _small_cnn()
    result = train_candidate(model, data, TrainConfig(epochs=5, lr=0.1, **QUIET))
    test_top1 = evaluate(model, data, "test")
    # Measured 27-30% on the 500 test images over seeds (chance 10%, binomial sd ~1.3 points).
    assert test_top1 > 20.0
    assert result.best_val_top1 > 15.0
    assert result.epochs_run == len(result.val_top1) == len(result.epoch_seconds) == 5
    assert not result.pruned and result.tau_end == 1.0
    assert result.final_loss < result.train_loss[0]
    assert result.train_seconds == pytest.approx(sum(result.epoch_seconds))
    assert set(result.attention_entropy) == {"3", "6"}
    assert all(0.0 < h <= math.log(4) + 1e-6 for h in result.attention_entropy.values())


# ----------------------------------------------------------------------------- temperature


def _record_tau(model: nn.Module) -> tuple[list[float], list[float]]:
    """Temperatures seen by the first dynamic layer in training and in eval forwards."""
    train_taus: list[float] = []
    eval_taus: list[float] = []
    layer = next(m for m in model.modules() if isinstance(m, DynamicConv2d))
    layer.register_forward_pre_hook(
        lambda m, _: (train_taus if m.training else eval_taus).append(m.temperature)
    )
    return train_taus, eval_taus


def test_tau_follows_linear_anneal_per_step():
    data, model = _tiny_bundle(), _tiny_model()
    train_taus, eval_taus = _record_tau(model)
    config = TrainConfig(epochs=3, batch_size=8, anneal_fraction=0.5, tau_start=20.0, eval_batch_size=64, **QUIET)
    result = train_candidate(model, data, config)
    schedule = LinearAnneal.from_fraction(18, 0.5, 20.0, 1.0)  # 48 // 8 = 6 steps x 3 epochs
    assert train_taus == pytest.approx([schedule(s) for s in range(18)])
    assert train_taus[0] == 20.0 and train_taus[-1] == 1.0
    # Validation (one batch per epoch) runs at the schedule's current tau.
    assert eval_taus[:3] == pytest.approx([schedule(6), schedule(12), 1.0])
    assert result.tau_end == 1.0


def test_anneal_epochs_wins_over_fraction():
    data, model = _tiny_bundle(), _tiny_model()
    train_taus, _ = _record_tau(model)
    config = TrainConfig(epochs=2, batch_size=8, anneal_fraction=1.0, anneal_epochs=1, **QUIET)
    train_candidate(model, data, config)
    assert train_taus[:6] == pytest.approx([LinearAnneal(30.0, 1.0, 6)(s) for s in range(6)])
    assert train_taus[6:] == [1.0] * 6


def test_custom_schedule_from_argument_and_config():
    data = _tiny_bundle()
    for kwargs, config in [
        ({"schedule": lambda step: 2.0 + step}, TrainConfig(epochs=1, batch_size=8, **QUIET)),
        ({}, TrainConfig(epochs=1, batch_size=8, schedule=lambda step: 2.0 + step, **QUIET)),
    ]:
        model = _tiny_model()
        train_taus, _ = _record_tau(model)
        result = train_candidate(model, data, config, **kwargs)
        assert train_taus == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
        assert result.tau_end == 8.0


# ----------------------------------------------------------------------------- callback, NaN


def test_callback_prunes():
    seen: list[tuple[int, float]] = []

    def prune_at_two(epoch: int, val_top1: float) -> bool:
        seen.append((epoch, val_top1))
        return epoch == 2

    result = train_candidate(_tiny_model(), _tiny_bundle(), TrainConfig(epochs=5, batch_size=8, **QUIET), prune_at_two)
    assert [e for e, _ in seen] == [1, 2]
    assert [v for _, v in seen] == result.val_top1
    assert result.pruned and result.epochs_run == 2


class _NanAfter(nn.Module):
    """Identity until the ``n``-th training forward, then NaN."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        return x * math.nan if self.training and self.calls >= self.n else x


def test_nan_loss_raises_naming_epoch_and_step():
    model = nn.Sequential(_tiny_model(), _NanAfter(8))  # 6 steps per epoch: 8th is epoch 2, step 2
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at epoch 2, step 2 \(optimizer step 7"):
        train_candidate(model, _tiny_bundle(), TrainConfig(epochs=3, batch_size=8, **QUIET))
    assert issubclass(NonFiniteLossError, DynasError)


# ----------------------------------------------------------------------------- seeds, resume


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def test_same_seed_reproduces_and_other_seed_differs():
    data = _tiny_bundle()
    config = TrainConfig(epochs=2, batch_size=8, **QUIET)
    a, b, c = _tiny_model(), _tiny_model(), _tiny_model()
    ra = train_candidate(a, data, config)
    rb = train_candidate(b, data, config)
    train_candidate(c, data, TrainConfig(epochs=2, batch_size=8, seed=1, **QUIET))
    assert ra.val_top1 == rb.val_top1 and ra.train_loss == rb.train_loss
    assert torch.equal(_weights(a), _weights(b))
    assert not torch.equal(_weights(a), _weights(c))


class _Interrupted(Exception):
    pass


def _interrupt_after(epoch: int, seen: list[int]):
    def callback(e: int, _: float) -> None:
        seen.append(e)
        if e == epoch:
            raise _Interrupted

    return callback


def test_checkpoint_resume_continues_from_saved_epoch(tmp_path: Path):
    data, path = _tiny_bundle(), tmp_path / "run" / "ckpt.pt"
    config = TrainConfig(epochs=3, batch_size=8, **QUIET)
    reference = _tiny_model()
    expected = train_candidate(reference, data, config)
    seen: list[int] = []
    with pytest.raises(_Interrupted):
        train_candidate(_tiny_model(), data, config, _interrupt_after(2, seen), checkpoint_path=path)
    assert path.is_file() and not path.with_name("ckpt.pt.tmp").exists()
    resumed_model = _tiny_model(seed=123)  # different init: the checkpoint must overwrite it
    resumed = train_candidate(resumed_model, data, config, _interrupt_after(99, seen), checkpoint_path=path)
    assert seen == [1, 2, 3]  # epoch 3 only after resuming
    assert resumed.val_top1 == expected.val_top1 and resumed.train_loss == expected.train_loss
    assert resumed.epochs_run == 3 and len(resumed.epoch_seconds) == 3
    assert torch.equal(_weights(resumed_model), _weights(reference))


def test_checkpoint_of_other_run_or_corrupt_is_an_error(tmp_path: Path):
    data, path = _tiny_bundle(), tmp_path / "ckpt.pt"
    train_candidate(_tiny_model(), data, TrainConfig(epochs=1, batch_size=8, **QUIET), checkpoint_path=path)
    with pytest.raises(DynasError, match=r"checkpoint '.*ckpt.pt' is of a run with 6 optimizer steps, but this run has 12"):
        train_candidate(_tiny_model(), data, TrainConfig(epochs=2, batch_size=8, **QUIET), checkpoint_path=path)
    path.write_bytes(b"garbage")
    with pytest.raises(DynasError, match=r"checkpoint '.*ckpt.pt' cannot be resumed from"):
        train_candidate(_tiny_model(), data, TrainConfig(epochs=1, batch_size=8, **QUIET), checkpoint_path=path)


# ----------------------------------------------------------------------------- pieces


class _Constant(nn.Module):
    def __init__(self, label: int, num_classes: int) -> None:
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((x.shape[0],), self.label), self.num_classes).float()


def test_evaluate_is_top1_percent_on_the_named_split():
    data = _load_digits_small()
    for split in ("val", "test"):
        labels = data.split(split).labels
        expected = 100.0 * float((labels == 3).sum()) / len(labels)
        assert evaluate(_Constant(3, 10), data, split, batch_size=7) == pytest.approx(expected)


def _load_digits_small() -> DataBundle:
    return load_data("digits", input_size=8)


def test_weight_decay_skips_norm_and_biases():
    model = _small_cnn()
    decay, no_decay = _param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    # BatchNorm (1, 4, 7) and every bias, the DynamicConv2d's 2-D (K, Cout) one (6) included.
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "1.bias", "1.weight", "11.bias",
        "3.attention.fc1.bias", "3.attention.fc2.bias", "4.bias", "4.weight",
        "6.attention.fc1.bias", "6.attention.fc2.bias", "6.bias", "7.bias", "7.weight",
    ]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_then_cosine_learning_rate():
    factor = _warmup_cosine(4, 20)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(12) == pytest.approx(0.5)
    assert 0 < factor(19) < 0.02
    assert _warmup_cosine(0, 10)(0) == 1.0


def test_device_resolution():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DynasError, match=r"`device` is 'cuda', but CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(DynasError, match=r"`amp` 'fp16' needs a CUDA device"):
            train_candidate(_tiny_model(), _tiny_bundle(), TrainConfig(amp="fp16", **QUIET))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epochs=0), r"`epochs` must be an integer >= 1, but got epochs=0"),
        (dict(batch_size=2.5), r"`batch_size` must be an integer >= 1, but got batch_size=2.5"),
        (dict(lr=0.0), r"`lr` must be a finite number > 0, but got lr=0.0"),
        (dict(momentum=1.0), r"`momentum` must be a finite number in \[0, 1\), but got momentum=1.0"),
        (dict(weight_decay=-1e-4), r"`weight_decay` must be a finite number >= 0, but got weight_decay=-0.0001"),
        (dict(epochs=2, warmup_epochs=2), r"`warmup_epochs` must be a finite number in \[0, 2\), but got warmup_epochs=2"),
        (dict(label_smoothing=1.0), r"`label_smoothing` must be .*label_smoothing=1.0"),
        (dict(tau_start=0.0), r"`tau_start` must be a finite number > 0, but got tau_start=0.0"),
        (dict(tau_end=math.nan), r"`tau_end` must be .*tau_end=nan"),
        (dict(anneal_fraction=1.5), r"`anneal_fraction` must be a finite number in \[0, 1\], but got anneal_fraction=1.5"),
        (dict(anneal_epochs=-1), r"`anneal_epochs` must be .*anneal_epochs=-1"),
        (dict(max_steps_per_epoch=0), r"`max_steps_per_epoch` must be an integer >= 1"),
        (dict(num_threads=0), r"`num_threads` must be an integer >= 1, but got num_threads=0"),
        (dict(seed=1.5), r"`seed` must be an integer, but got seed=1.5"),
        (dict(amp="fp61"), r"`amp` must be one of .*amp='fp61'.*Did you mean 'fp16'\?"),
        (dict(device="gpu0"), r"`device` must be 'auto' or a torch device .*device='gpu0'"),
        (dict(schedule=3.0), r"`schedule` must be a callable step -> tau, but got schedule=3.0"),
        (dict(quiet="yes"), r"`quiet` and `augment` must be booleans"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_num_threads_is_set_while_training_and_restored():
    seen: list[int] = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so that 1 during training is a visible change
    config = TrainConfig(epochs=2, batch_size=8, quiet=True, device="cpu", num_threads=1)
    train_candidate(_tiny_model(), _tiny_bundle(), config, lambda e, v: seen.append(torch.get_num_threads()))
    assert seen == [1, 1] and torch.get_num_threads() == 2
    torch.set_num_threads(before)


def test_max_steps_per_epoch_caps_steps():
    model = _tiny_model()
    train_taus, _ = _record_tau(model)
    train_candidate(model, _tiny_bundle(), TrainConfig(epochs=2, batch_size=8, max_steps_per_epoch=2, **QUIET))
    assert len(train_taus) == 4
