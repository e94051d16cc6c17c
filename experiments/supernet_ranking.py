"""Does a supernet rank subnets as stand-alone training does? Kendall tau within a MAC band.

1. Train a weight-sharing supernet of ``--space`` (default ``mobile_cifar``; ``mobile_cifar_ops``
   adds ODConv and DCD blocks) with the sandwich rule and in-place distillation
   (:func:`dynas.supernet.train_supernet`), resumable in ``--out/supernet``.
2. Sample ``--num-subnets`` subnets stratified over a MAC band (closed-form MACs at the data's
   resolution): ``--strata`` equal-width MAC bins, each holding as many static-only subnets (no
   dynamic block) as subnets drawn from the whole space (almost always mixed static / dynamic).
3. Score each with inherited weights (BN recalibration, then val top-1; :func:`score_subnet`).
4. Train each stand-alone with the same recipe (the supernet's per-step recipe, ``--epochs``
   epochs) for ``--seeds`` seeds; the stand-alone accuracy is the final val top-1 after the same
   BatchNorm recalibration as the supernet's scoring (precise BN), seed mean.
5. Report Kendall tau (within the band) between supernet and stand-alone top-1, against the
   stand-alone seed-to-seed tau (the ceiling a proxy can reach) and MACs alone (the floor), the
   tau within static-only and within dynamic subnets and across the two kinds (with the points by
   which the supernet favours mixed subnets), and seconds per scored candidate against
   seconds per stand-alone training. With ``--proxy-epochs E`` each subnet is also trained E
   epochs, the proxy a scratch search trains, and one such run per subnet is ranked against the
   same truth: the supernet's rival at its own cost.

The sampled ``tau_start`` / ``anneal_fraction`` choices play no part: every network anneals tau
from ``--tau-start`` over ``--anneal-fraction`` of its steps (the supernet over
``--supernet-anneal-fraction`` when given: an ablation that keeps the stand-alone truth). On the
shared JPEG (q75) CIFAR-10 pack absolute accuracies sit 1-2.5 points under exact pixels; rankings
are what is compared.

    python ../shared/data/cifar10/to_batches.py ../shared/data/cifar10/cifar10_full_jpegq75_pack.npz ~/.cache/cifar/full
    python experiments/supernet_ranking.py --data-root ~/.cache/cifar/full/cifar-10-batches-py \\
        --supernet-epochs 30 --epochs 10 --num-subnets 24 --mac-band 5M:15M

A smoke run (seconds; digits at 16x16, where MACs are a quarter of 32x32's)::

    python experiments/supernet_ranking.py --dataset digits --input-size 16 --train-subset 300 \\
        --supernet-epochs 2 --epochs 2 --max-steps-per-epoch 3 --batch-size 32 --num-subnets 4 \\
        --strata 2 --mac-band 0.8M:2.5M --calib-images 64 --num-threads 1 --quiet --out /tmp/ranking

Stand-alone results are appended to ``--out/standalone.jsonl`` as they finish, and a rerun skips
those already there; ``results.jsonl`` (one row per subnet), ``summary.json`` and
``config.yaml`` are written at the end. ``--shard I/N`` splits the stand-alone runs over N copies
of the command on one ``--out``, started together (one core each, ``--num-threads 1``): copy 0
trains the supernet first, copy I trains every N-th stand-alone run from the I-th, and the last
copy to finish writes the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _args import add_data_args, add_run_args, parse_args, run, train_subset

from dynas.builder import build_model
from dynas.checks import check_int, check_number
from dynas.config import write_resolved
from dynas.cost import closed_form_macs, closed_form_params, parse_count
from dynas.data import DataBundle, load_data
from dynas.errors import DynasError
from dynas.spec import ArchSpec
from dynas.supernet import Supernet, SupernetTrainConfig, SupernetTrainResult, recalibrate_bn, score_subnet, train_supernet
from dynas.supernet.model import KERNEL_BANKS
from dynas.supernet.train import SUPERNET_ANNEAL_FRACTION
from dynas.training import TrainConfig, evaluate, train_candidate
from dynas.spaces import get_space
from search_spaces.mobile import MobileSpace

__all__ = [
    "Subnet", "add_band_args", "add_recipe_args", "build_parser", "check_run_args", "kendall_tau", "load_space",
    "main", "parse_band", "read_runs", "recipe_config", "sample_in_band", "twins",
]


@dataclasses.dataclass(frozen=True)
class Subnet:
    """One sampled subnet: its arch, kind (``"static"`` or ``"dynamic"``), MACs, MAC bin and draw.

    ``draw`` numbers the uniform sample it came from: a static-only and a dynamic subnet of one
    draw are twins, the same network but for static or dynamic convolution (:func:`twins`).
    """

    arch: ArchSpec
    kind: str
    macs: int
    stratum: int
    draw: int = -1


def add_band_args(parser: argparse.ArgumentParser) -> None:
    """``--space``, ``--mac-band``, ``--num-subnets`` and ``--strata``: which subnets are sampled."""
    band = parser.add_argument_group("subnets")
    band.add_argument("--space", default="mobile_cifar", help="a registered mobile space, e.g. mobile_cifar_ops")
    band.add_argument("--mac-band", default="5M:15M", help="LOW:HIGH closed-form MACs at the data's resolution")
    band.add_argument("--num-subnets", type=int, default=16, help="subnets sampled in the band (>= 4)")
    band.add_argument("--strata", type=int, default=4, help="equal-width MAC bins of the band")


def add_recipe_args(group: argparse._ArgumentGroup) -> None:
    """The per-step recipe every network here trains with: batch size, lr, weight decay and tau."""
    group.add_argument("--batch-size", type=int, default=128)
    group.add_argument("--lr", type=float, default=0.05)
    group.add_argument("--weight-decay", type=float, default=4e-5)
    group.add_argument("--tau-start", type=float, default=30.0)
    group.add_argument("--anneal-fraction", type=float, default=SUPERNET_ANNEAL_FRACTION, help="share of steps annealing tau to 1")


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--config file.yaml`` sets defaults that flags override."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file of defaults (flag names as keys)")
    add_data_args(parser, "resize images (default: native; 32 for digits)")
    add_band_args(parser)
    sup = parser.add_argument_group("supernet")
    sup.add_argument("--supernet-epochs", type=int, default=30)
    sup.add_argument("--num-random", type=int, default=SupernetTrainConfig.num_random, help="random subnets per step besides largest / smallest")
    sup.add_argument("--no-distill", action="store_true", help="train every subnet on the labels")
    sup.add_argument("--supernet-seed", type=int, default=None,
                     help="the supernet's init, batch order and sandwich draws (default: --seed); the subnets, data "
                     "split and stand-alone rows stay --seed's, so two supernet seeds score the same truth")
    sup.add_argument("--largest-static", action="store_true",
                     help="also train the largest all-static subnet every step (its static kernels at full width)")
    sup.add_argument("--static-twins", action="store_true",
                     help="every second random subnet of a step is the one before it made all static")
    sup.add_argument("--kernel-bank", choices=KERNEL_BANKS, default="residual",
                     help="a dynamic layer's K kernels: residual (kernel k = W0 + D_k), independent or separate (static kernel apart)")
    sup.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=True,
                     help="start the always-residual blocks as the identity (last BN scale 0, BigNAS)")
    sup.add_argument(
        "--supernet-anneal-fraction", type=float, default=None,
        help="the supernet's share of steps annealing tau to 1 (default: --anneal-fraction, the stand-alone runs')",
    )
    sup.add_argument("--calib-images", type=int, default=2000, help="BN recalibration images per scored subnet")
    sup.add_argument(
        "--score-calib-images", type=int, default=None,
        help="BN recalibration images for the supernet's scores only (default: --calib-images); the stand-alone "
             "rows keep --calib-images, so a rerun on the same --out scores the trained supernet again at this count "
             "(rewriting results.jsonl and summary.json; the supernet and stand-alone rows are kept)",
    )
    train = parser.add_argument_group("training (the recipe of both)")
    train.add_argument("--epochs", type=int, default=10, help="stand-alone epochs")
    train.add_argument("--seeds", type=int, default=2, help="stand-alone seeds per subnet (>= 2 for the ceiling)")
    train.add_argument(
        "--proxy-epochs", type=int, default=None,
        help="also train each subnet this many epochs, a scratch search's proxy, and rank it against the truth too",
    )
    add_recipe_args(train)
    add_run_args(train, "data split, sampling, supernet, calibration")
    parser.add_argument("--out", default="runs/supernet_ranking", help="folder for the supernet and the results")
    parser.add_argument(
        "--shard", default="0/1",
        help="I/N: train only every N-th stand-alone run, from the I-th (run N copies with I = 0..N-1 "
             "on one --out to use N cores; the last to finish writes the results)",
    )
    parser.add_argument(
        "--standalone-only", action="store_true",
        help="train (this shard's share of) the stand-alone runs and stop: no supernet, no scores; a later "
             "run on the same --out reuses the rows",
    )
    return parser


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/2"`` -> ``(1, 2)``: shard index I and count N, 0 <= I < N."""
    index, sep, count = str(text).partition("/")
    try:
        shard = (int(index), int(count)) if sep else None
    except ValueError:
        shard = None
    if shard is None or not 0 <= shard[0] < shard[1]:
        raise DynasError(f"`--shard` must be I/N with 0 <= I < N, such as 0/2, but got {text!r}.")
    return shard


def check_run_args(args: argparse.Namespace) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(band, shard)`` of ``args``, with ``--seeds`` checked (before any data or file).

    Raises:
        DynasError: a bad ``--mac-band``, ``--shard`` or ``--seeds``.
    """
    band, shard = parse_band(args.mac_band), parse_shard(args.shard)
    if args.seeds < 1:
        raise DynasError(f"`--seeds` must be an integer >= 1, but got seeds={args.seeds}.")
    return band, shard


def load_space(args: argparse.Namespace) -> tuple[DataBundle, MobileSpace]:
    """The data of ``args`` and ``--space`` at its resolution and class count.

    Raises:
        DynasError: unreadable data, or a space that is not a mobile space (a supernet needs one).
    """
    data = load_data(args.dataset, args.data_root, val_fraction=args.val_fraction, train_subset=train_subset(args),
                     input_size=args.input_size, seed=args.seed)
    space = get_space(args.space, input_size=data.input_size, num_classes=data.num_classes)
    if not isinstance(space, MobileSpace):
        raise DynasError(f"`--space` must be a mobile space (a supernet needs one), but got space={args.space!r}.")
    return data, space


def parse_band(text: str) -> tuple[int, int]:
    """``"5M:15M"`` -> ``(5_000_000, 15_000_000)``."""
    low, sep, high = str(text).partition(":")
    try:
        band = (parse_count(low), parse_count(high)) if sep else None
    except ValueError as err:
        raise DynasError(f"`--mac-band` must be LOW:HIGH MACs such as 5M:15M, but got {text!r}: {err}.") from None
    if band is None or band[0] >= band[1]:
        raise DynasError(f"`--mac-band` must be LOW:HIGH MACs with LOW < HIGH, such as 5M:15M, but got {text!r}.")
    return band


def sample_in_band(
    space: MobileSpace, band: tuple[int, int], num_subnets: int, strata: int, seed: int = 0, max_draws: int = 200_000
) -> list[Subnet]:
    """Distinct subnets stratified over ``band``: per MAC bin, static-only and dynamic alike.

    Quotas per (bin, kind) differ by at most one. Each draw is a uniform sample of the space
    (a "dynamic" subnet: it has a dynamic block) and the same sample made all static.

    Raises:
        DynasError: the quotas are not filled after ``max_draws`` draws (a band the space
            barely reaches).
    """
    if num_subnets < 2 * strata or strata < 1:
        raise DynasError(
            f"`--num-subnets` must be >= 2 * `--strata` (a static and a dynamic subnet per bin), but got "
            f"num_subnets={num_subnets}, strata={strata}."
        )
    low, high = band
    cells = [(s, kind) for s in range(strata) for kind in ("static", "dynamic")]
    quota = {cell: num_subnets // len(cells) + (i < num_subnets % len(cells)) for i, cell in enumerate(cells)}
    rng = random.Random(seed)
    chosen: dict[ArchSpec, Subnet] = {}
    for draw in range(max_draws):
        params = dict(space.sample(seed=rng.randrange(2**63)).params)
        for arch in (space.decode(params).arch, space.static_of(params)):
            kind = "dynamic" if any(b.is_dynamic for b in arch.blocks) else "static"
            macs = closed_form_macs(arch)
            if not low <= macs < high or arch in chosen:
                continue
            stratum = min(strata - 1, (macs - low) * strata // (high - low))
            if quota[(stratum, kind)] > 0:
                quota[(stratum, kind)] -= 1
                chosen[arch] = Subnet(arch, kind, macs, stratum, draw)
        if not any(quota.values()):
            return sorted(chosen.values(), key=lambda s: s.macs)
    left = {f"bin {s + 1} {kind}": n for (s, kind), n in quota.items() if n}
    raise DynasError(
        f"`--mac-band` {low}:{high} is barely reached by {space.name!r}: after {max_draws} draws still missing {left}; "
        f"widen the band or use fewer `--num-subnets` / `--strata`."
    )


def twins(subnets: Sequence[Subnet]) -> list[tuple[Subnet, Subnet]]:
    """(static-only, dynamic) pairs of one draw in ``subnets``, in MAC order of the static one."""
    by_draw: dict[int, dict[str, Subnet]] = {}
    for subnet in subnets:
        if subnet.draw >= 0:
            by_draw.setdefault(subnet.draw, {})[subnet.kind] = subnet
    pairs = [(d["static"], d["dynamic"]) for d in by_draw.values() if len(d) == 2]
    return sorted(pairs, key=lambda pair: (pair[0].macs, pair[0].arch.to_str()))


def _tau_b(x: Sequence[float], y: Sequence[float], pairs: Any) -> float:
    """Kendall's tau-b of ``x`` and ``y`` over the index ``pairs`` (NaN when none is untied)."""

    def sign(v: float) -> int:
        return (v > 0) - (v < 0)

    num = tx = ty = 0
    for i, j in pairs:
        a, b = sign(x[i] - x[j]), sign(y[i] - y[j])
        num += a * b
        tx += a * a
        ty += b * b
    return num / math.sqrt(tx * ty) if tx and ty else math.nan


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long sequences (NaN when fewer than two or all tied)."""
    if len(x) != len(y):
        raise ValueError(f"`x` and `y` must have the same length, but got {len(x)} and {len(y)}.")
    return _tau_b(x, y, itertools.combinations(range(len(x)), 2))


def kendall_tau_interval(
    x: Sequence[float], y: Sequence[float], level: float = 0.9, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """A bootstrap interval of Kendall's tau-b: ``level`` percentile interval over subnets resampled with replacement.

    How far tau of this many subnets could move with other subnets drawn from the same band
    (a resample's repeated subnet ties with itself and counts in no pair). Seeded: reproducible.
    """
    if len(x) != len(y):
        raise ValueError(f"`x` and `y` must have the same length, but got {len(x)} and {len(y)}.")
    rng = random.Random(seed)
    taus = []
    for _ in range(resamples):
        pick = [rng.randrange(len(x)) for _ in range(len(x))]
        tau = kendall_tau([x[i] for i in pick], [y[i] for i in pick])
        if not math.isnan(tau):
            taus.append(tau)
    if not taus:
        return math.nan, math.nan
    taus.sort()
    tail = (1 - level) / 2
    return taus[int(tail * (len(taus) - 1))], taus[math.ceil((1 - tail) * (len(taus) - 1))]


def kendall_tau_across(x: Sequence[float], y: Sequence[float], group: Sequence[str]) -> float:
    """Kendall's tau-b over the pairs whose two members lie in different ``group`` s only.

    With static-only and mixed subnets as the groups: how well the kinds are ordered against each
    other, the pairs neither within-kind tau counts (NaN when no such pair is untied).
    """
    if not len(x) == len(y) == len(group):
        raise ValueError(f"`x`, `y` and `group` must have the same length, but got {len(x)}, {len(y)} and {len(group)}.")
    return _tau_b(x, y, ((i, j) for i, j in itertools.combinations(range(len(x)), 2) if group[i] != group[j]))


def _configs(args: argparse.Namespace) -> tuple[SupernetTrainConfig, TrainConfig]:
    """(supernet, stand-alone) configs: one recipe, each with its epochs."""
    recipe = recipe_config(args, args.epochs)
    supernet = SupernetTrainConfig(
        train=dataclasses.replace(
            recipe, epochs=args.supernet_epochs,
            anneal_fraction=args.anneal_fraction if args.supernet_anneal_fraction is None else args.supernet_anneal_fraction,
            seed=args.seed if args.supernet_seed is None else args.supernet_seed,
        ),
        num_random=args.num_random,
        distill=not args.no_distill,
        largest_static=args.largest_static,
        static_twins=args.static_twins,
        val_calib_images=args.calib_images,
    )
    return supernet, recipe


def recipe_config(args: argparse.Namespace, epochs: int) -> TrainConfig:
    """The stand-alone :class:`TrainConfig` of ``args`` (:func:`add_recipe_args`, :func:`add_run_args`), ``epochs`` long.

    Raises:
        DynasError: a bad recipe value (before any data or file is touched).
    """
    return TrainConfig(
        epochs=epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        tau_start=args.tau_start,
        anneal_fraction=args.anneal_fraction,
        max_steps_per_epoch=args.max_steps_per_epoch,
        device=args.device,
        seed=args.seed,
        num_threads=args.num_threads,
        quiet=args.quiet,
    )


# What a stand-alone result depends on besides its arch and seed: a row is reused only by a
# rerun with the same values (another recipe, calibration or data is trained again).
STANDALONE_SETTING = (
    "dataset", "data_root", "input_size", "val_fraction", "train_subset", "epochs", "batch_size", "lr",
    "weight_decay", "tau_start", "anneal_fraction", "max_steps_per_epoch", "calib_images", "seed",
)


def standalone_setting(args: argparse.Namespace) -> dict[str, Any]:
    """The values of ``STANDALONE_SETTING`` in ``args`` (JSON-ready)."""
    return {k: getattr(args, k) for k in STANDALONE_SETTING}


#: A stand-alone row's fields; the last three are None in rows written before they were kept.
_RUN_FIELDS = ("top1", "top1_raw", "seconds", "train_top1", "final_loss", "min_attention_entropy")


def read_runs(path: Path, setting: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """(arch string, seed) -> the run's fields, for the rows of ``path`` made with ``setting``.

    Rows of another setting, and a line a killed write cut short, are left out (trained again).
    """
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # cut short by a killed write: that run is trained again
                continue
            if row.get("setting") == setting:  # older rows (raw only, or unrecorded setting) are trained again
                done[(row["arch"], row["seed"])] = {k: row.get(k) for k in _RUN_FIELDS}
    return done


def _standalone(
    subnets: list[Subnet], data: DataBundle, recipe: TrainConfig, seeds: int, path: Path, calib_images: int, seed: int,
    setting: dict[str, Any], shard: tuple[int, int] = (0, 1),
) -> dict:
    """(arch string, seed) -> the run's fields (``_RUN_FIELDS``); reads and appends ``path`` (rerun-safe).

    With ``shard = (i, n)`` only the runs whose position in (subnet, seed) order is ``i`` mod ``n``
    are trained here; the others are whatever ``path`` holds (other shards append to it too, a
    line per write). The result may then lack runs: the caller checks, after reading ``path``
    again (:func:`read_runs`) once all its calls are done, since another shard may finish a run of
    an earlier call after that call returned here.

    ``top1`` is measured as the supernet's subnets are: after recalibrating BatchNorm on
    ``calib_images`` seeded training images ("precise BN"); ``top1_raw`` with the running
    statistics training left. In a short run they can be far apart: a mobile_cifar_ops subnet
    after 6 epochs of 10 steps on digits had 15.3% raw and 95.1% recalibrated val top-1. Each
    row records ``setting`` (:func:`standalone_setting`); rows of another setting are not reused.
    """
    done = read_runs(path, setting)
    index, count = shard
    with path.open("a", encoding="utf-8") as out:
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            out.write("\n")  # end a line a killed write cut short, so the next row stands alone
        for position, (subnet, run_seed) in enumerate((s, r) for s in subnets for r in range(seeds)):
            key = (subnet.arch.to_str(), run_seed)
            if key in done or position % count != index:
                continue
            torch.manual_seed(run_seed)  # the init; the config's seed draws order, crops and dropout
            model = build_model(subnet.arch)
            result = train_candidate(model, data, dataclasses.replace(recipe, seed=run_seed))
            recalibrate_bn(model, data, calib_images, seed=seed, device=recipe.device)
            top1 = evaluate(model.eval(), data, "val", device=recipe.device)
            done[key] = {
                "top1": top1, "top1_raw": result.val_top1[-1], "seconds": result.train_seconds,
                # why a network lands where it does: under- or over-fitting, a collapsed attention
                "train_top1": evaluate(model.eval(), data, "train", device=recipe.device),  # no augmentation
                "final_loss": result.final_loss,
                "min_attention_entropy": min(result.attention_entropy.values(), default=None),
            }
            out.write(json.dumps({"arch": key[0], "seed": run_seed, **done[key], "setting": setting}) + "\n")
            out.flush()
    done.update(read_runs(path, setting))  # what the other shards finished meanwhile
    return done


def _twin_gaps(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean mixed - static top-1 over the twins among ``rows`` (rows of one draw), supernet and stand-alone."""
    by_draw: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row.get("draw", -1) >= 0:  # rows written before draws were kept have none
            by_draw.setdefault(row["draw"], {})[row["kind"]] = row
    pairs = [(d["static"], d["dynamic"]) for d in by_draw.values() if len(d) == 2]

    def gap(key: str) -> float:
        return sum(dy[key] - st[key] for st, dy in pairs) / len(pairs) if pairs else math.nan

    return {"twins": len(pairs), "twin_gap_supernet": gap("supernet_top1"),
            "twin_gap_standalone": gap("standalone_top1_mean")}


def _summary(rows: list[dict[str, Any]], seeds: int, supernet_seconds: float) -> dict[str, Any]:
    def tau(subset: list[dict[str, Any]], a: str, b: str) -> float:
        return kendall_tau([r[a] for r in subset], [r[b] for r in subset])

    static = [r for r in rows if r["kind"] == "static"]
    dynamic = [r for r in rows if r["kind"] == "dynamic"]
    kinds = [r["kind"] for r in rows]

    def offset(subset: list[dict[str, Any]]) -> float:  # mean points the supernet scores over the truth
        return sum(r["supernet_top1"] - r["standalone_top1_mean"] for r in subset) / len(subset) if subset else math.nan
    seed_tau = [kendall_tau([r["standalone_top1"][i] for r in rows], [r["standalone_top1"][i + 1] for r in rows])
                for i in range(seeds - 1)]
    score_s = sum(r["score_seconds"] for r in rows) / len(rows)
    train_s = sum(sum(r["standalone_seconds"]) / seeds for r in rows) / len(rows)
    proxy = {}
    if rows and "proxy_top1" in rows[0]:
        # One proxy run per candidate, as a scratch search trains: tau of each seed's, averaged.
        def proxy_tau(subset: list[dict[str, Any]]) -> float:
            taus = [kendall_tau([r["proxy_top1"][i] for r in subset], [r["standalone_top1_mean"] for r in subset])
                    for i in range(seeds)]
            return sum(taus) / len(taus)

        proxy = {
            "kendall_tau_proxy": proxy_tau(rows),
            "kendall_tau_proxy_across": sum(
                kendall_tau_across([r["proxy_top1"][i] for r in rows], [r["standalone_top1_mean"] for r in rows], kinds)
                for i in range(seeds)
            ) / seeds,
            "kendall_tau_proxy_static": proxy_tau(static),
            "kendall_tau_proxy_dynamic": proxy_tau(dynamic),
            "seconds_per_proxy_training": sum(sum(r["proxy_seconds"]) / seeds for r in rows) / len(rows),
        }
    return {
        "subnets": len(rows),
        "static_subnets": len(static),
        "dynamic_subnets": len(dynamic),
        "kendall_tau_supernet": tau(rows, "supernet_top1", "standalone_top1_mean"),
        # 90% bootstrap interval over subnets: how much another draw of as many subnets could move it
        "kendall_tau_supernet_interval": list(kendall_tau_interval(
            [r["supernet_top1"] for r in rows], [r["standalone_top1_mean"] for r in rows]
        )),
        "kendall_tau_seed_to_seed": sum(seed_tau) / len(seed_tau) if seed_tau else math.nan,
        "kendall_tau_macs": tau(rows, "macs", "standalone_top1_mean"),
        "kendall_tau_supernet_static": tau(static, "supernet_top1", "standalone_top1_mean"),
        "kendall_tau_supernet_dynamic": tau(dynamic, "supernet_top1", "standalone_top1_mean"),
        "kendall_tau_supernet_across": kendall_tau_across(
            [r["supernet_top1"] for r in rows], [r["standalone_top1_mean"] for r in rows], kinds
        ),
        # points by which the supernet favours mixed subnets over static-only ones, against stand-alone
        "dynamic_offset_points": offset(dynamic) - offset(static),
        **_twin_gaps(rows),
        "seconds_per_scored_subnet": score_s,
        "seconds_per_standalone_training": train_s,
        "supernet_train_seconds": supernet_seconds,
        **proxy,
    }


def _report(summary: dict[str, Any], band: tuple[int, int]) -> str:
    lines = [
        f"{summary['subnets']} subnets in {band[0] / 1e6:g}M-{band[1] / 1e6:g}M MACs "
        f"({summary['static_subnets']} static-only, {summary['dynamic_subnets']} dynamic)",
        f"Kendall tau, supernet vs stand-alone:      {summary['kendall_tau_supernet']:+.3f} "
        f"(90% bootstrap over subnets: {summary['kendall_tau_supernet_interval'][0]:+.2f} to "
        f"{summary['kendall_tau_supernet_interval'][1]:+.2f})",
        f"  ceiling, stand-alone seed vs seed:       {summary['kendall_tau_seed_to_seed']:+.3f}",
        f"  floor, MACs alone:                       {summary['kendall_tau_macs']:+.3f}",
        f"  within static-only subnets:              {summary['kendall_tau_supernet_static']:+.3f}",
        f"  within dynamic subnets:                  {summary['kendall_tau_supernet_dynamic']:+.3f}",
        f"  static-only against mixed (across):      {summary['kendall_tau_supernet_across']:+.3f}; the supernet "
        f"favours mixed subnets by {summary['dynamic_offset_points']:+.2f} points over stand-alone",
        f"seconds per scored subnet: {summary['seconds_per_scored_subnet']:.2f}; per stand-alone training: "
        f"{summary['seconds_per_standalone_training']:.1f}; supernet training: {summary['supernet_train_seconds']:.0f}",
    ]
    if summary["twins"]:  # before the seconds line
        lines.insert(
            -1,
            f"  {summary['twins']} twins (a mixed subnet and its static one), mixed - static: supernet "
            f"{summary['twin_gap_supernet']:+.2f}, stand-alone {summary['twin_gap_standalone']:+.2f} points"
        )
    if "kendall_tau_proxy" in summary:
        lines += [
            f"scratch proxy (one run per subnet) vs stand-alone: {summary['kendall_tau_proxy']:+.3f}",
            f"  within static-only / dynamic subnets, across: {summary['kendall_tau_proxy_static']:+.3f} / "
            f"{summary['kendall_tau_proxy_dynamic']:+.3f}, {summary['kendall_tau_proxy_across']:+.3f}",
            f"seconds per proxy training: {summary['seconds_per_proxy_training']:.1f}",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Train the supernet, sample, score, train stand-alone, and print the rank correlations."""
    parser = build_parser()
    args = parse_args(parser, argv)
    band, shard = check_run_args(args)
    if args.proxy_epochs is not None and not 1 <= args.proxy_epochs < args.epochs:
        raise DynasError(
            f"`--proxy-epochs` must be an integer in [1, --epochs) (a shorter run than the truth's "
            f"{args.epochs} epochs), but got proxy_epochs={args.proxy_epochs}."
        )
    if args.supernet_anneal_fraction is not None:
        check_number("--supernet-anneal-fraction", args.supernet_anneal_fraction, 0.0, 1.0)
    if args.score_calib_images is not None:
        check_int("--score-calib-images", args.score_calib_images, 2)
    supernet_config, recipe = _configs(args)  # refuses a bad recipe value before any data or file
    data, space = load_space(args)
    subnets = sample_in_band(space, band, args.num_subnets, args.strata, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(args, out / "config.yaml")

    def trained_supernet() -> tuple[Supernet, SupernetTrainResult]:  # trains, resumes, or (finished) loads it
        torch.manual_seed(supernet_config.train.seed)
        supernet = Supernet(space, kernel_bank=args.kernel_bank, zero_init_residual=args.zero_init_residual)
        return supernet, train_supernet(supernet, data, supernet_config, run_dir=out / "supernet")

    # Shard 0 trains the supernet first; the other shards start on the stand-alone runs at once.
    trained = trained_supernet() if shard[0] == 0 and not args.standalone_only else None
    setting = standalone_setting(args)
    standalone = _standalone(subnets, data, recipe, args.seeds, out / "standalone.jsonl", args.calib_images, args.seed,
                             setting, shard)
    runs_of = {"standalone": standalone}
    if args.proxy_epochs is not None:  # the same rows file: a proxy run is a stand-alone run of other epochs
        runs_of["proxy"] = _standalone(
            subnets, data, dataclasses.replace(recipe, epochs=args.proxy_epochs), args.seeds, out / "standalone.jsonl",
            args.calib_images, args.seed, {**setting, "epochs": args.proxy_epochs}, shard,
        )
    # Read again: another shard may have finished a stand-alone run after the first call returned.
    runs_of["standalone"] = standalone = read_runs(out / "standalone.jsonl", setting)
    if "proxy" in runs_of:
        runs_of["proxy"] = read_runs(out / "standalone.jsonl", {**setting, "epochs": args.proxy_epochs})
    missing = [(s.arch.to_str(), seed) for runs in runs_of.values() for s in subnets for seed in range(args.seeds)
               if (s.arch.to_str(), seed) not in runs]
    if args.standalone_only:
        print(f"shard {args.shard}: stand-alone runs done; {len(missing)} of this setting are left to other shards; "
              f"rows in {out / 'standalone.jsonl'}")
        return 0
    if missing:  # another shard is still training them
        print(f"shard {args.shard}: done; {len(missing)} stand-alone runs are left to the other shards, and the "
              f"last of them to finish writes the results (or rerun with --shard 0/1 when they have).")
        return 0
    supernet, result = trained or trained_supernet()  # the other shards' rows imply shard 0 finished it
    score_calib = args.calib_images if args.score_calib_images is None else args.score_calib_images
    scores = [score_subnet(supernet, s.arch, data, calib_images=score_calib, seed=args.seed,
                           device=args.device) for s in subnets]
    rows = []
    for subnet, score in zip(subnets, scores):
        runs = [standalone[(subnet.arch.to_str(), seed)] for seed in range(args.seeds)]
        proxy = {}
        if "proxy" in runs_of:
            proxies = [runs_of["proxy"][(subnet.arch.to_str(), seed)] for seed in range(args.seeds)]
            proxy = {"proxy_top1": [r["top1"] for r in proxies], "proxy_seconds": [r["seconds"] for r in proxies]}
        rows.append({
            "arch": subnet.arch.to_str(),
            "kind": subnet.kind,
            "macs": subnet.macs,
            "params": closed_form_params(subnet.arch),
            "stratum": subnet.stratum,
            "draw": subnet.draw,
            "supernet_top1": score.top1,
            "score_seconds": score.seconds,
            "score_calib_images": score.calib_images,
            "standalone_top1": [r["top1"] for r in runs],
            "standalone_top1_raw": [r["top1_raw"] for r in runs],
            "standalone_top1_mean": sum(r["top1"] for r in runs) / len(runs),
            "standalone_seconds": [r["seconds"] for r in runs],
            **proxy,
        })
    summary = _summary(rows, args.seeds, result.train_seconds)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # NaN (a tau of fewer than two distinct values) is not JSON: null.
    def strict(v: Any) -> Any:
        if isinstance(v, list):
            return [strict(x) for x in v]
        return None if isinstance(v, float) and math.isnan(v) else v

    strict_summary = {k: strict(v) for k, v in summary.items()}
    (out / "summary.json").write_text(json.dumps(strict_summary, indent=2), encoding="utf-8")
    print(_report(summary, band))
    print(f"results: {out / 'results.jsonl'}, {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
