"""Train a supernet with the sandwich rule and in-place distillation (BigNAS, AttentiveNAS).

Every optimizer step trains, on the same batch, the space's largest subnet on the labels, then
its smallest and ``num_random`` uniformly drawn subnets on the largest's soft outputs (in-place
distillation: the teacher is the supernet itself, in the same step), accumulating the gradients
of all of them into one step. The recipe otherwise is :func:`dynas.training.train_candidate`'s
(SGD + Nesterov, warm-up + cosine, label smoothing, weight decay on weights only), and the
temperature of every dynamic layer is annealed per step on the supernet's own schedule
(``TrainConfig.tau_start`` -> ``tau_end`` over ``anneal_fraction`` of the steps) -- the
``tau_start`` / ``anneal_fraction`` choices of a space play no part.

Multi-process: under ``torchrun`` (or with a process group already initialised) the supernet is
wrapped in DistributedDataParallel (gloo on CPU, NCCL on CUDA, one GPU per process). Every process
draws the same global batch and the same subnets, and trains on its share of the batch::

    torchrun --nproc-per-node 2 my_script.py     # my_script.py calls train_supernet(...)

With ``run_dir``, a checkpoint is written after every epoch (atomically) and a rerun resumes from
it; the trained supernet is written to ``run_dir/supernet.pt``.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from dynas.checks import check_int
from dynas.data import DataBundle
from dynas.errors import DynasError
from dynas.spec import ArchSpec
from dynas.supernet.model import Supernet, atomic_save, read_torch_file
from dynas.supernet.score import score_subnet
from dynas.training import (
    EpochCallback,
    NonFiniteLossError,
    TrainConfig,
    TrainLoop,
    autocast_for,
    resolve_device,
    torch_threads,
    train_loop,
)

__all__ = [
    "CHECKPOINT_NAME",
    "SUPERNET_ANNEAL_FRACTION",
    "SUPERNET_NAME",
    "SupernetTrainConfig",
    "SupernetTrainResult",
    "init_distributed",
    "sandwich",
    "train_supernet",
]

CHECKPOINT_NAME = "checkpoint.pt"  # in run_dir, rewritten after every epoch
SUPERNET_NAME = "supernet.pt"  # in run_dir, the trained supernet (Supernet.save)
_CHECKPOINT_FORMAT = "dynas-supernet-checkpoint"

#: The supernet's default share of steps annealing tau to 1: the whole run. With tau at 1 after
#: 10% of a 20-epoch digits run, the largest subnet (K = 8 everywhere) collapsed to near chance
#: (9.7-25% val top-1) once tau reached 1; annealed over the whole run it reached 97.2%.
SUPERNET_ANNEAL_FRACTION = 1.0


@dataclass(frozen=True)
class SupernetTrainConfig:
    """How to train a supernet: a candidate's recipe plus the sandwich rule.

    ``train.batch_size`` is the global batch (split over the processes); ``train.epochs``,
    ``lr``, the tau schedule and the rest mean what they mean for one candidate.
    """

    # the per-step recipe, as for a stand-alone candidate, but tau annealed over the whole run
    train: TrainConfig = field(default_factory=lambda: TrainConfig(anneal_fraction=SUPERNET_ANNEAL_FRACTION))
    # random subnets per step besides the largest and the smallest (BigNAS: 2). On digits, 2 left the
    # subnets in between under-trained (Kendall tau +0.02 against stand-alone), 4 reached +0.29.
    num_random: int = 4
    distill: bool = True  # the others learn from the largest's soft outputs; False: from the labels
    # also train the largest all-static subnet every step (one more forward/backward), so that
    # with kernel_bank="separate" the static kernels learn at full width and depth, as the
    # all-dynamic largest does not train them (README: one-shot ranking)
    largest_static: bool = False
    # every other random subnet is the one drawn before it made all static (its static twin), so
    # that with kernel_bank="separate" the static kernels train at every size as often as the
    # dynamic ones, and twins differ only in their dynamic layers (README: one-shot ranking)
    static_twins: bool = False
    val_calib_images: int = 1000  # BN recalibration images for the per-epoch validation; 0: no validation

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            raise DynasError(f"`train` must be a TrainConfig, but got train={self.train!r}.")
        for name in ("num_random", "val_calib_images"):
            check_int(name, getattr(self, name), 0)
        if self.val_calib_images == 1:
            raise DynasError("`val_calib_images` must be 0 (no validation) or >= 2, but got val_calib_images=1.")
        for name in ("distill", "largest_static", "static_twins"):
            if not isinstance(getattr(self, name), bool):
                raise DynasError(f"`{name}` must be a bool, but got {name}={getattr(self, name)!r}.")


@dataclass
class SupernetTrainResult:
    """What training a supernet produced.

    Attributes:
        train_loss: per epoch, the largest subnet's mean training loss.
        val_top1_largest, val_top1_smallest: per epoch, validation top-1 (%) of the largest and
            smallest subnets after BN recalibration (NaN without validation).
        epoch_seconds: wall time of each epoch; ``train_seconds`` is their sum.
        epochs_run: epochs completed (resumed ones included).
        stopped: the epoch callback stopped training early.
        tau_end: the temperature the supernet was left at.
        world_size: processes that trained; device: where this one ran.
        path: ``run_dir/supernet.pt``, or None without ``run_dir``.
    """

    train_loss: list[float]
    val_top1_largest: list[float]
    val_top1_smallest: list[float]
    epoch_seconds: list[float]
    train_seconds: float
    epochs_run: int
    stopped: bool
    tau_end: float
    world_size: int
    device: str
    path: Path | None


@dataclass
class _History:
    """Per-epoch record, kept in checkpoints so that a resumed run reports the whole run."""

    train_loss: list[float] = field(default_factory=list)
    val_top1_largest: list[float] = field(default_factory=list)
    val_top1_smallest: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- processes


def init_distributed(device: str | torch.device = "auto") -> tuple[int, int, bool]:
    """Join the process group ``torchrun`` describes in the environment, if any.

    Returns ``(rank, world_size, started)``; ``started`` is True when this call initialised the
    group (then :func:`train_supernet` destroys it at the end). The backend is NCCL for a CUDA
    device, gloo otherwise. Without ``WORLD_SIZE > 1`` and no group, it is ``(0, 1, False)``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), True


def _process_device(device: str, world: int) -> torch.device:
    """The configured device; with several processes on CUDA, this process' GPU (LOCAL_RANK)."""
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1 and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def _all_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(value)
        value = value / world
    return value


def _from_rank0(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- setup


@dataclass
class _Run:
    """Everything one supernet training run carries from step to step."""

    config: SupernetTrainConfig
    supernet: Supernet
    model: torch.nn.Module  # the supernet, or its DistributedDataParallel wrapper
    rank: int
    world: int
    loop: TrainLoop  # config.train's device, batches, schedules and optimizer


def _setup(supernet: Supernet, data: DataBundle, config: SupernetTrainConfig, rank: int, world: int) -> _Run:
    cfg = config.train
    supernet.check_data(data)
    if cfg.batch_size % world:
        raise DynasError(
            f"`batch_size` (the global batch) must be divisible by the {world} processes, "
            f"but got batch_size={cfg.batch_size}."
        )
    device = _process_device(cfg.device, world)
    # One seed on every process: the same dropout, and the same global batches everywhere.
    loop = train_loop(supernet, data, cfg, device)
    # Zero momentum buffers up front: the first update of each is then grad, as when SGD creates
    # it lazily, but a parameter first used after step 1 (an operator that neither the largest
    # nor the smallest subnet has) does not mix buffers and None, which fused SGD refuses.
    for group in loop.optimizer.param_groups:
        for param in group["params"]:
            loop.optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    model: torch.nn.Module = supernet
    if world > 1:
        # Each subnet leaves parts of the supernet unused; find_unused_parameters lets DDP reduce
        # the gradients the sandwich accumulated (under no_sync) over all of its subnets.
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(supernet, device_ids=ids, find_unused_parameters=True)
    return _Run(config=config, supernet=supernet, model=model, rank=rank, world=world, loop=loop)


# ----------------------------------------------------------------------------- one step


def sandwich(
    supernet: Supernet, step: int, num_random: int, seed: int = 0, *, largest_static: bool = False,
    static_twins: bool = False,
) -> list[ArchSpec]:
    """The subnets of optimizer step ``step``: largest, (largest static,) smallest, random ones.

    The first is the largest subnet (the teacher); with ``largest_static`` the largest
    all-static subnet follows it. Then the smallest and ``num_random`` random subnets drawn
    uniformly over the space's choices, seeded by ``(seed, step)``, so every process (and a
    resumed run) draws the same. With ``static_twins`` every second random subnet is the one
    before it made all static (``MobileSpace.static_of``): ``num_random = 4`` is two draws and
    their static twins (an odd count ends on a draw).
    """
    rng = random.Random(f"{seed}/{step}")
    drawn: list[ArchSpec] = []
    params: Any = None
    for n in range(num_random):
        if static_twins and n % 2:
            drawn.append(supernet.space.static_of(params))
        else:
            candidate = supernet.space.sample(seed=rng.randrange(2**63))
            params = candidate.params
            drawn.append(candidate.arch)
    anchors = [supernet.largest, supernet.largest_static] if largest_static else [supernet.largest]
    return [*anchors, supernet.smallest, *drawn]


def _sandwich_step(run: _Run, images: torch.Tensor, labels: torch.Tensor, archs: list[ArchSpec]) -> torch.Tensor:
    """Forward and backward every subnet of the step; returns their losses (len(archs),)."""
    smoothing = run.config.train.label_smoothing
    losses = []
    teacher: torch.Tensor | None = None
    for n, arch in enumerate(archs):
        # Gradients accumulate locally; DDP reduces them once, in the last subnet's backward.
        sync = nullcontext() if run.world == 1 or n == len(archs) - 1 else run.model.no_sync()
        with sync, run.supernet.activate(arch):
            with autocast_for(run.loop.device, run.loop.amp_dtype):
                logits = run.model(images).float()  # (B, num_classes)
            if teacher is None:
                loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
                teacher = logits.detach().softmax(dim=1)  # (B, num_classes): the soft targets
            elif run.config.distill:
                loss = -(teacher * logits.log_softmax(dim=1)).sum(dim=1).mean()
            else:
                loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
            run.loop.scaler.scale(loss).backward()
        losses.append(loss.detach())
    return torch.stack(losses)


def _train_epoch(run: _Run, epoch: int) -> float:
    """One pass (``epoch`` 0-based); returns the largest subnet's mean loss over all processes."""
    run.model.train()
    total = torch.zeros((), device=run.loop.device)
    quiet = run.config.train.quiet or run.rank != 0
    bar = tqdm(run.loop.loader, desc=f"supernet epoch {epoch + 1}", unit="step", leave=False, disable=quiet)
    for i, (images, labels) in enumerate(bar):
        step = epoch * run.loop.steps_per_epoch + i
        tau = run.loop.tau_of(step)
        run.supernet.temperature = tau
        archs = sandwich(
            run.supernet, step, run.config.num_random, run.config.train.seed, largest_static=run.config.largest_static,
            static_twins=run.config.static_twins,
        )
        run.loop.optimizer.zero_grad(set_to_none=True)
        # This process' share of the global batch.
        losses = _sandwich_step(run, images[run.rank :: run.world], labels[run.rank :: run.world], archs)
        losses = _all_mean(losses, run.world)  # every process stops together on a bad loss
        if not bool(torch.isfinite(losses).all()):
            bad = int((~torch.isfinite(losses)).nonzero()[0])
            raise NonFiniteLossError(
                f"supernet training loss is {float(losses[bad])} for subnet {archs[bad].to_str()!r} at epoch "
                f"{epoch + 1}, step {i + 1} (optimizer step {step}, tau={tau:g}); a lower `lr` may help."
            )
        run.loop.scaler.step(run.loop.optimizer)
        run.loop.scaler.update()
        run.loop.lr_scheduler.step()
        total += losses[0]
        bar.set_postfix(loss=f"{float(losses[0]):.3f}", tau=f"{tau:.2f}", refresh=False)
    return float(total) / run.loop.steps_per_epoch


def _validate(run: _Run, data: DataBundle) -> tuple[float, float]:
    """Val top-1 (%) of the largest and smallest subnets after BN recalibration (process 0's)."""
    n = run.config.val_calib_images
    if n == 0:
        return math.nan, math.nan
    tops = (math.nan, math.nan)
    if run.rank == 0:
        cfg = run.config.train
        kwargs = {"calib_images": n, "seed": cfg.seed, "batch_size": cfg.eval_batch_size, "device": run.loop.device}
        archs = (run.supernet.largest, run.supernet.smallest)
        tops = tuple(score_subnet(run.supernet, a, data, amp=cfg.amp, **kwargs).top1 for a in archs)
    return _from_rank0(tops, run.world)


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, run: _Run, history: _History) -> None:
    state = {
        "format": _CHECKPOINT_FORMAT,
        **run.supernet.identity(),
        "supernet": run.supernet.state_dict(),
        "optimizer": run.loop.optimizer.state_dict(),
        "lr_scheduler": run.loop.lr_scheduler.state_dict(),
        "scaler": run.loop.scaler.state_dict(),
        "generator": run.loop.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "total_steps": run.loop.total_steps,
        "history": asdict(history),
    }
    atomic_save(state, path)


def _load_checkpoint(path: Path, run: _Run) -> _History:
    """Restore the state :func:`_save_checkpoint` wrote; returns the history so far."""
    what = f"supernet checkpoint {str(path)!r}"
    state = read_torch_file(path, what, run.loop.device)
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise DynasError(
            f"{what} is not a supernet checkpoint: `format` must be {_CHECKPOINT_FORMAT!r}; use another run_dir."
        )
    run.supernet.check_identity(state, what)
    if state.get("total_steps") != run.loop.total_steps:
        raise DynasError(
            f"{what} is of a run with total_steps={state.get('total_steps')}, but this run has {run.loop.total_steps}; "
            "use the same epochs / batch size / data, or another run_dir."
        )
    try:
        run.supernet.load_state_dict(state["supernet"])
        run.loop.optimizer.load_state_dict(state["optimizer"])
        run.loop.lr_scheduler.load_state_dict(state["lr_scheduler"])
        run.loop.scaler.load_state_dict(state["scaler"])
        run.loop.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        return _History(**state["history"])
    except Exception as err:  # a damaged or hand-edited checkpoint
        reason = (str(err).strip().splitlines() or [""])[-1][:200]
        raise DynasError(f"{what} cannot be resumed from: {type(err).__name__}: {reason}") from None


# ----------------------------------------------------------------------------- the loop


def train_supernet(
    supernet: Supernet,
    data: DataBundle,
    config: SupernetTrainConfig | None = None,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    callback: EpochCallback | None = None,
) -> SupernetTrainResult:
    """Train ``supernet`` in place on ``data.train`` with the sandwich rule.

    Args:
        supernet: the supernet (left on the training device, in eval mode, at the final tau).
        data: the dataset; its classes and image size must be the supernet's.
        config: the recipe (default :class:`SupernetTrainConfig`).
        run_dir: if given, ``checkpoint.pt`` is written there after every epoch (a rerun with
            the same settings resumes after its last epoch) and ``supernet.pt`` at the end.
        callback: ``callback(epoch, val_top1_largest)`` after each epoch (1-based); ``True``
            stops training (process 0 decides for all).

    Under ``torchrun`` every process calls this with the same arguments; process 0 writes the
    files and validates.

    Raises:
        NonFiniteLossError: a loss became NaN or infinite.
        DynasError: data that does not fit the supernet, a bad setting, or a checkpoint of
            another supernet / run.
    """
    config = config or SupernetTrainConfig()
    if not isinstance(config, SupernetTrainConfig):
        raise TypeError(f"`config` must be a SupernetTrainConfig, but got {type(config).__name__}.")
    rank, world, started = init_distributed(config.train.device)
    try:
        with torch_threads(config.train.num_threads):
            return _train(supernet, data, config, rank, world, run_dir, callback)
    finally:
        if started:
            dist.destroy_process_group()


def _train(
    supernet: Supernet,
    data: DataBundle,
    config: SupernetTrainConfig,
    rank: int,
    world: int,
    run_dir: str | os.PathLike[str] | None,
    callback: EpochCallback | None,
) -> SupernetTrainResult:
    run = _setup(supernet, data, config, rank, world)
    out = Path(run_dir) if run_dir is not None else None
    checkpoint = out / CHECKPOINT_NAME if out is not None else None
    history = _load_checkpoint(checkpoint, run) if checkpoint is not None and checkpoint.exists() else _History()
    stopped = False
    epochs = range(len(history.train_loss), config.train.epochs)
    for epoch in tqdm(epochs, desc="supernet", unit="epoch", disable=config.train.quiet or rank != 0):
        start = time.perf_counter()
        loss = _train_epoch(run, epoch)
        supernet.temperature = run.loop.tau_of((epoch + 1) * run.loop.steps_per_epoch)
        largest, smallest = _validate(run, data)
        history.train_loss.append(loss)
        history.val_top1_largest.append(largest)
        history.val_top1_smallest.append(smallest)
        history.epoch_seconds.append(time.perf_counter() - start)
        supernet.progress = _progress(run, history)
        if checkpoint is not None and rank == 0:
            _save_checkpoint(checkpoint, run, history)
        stopped = _from_rank0(bool(callback is not None and callback(epoch + 1, largest)), world)
        if world > 1:
            dist.barrier()  # no process moves on (or reads the checkpoint) before it is written
        if stopped:
            break
    return _finish(run, history, stopped, out)


def _progress(run: _Run, history: _History) -> dict[str, Any]:
    done = len(history.train_loss)
    return {
        "epochs_done": done,
        "epochs": run.config.train.epochs,
        "steps_done": done * run.loop.steps_per_epoch,
        "world_size": run.world,
        **asdict(history),
    }


def _finish(run: _Run, history: _History, stopped: bool, out: Path | None) -> SupernetTrainResult:
    supernet = run.supernet
    tau = run.loop.tau_of(len(history.train_loss) * run.loop.steps_per_epoch)
    supernet.temperature = tau
    supernet.progress = {**_progress(run, history), "stopped": stopped}
    supernet.eval()
    if run.world > 1:
        # Each process updated BN statistics on its own share of the batches; all keep process 0's,
        # so that every process holds the supernet that is saved.
        for buffer in supernet.buffers():
            dist.broadcast(buffer, src=0)
    path = out / SUPERNET_NAME if out is not None else None
    if path is not None and run.rank == 0:
        supernet.save(path)
    if run.world > 1:
        dist.barrier()
    return SupernetTrainResult(
        train_loss=list(history.train_loss),
        val_top1_largest=list(history.val_top1_largest),
        val_top1_smallest=list(history.val_top1_smallest),
        epoch_seconds=list(history.epoch_seconds),
        train_seconds=sum(history.epoch_seconds),
        epochs_run=len(history.train_loss),
        stopped=stopped,
        tau_end=float(tau),
        world_size=run.world,
        device=str(run.loop.device),
        path=path,
    )
