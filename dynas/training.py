"""Train one candidate network with tau-annealing, and evaluate top-1 on any split.

The recipe: SGD with Nesterov momentum 0.9, weight decay on conv / linear weights only (not on
BatchNorm or biases), a per-step linear warm-up then cosine learning rate, label smoothing, and
the temperature tau of every dynamic layer set before every optimizer step from a schedule
(by default :class:`~dynas.temperature.LinearAnneal` from ``tau_start`` to ``tau_end``).
Validation uses the schedule's current tau, which is ``tau_end`` once annealing has finished.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dynas.checks import check_int, check_number, check_train_batches
from dynas.data import BatchLoader, DataBundle
from dynas.errors import DynasError, did_you_mean
from dynas.temperature import LinearAnneal, TemperatureSchedule, dynamic_layers, set_temperature

__all__ = [
    "AMP_MODES",
    "EpochCallback",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "resolve_device",
    "train_candidate",
]

AMP_MODES = ("auto", "off", "bf16", "fp16")

EpochCallback = Callable[[int, float], "bool | None"]
"""``callback(epoch, val_top1)`` after every epoch (1-based, top-1 in %); ``True`` stops training."""


class NonFiniteLossError(DynasError):
    """The training loss became NaN or infinite (a diverged candidate; a search records it as failed)."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train one candidate. Defaults are a short proxy run, as a search needs.

    Invalid values raise :class:`~dynas.errors.DynasError` (a ``ValueError``) naming the field.
    """

    epochs: int = 3  # a proxy: rankings, not final accuracy
    batch_size: int = 64
    lr: float = 0.05  # peak, after warm-up; 0.1 (batch 128) collapsed DY attention in short proxy runs
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 4e-5  # MobileNet's value; applied to conv / linear weights only
    warmup_epochs: float = 0.5  # linear warm-up from ~0, per step; must be < epochs
    label_smoothing: float = 0.1
    tau_start: float = 30.0  # near-uniform attention so that all K kernels get gradient early
    tau_end: float = 1.0
    # tau reaches tau_end after this share of all steps. Half the run: at 0.1 a 4-epoch proxy of a
    # K=4 network on digits reached 52% val top-1 (3 seeds) against 85% at 0.5 and 87% static.
    anneal_fraction: float = 0.5
    anneal_epochs: float | None = None  # the paper's 10 epochs for full runs; wins over the fraction
    schedule: TemperatureSchedule | None = None  # any step -> tau callable; replaces the two above
    augment: bool = True  # the dataset's random crop (and flip, where it keeps the class)
    eval_batch_size: int = 256
    max_steps_per_epoch: int | None = None  # cap for quick proxies; None = one pass over train
    seed: int = 0  # shuffling, augmentation and dropout; the model's init is the caller's
    device: str = "auto"  # "auto": CUDA when present, else CPU
    amp: str = "auto"  # "auto": bf16 (else fp16) autocast on CUDA, off on CPU
    quiet: bool = False  # no progress bars
    # CPU threads while training (restored after); None keeps torch's setting. On a shared or
    # oversubscribed CPU, 1 thread per process can be several times faster than 2 fighting ones.
    num_threads: int | None = None

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("seed", self.seed, None)
        for name in ("max_steps_per_epoch", "num_threads"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        check_number("lr", self.lr, 0.0, math.inf, low_open=True)
        check_number("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_number("weight_decay", self.weight_decay, 0.0, math.inf)
        check_number("warmup_epochs", self.warmup_epochs, 0.0, self.epochs, high_open=True)
        check_number("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        check_number("tau_start", self.tau_start, 0.0, math.inf, low_open=True)
        check_number("tau_end", self.tau_end, 0.0, math.inf, low_open=True)
        check_number("anneal_fraction", self.anneal_fraction, 0.0, 1.0)
        if self.anneal_epochs is not None:
            check_number("anneal_epochs", self.anneal_epochs, 0.0, math.inf)
        if self.schedule is not None and not callable(self.schedule):
            raise DynasError(f"`schedule` must be a callable step -> tau, but got schedule={self.schedule!r}.")
        if self.amp not in AMP_MODES:
            raise DynasError(
                f"`amp` must be one of {AMP_MODES}, but got amp={self.amp!r}.{did_you_mean(self.amp, AMP_MODES)}"
            )
        if not isinstance(self.quiet, bool) or not isinstance(self.augment, bool):
            raise DynasError(
                f"`quiet` and `augment` must be booleans, but got quiet={self.quiet!r}, augment={self.augment!r}."
            )
        _parse_device(self.device)

    def temperature_schedule(self, steps_per_epoch: int, total_steps: int) -> TemperatureSchedule:
        """``schedule`` if given, else linear annealing over ``anneal_epochs`` or ``anneal_fraction``."""
        if self.schedule is not None:
            return self.schedule
        if self.anneal_epochs is not None:
            steps = round(self.anneal_epochs * steps_per_epoch)
            return LinearAnneal(self.tau_start, self.tau_end, steps)
        return LinearAnneal.from_fraction(total_steps, self.anneal_fraction, self.tau_start, self.tau_end)


def _parse_device(device: str) -> torch.device | None:
    """``None`` for "auto", else the parsed device (a typo is an error naming the field)."""
    if device == "auto":
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DynasError(
            f"`device` must be 'auto' or a torch device such as 'cpu' or 'cuda:0', but got device={device!r}."
        ) from err


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; an unavailable CUDA device is an error."""
    parsed = device if isinstance(device, torch.device) else _parse_device(device)
    if parsed is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise DynasError(f"`device` is {str(parsed)!r}, but CUDA is not available here; use 'auto' or 'cpu'.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise DynasError(
            f"`device` is {str(parsed)!r}, but this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}."
        )
    return parsed


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting (:data:`AMP_MODES`) on ``device``, or ``None`` for full precision."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16" and device.type != "cuda":
        raise DynasError(f"`amp` 'fp16' needs a CUDA device, but the device is {str(device)!r}; use 'bf16' or 'off'.")
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is ``None``."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass
class TrainResult:
    """What training one candidate produced.

    Attributes:
        val_top1: validation top-1 (%) after each epoch run.
        best_val_top1: the best of ``val_top1``.
        final_loss: mean training loss of the last epoch run.
        train_loss: mean training loss of each epoch.
        train_seconds: wall time of training and validation, all epochs (resumed ones included).
        epoch_seconds: wall time of each epoch.
        tau_end: the temperature the dynamic layers were left at (the schedule's current tau).
        attention_entropy: per dynamic layer, mean attention entropy (nats) on a validation
            batch at the end; ``log K`` is uniform, 0 is one kernel per sample.
        epochs_run: epochs completed.
        pruned: the epoch callback stopped training early.
        device: where it ran.
    """

    val_top1: list[float]
    best_val_top1: float
    final_loss: float
    train_loss: list[float]
    train_seconds: float
    epoch_seconds: list[float]
    tau_end: float
    attention_entropy: dict[str, float]
    epochs_run: int
    pruned: bool
    device: str

    @property
    def seconds_per_epoch(self) -> float:
        """Mean wall time of an epoch (NaN when none ran)."""
        return sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else math.nan


@dataclass
class _History:
    """Per-epoch record, saved in checkpoints so that a resumed run reports the whole run."""

    val_top1: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    pruned: bool = False


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: DataBundle,
    split: str = "val",
    *,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    amp: str = "auto",
) -> float:
    """Top-1 accuracy (%) of ``model`` on ``data``'s ``split``, at the layers' current tau.

    The model is moved to ``device``; its train/eval mode is restored afterwards.
    """
    dev = resolve_device(device)
    dtype = amp_dtype_for(amp, dev)
    part = data.split(split)
    loader = BatchLoader(part, batch_size, mean=data.mean, std=data.std, device=dev)
    was_training = model.training
    model.to(dev).eval()
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    for images, labels in loader:
        with autocast_for(dev, dtype):
            correct += (model(images).argmax(dim=1) == labels).sum()
    model.train(was_training)
    return 100.0 * int(correct) / len(part)


@torch.no_grad()
def _attention_entropy(model: nn.Module, data: DataBundle, run: TrainLoop) -> dict[str, float]:
    """Mean attention entropy (nats) of every dynamic layer on the first validation batch."""
    layers = dynamic_layers(model)
    if not layers:
        return {}
    loader = BatchLoader(data.val, run.config.eval_batch_size, mean=data.mean, std=data.std, device=run.device)
    images, _ = next(iter(loader))
    model.eval()
    with autocast_for(run.device, run.amp_dtype):
        model(images)
    entropy = {name: layer.attention_entropy() for name, layer in layers}
    return {name: value for name, value in entropy.items() if value is not None}


# ----------------------------------------------------------------------------- training


def train_loader(data: DataBundle, config: TrainConfig, generator: torch.Generator, device: torch.device) -> BatchLoader:
    """``config``'s training batches of ``data``: shuffled by ``generator``, augmented unless
    ``config.augment`` is off, the last partial batch dropped, at most ``max_steps_per_epoch``."""
    return BatchLoader(
        data.train,
        config.batch_size,
        mean=data.mean,
        std=data.std,
        augmentation=data.augmentation if config.augment else None,
        shuffle=True,
        drop_last=True,
        generator=generator,
        device=device,
        max_batches=config.max_steps_per_epoch,
    )


def sgd_with_schedule(
    model: nn.Module, config: TrainConfig, steps_per_epoch: int, device: torch.device
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """The recipe's optimizer and per-step lr schedule for ``model``.

    Nesterov SGD with weight decay on conv / linear weights only; linear warm-up over
    ``warmup_epochs``, then cosine to ~0 at ``epochs``. The fused kernel updates all parameters
    in one pass: 2.7x faster optimizer steps on CPU (benchmarks/bench_networks.py --fused-sgd),
    the same arithmetic.
    """
    optimizer = torch.optim.SGD(
        _param_groups(model, config.weight_decay),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
        fused=device.type in ("cpu", "cuda"),
    )
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(warmup, total))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv / linear weights only: decaying BN scales or biases only hurts."""
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            # Checked by name, not ndim: a DynamicConv2d bias is 2-D (K, Cout).
            (no_decay if isinstance(module, norms) or name == "bias" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor of step k: linear warm-up to 1 over ``warmup_steps``, then cosine to ~0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@dataclass
class TrainLoop:
    """What a training loop carries from step to step: its recipe, device, batches, schedules and
    optimizer. :func:`train_candidate` and the supernet trainer each build one with :func:`train_loop`."""

    config: TrainConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    loader: BatchLoader
    generator: torch.Generator
    tau_of: TemperatureSchedule
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch


def train_loop(
    model: nn.Module, data: DataBundle, config: TrainConfig, device: torch.device,
    schedule: TemperatureSchedule | None = None,
) -> TrainLoop:
    """``config``'s loop for ``model`` on ``device`` (moved there): seeded batches of ``data``, the
    optimizer and lr schedule (:func:`sgd_with_schedule`), ``schedule`` or the config's τ schedule."""
    amp_dtype = amp_dtype_for(config.amp, device)
    torch.manual_seed(config.seed)  # dropout and anything else drawing from the global RNG
    generator = torch.Generator().manual_seed(config.seed)  # order, crops and flips
    model.to(device)
    loader = train_loader(data, config, generator, device)
    steps = len(loader)
    optimizer, lr_scheduler = sgd_with_schedule(model, config, steps, device)
    return TrainLoop(
        config=config,
        device=device,
        amp_dtype=amp_dtype,
        loader=loader,
        generator=generator,
        tau_of=schedule or config.temperature_schedule(steps, config.epochs * steps),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        # Loss scaling is only needed for fp16; bf16 has fp32's exponent range.
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
    )


def _train_epoch(model: nn.Module, run: TrainLoop, epoch: int) -> float:
    """One pass over the training batches (``epoch`` is 0-based); returns the mean loss."""
    model.train()
    total = 0.0
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}", unit="step", leave=False, disable=run.config.quiet)
    for i, (images, labels) in enumerate(bar):
        step = epoch * run.steps_per_epoch + i
        tau = run.tau_of(step)
        set_temperature(model, tau)
        with autocast_for(run.device, run.amp_dtype):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=run.config.label_smoothing)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"training loss is {value} at epoch {epoch + 1}, step {i + 1} (optimizer step {step}, "
                f"tau={tau:g}); the candidate diverged (a lower `lr` may help)."
            )
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.lr_scheduler.step()
        total += value
        bar.set_postfix(loss=f"{value:.3f}", tau=f"{tau:.2f}", refresh=False)
    return total / run.steps_per_epoch


def train_candidate(
    model: nn.Module,
    data: DataBundle,
    config: TrainConfig | None = None,
    callback: EpochCallback | None = None,
    *,
    schedule: TemperatureSchedule | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Train ``model`` on ``data.train``, validating on ``data.val`` after every epoch.

    Args:
        model: the network, trained in place (left on the training device, in eval mode).
        data: the dataset; its test split is not used.
        config: training settings (default :class:`TrainConfig`).
        callback: ``callback(epoch, val_top1)`` after each epoch (1-based, %); ``True`` stops
            training and marks the result pruned.
        schedule: a ``step -> tau`` callable overriding ``config``'s temperature schedule.
        checkpoint_path: if given, the state after every epoch is saved there (atomically), and
            a run finding a checkpoint there resumes after its last saved epoch.

    Returns:
        The per-epoch validation accuracy, losses, timings, final tau and attention entropy.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite.
        DynasError: a bad device / amp setting, or an unusable checkpoint.
    """
    config = config or TrainConfig()
    with torch_threads(config.num_threads):
        return _train(model, data, config, callback, schedule, checkpoint_path)


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block (``None``: leave it), and restore it afterwards."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(
    model: nn.Module,
    data: DataBundle,
    config: TrainConfig,
    callback: EpochCallback | None,
    schedule: TemperatureSchedule | None,
    checkpoint_path: str | os.PathLike[str] | None,
) -> TrainResult:
    check_train_batches(config.batch_size, len(data.train))
    run = train_loop(model, data, config, resolve_device(config.device), schedule)
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    history = _load_checkpoint(path, model, run) if path is not None and path.exists() else _History()
    epochs = tqdm(range(len(history.val_top1), config.epochs), desc="epochs", unit="epoch", disable=config.quiet)
    for epoch in epochs:
        start = time.perf_counter()
        loss = _train_epoch(model, run, epoch)
        # Validate at the schedule's current tau: tau_end once annealing is over.
        set_temperature(model, run.tau_of((epoch + 1) * run.steps_per_epoch))
        top1 = evaluate(model, data, "val", batch_size=config.eval_batch_size, device=run.device, amp=config.amp)
        history.train_loss.append(loss)
        history.val_top1.append(top1)
        history.epoch_seconds.append(time.perf_counter() - start)
        epochs.set_postfix(loss=f"{loss:.3f}", val_top1=f"{top1:.2f}")
        if path is not None:
            _save_checkpoint(path, model, run, history)
        if callback is not None and callback(epoch + 1, top1):
            history.pruned = True
            break
    return _result(model, data, run, history)


def _result(model: nn.Module, data: DataBundle, run: TrainLoop, history: _History) -> TrainResult:
    tau = run.tau_of(len(history.val_top1) * run.steps_per_epoch)
    set_temperature(model, tau)
    return TrainResult(
        val_top1=list(history.val_top1),
        best_val_top1=max(history.val_top1, default=math.nan),
        final_loss=history.train_loss[-1] if history.train_loss else math.nan,
        train_loss=list(history.train_loss),
        train_seconds=sum(history.epoch_seconds),
        epoch_seconds=list(history.epoch_seconds),
        tau_end=float(tau),
        attention_entropy=_attention_entropy(model, data, run),
        epochs_run=len(history.val_top1),
        pruned=history.pruned,
        device=str(run.device),
    )


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, model: nn.Module, run: TrainLoop, history: _History) -> None:
    """Write the resumable state; a crash mid-write leaves the previous checkpoint intact."""
    state = {
        "model": model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "generator": run.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "total_steps": run.total_steps,
        # Pruning is the caller's decision, so it is not saved: resuming means continuing.
        "history": {k: v for k, v in asdict(history).items() if k != "pruned"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model: nn.Module, run: TrainLoop) -> _History:
    """Restore the state saved by :func:`_save_checkpoint`; returns the history so far."""
    try:
        state = torch.load(path, map_location=run.device, weights_only=True)
        if state["total_steps"] != run.total_steps:
            raise DynasError(
                f"checkpoint {str(path)!r} is of a run with {state['total_steps']} optimizer steps, but this "
                f"run has {run.total_steps}; use the same epochs / batch size / data, or another path."
            )
        model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.lr_scheduler.load_state_dict(state["lr_scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        run.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        return _History(**state["history"])
    except DynasError:
        raise
    except Exception as err:  # truncated file, other model, foreign pickle: all mean "unusable"
        raise DynasError(f"checkpoint {str(path)!r} cannot be resumed from: {type(err).__name__}: {err}") from None
