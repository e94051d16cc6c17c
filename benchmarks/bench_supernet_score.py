"""What does one candidate cost: a supernet score against a scratch proxy trial, at a shipped config.

A search with ``--evaluator scratch`` (the default) trains every candidate for the config's
epochs; with ``--evaluator supernet`` it extracts the candidate from a trained supernet,
recalibrates BatchNorm on ``--calib-images`` training images and validates. This benchmark times
both on the same candidates, drawn uniformly from the config's space under its MAC budget, with
the config's data (``experiments/cifar10_10m.yaml`` by default: CIFAR-10 at 32x32, a 20k-image
training subset, 10 epochs, batch 128).

The scratch trial is measured over ``--scratch-epochs`` epochs (each a pass over the training
subset and a validation) and scaled to the config's epochs: an epoch costs the same whatever the
learning rate and temperature. The supernet's weights do not change what a score costs, so a
freshly built supernet is scored (no supernet training here; ``experiments/supernet_ranking.py``
measures whether the scores rank). Supernet training is a one-off cost, amortised over the
candidates a search scores; it is not in the ratio. Not in CI::

    python benchmarks/bench_supernet_score.py --data-root ~/.cache/cifar/full --candidates 3 --num-threads 1
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from dynas.builder import build_model
from dynas.cost import closed_form_macs, parse_count
from dynas.data import load_data
from dynas.spaces import get_space
from dynas.supernet import Supernet, score_subnet
from dynas.training import TrainConfig, train_candidate

ROOT = Path(__file__).resolve().parents[1]


def _candidates(space, max_macs: int, count: int, seed: int) -> list:
    """``count`` distinct archs drawn uniformly from ``space`` under ``max_macs``."""
    rng, chosen = random.Random(seed), []
    while len(chosen) < count:
        arch = space.sample(seed=rng.randrange(2**63)).arch
        if closed_form_macs(arch) <= max_macs and arch not in chosen:
            chosen.append(arch)
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments" / "cifar10_10m.yaml"))
    parser.add_argument("--data-root", required=True, help="cifar-10-batches-py or its parent")
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--scratch-epochs", type=int, default=1, help="epochs measured of each scratch trial")
    parser.add_argument("--calib-images", type=int, default=2000, help="as `search --calib-images` (its default)")
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    config = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    data = load_data(config["dataset"], args.data_root, train_subset=config.get("train_subset"),
                     input_size=config.get("input_size"), seed=args.seed)
    space = get_space(config["space"], input_size=data.input_size, num_classes=data.num_classes)
    archs = _candidates(space, parse_count(str(config["max_macs"])), args.candidates, args.seed)
    epochs = int(config["epochs"])
    recipe = TrainConfig(epochs=args.scratch_epochs, batch_size=int(config.get("batch_size", 64)),
                         lr=float(config.get("lr", 0.05)), warmup_epochs=0.0, quiet=True, seed=args.seed)
    torch.manual_seed(args.seed)
    supernet = Supernet(space)
    print(f"{config['space']} under {config['max_macs']} MACs; {len(data.train)} training, {len(data.val)} val "
          f"images at {data.input_size}x{data.input_size}; scratch = {epochs} epochs (measured "
          f"{args.scratch_epochs}); supernet score = {args.calib_images} calibration images + val; "
          f"{torch.get_num_threads()} threads", flush=True)
    scratch, scores = [], []
    for i, arch in enumerate(archs):
        score = score_subnet(supernet, arch, data, calib_images=args.calib_images, seed=args.seed)
        torch.manual_seed(args.seed)
        model = build_model(arch)
        start = time.perf_counter()
        train_candidate(model, data, recipe)
        trial = (time.perf_counter() - start) / args.scratch_epochs * epochs
        scores.append(score.seconds)
        scratch.append(trial)
        print(f"  candidate {i + 1} ({closed_form_macs(arch) / 1e6:.2f}M MACs): scratch trial {trial:.0f} s, "
              f"supernet score {score.seconds:.2f} s, ratio {trial / score.seconds:.0f}x", flush=True)
    ratios = [t / s for t, s in zip(scratch, scores)]
    print(f"median: scratch trial {statistics.median(scratch):.0f} s, supernet score {statistics.median(scores):.2f} s, "
          f"ratio {statistics.median(ratios):.0f}x (range {min(ratios):.0f}x-{max(ratios):.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
