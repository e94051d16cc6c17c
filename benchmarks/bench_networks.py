"""Whole-network cost of dynamic convolution: DY network time / static network time.

For each pair (DY-MobileNetV2 x1.0 and x0.5, DY-MobileNetV3-Small vs the same static network):

* inference: batch 1, 224x224, eval mode, ``torch.inference_mode``;
* training step: batch 32, 32x32, train mode, forward + cross-entropy + backward + SGD step
  (``dynas.training``'s optimizer: momentum 0.9, Nesterov, weight decay; ``--fused-sgd`` for
  ``SGD(fused=True)``, whose one kernel per step matters to a network with 3x the parameters).

Static and dynamic networks each run contiguous and channels_last, interleaved; every ratio is
against the static network in its faster layout (see ``_timing.compare``). Goals for
DY-MobileNetV2 x1.0 (K=4): inference <= 1.15x, training step <= 1.3x. Not in CI::

    python benchmarks/bench_networks.py --threads 2 --out networks.json --md networks.md

On a CPU shared with other processes, ``--clock cpu`` (with ``OMP_WAIT_POLICY=PASSIVE`` in the
environment, so idle OpenMP threads sleep instead of spinning) measures the CPU time the process
used, which a burst of load from elsewhere barely changes; ``--clock wall`` (the default) is latency.

``--floor`` adds, for inference, the two parts of the dynamic network that exact dynamic
convolution cannot skip, each timed alone on the inputs its layers see in the network:
``floor_aggregation`` (every layer mixing its K kernels, ``pi @ W``, which reads all of them) and
``floor_attention`` (every layer's GAP -> FC -> ReLU -> FC -> softmax). Their ratios add up to a
lower bound on the dynamic network's overhead over the static one, whatever the convolution costs.
``--compile`` adds both networks (channels_last) under ``torch.compile`` for inference; the
compiled static network then is the reference too (compiling takes about a minute per network).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from _baseline import add_baseline_arg, use_baseline
from _report import add_output_args, add_run_args, markdown_table, write_results
from _timing import Timing, compare, set_threads
from dynas.builder import build_model
from dynas.ops import DynamicConv2d
from dynas.presets import cifar_variant, get_preset

#: (label, static preset, dynamic preset)
PAIRS = (
    ("MobileNetV2 x1.0", "mobilenetv2_100", "dy_mobilenetv2_100"),
    ("MobileNetV2 x0.5", "mobilenetv2_050", "dy_mobilenetv2_050"),
    ("MobileNetV3-Small", "mobilenetv3_small", "dy_mobilenetv3_small"),
)


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model.to(memory_format=torch.channels_last)`` for models holding 5-D parameters.

    ``Module.to`` refuses channels_last for any 5-D tensor, and DynamicConv2d's kernels are
    (K, Cout, Cin/g, kh, kw). Only the 4-D conv weights need it: convolutions follow the input's
    memory format, and a dynamic kernel of a 1x1 or depthwise conv is the same in both layouts.
    """
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return model


def _build(preset: str, input_size: int, cifar: bool) -> nn.Module:
    arch = get_preset(preset)
    if cifar:
        arch = cifar_variant(arch, num_classes=10, input_size=input_size)
    torch.manual_seed(0)
    return build_model(arch)


def _inference(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    model.eval()

    def run() -> None:
        with torch.inference_mode():
            model(x)

    return run


def _train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, fused: bool) -> Callable[[], object]:
    model.train()
    # dynas.training's optimizer; `fused` is the single-kernel CPU implementation, which the
    # dynamic network (3x the parameters of the static one) gains more from.
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=4e-5,
                          fused=fused or None)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()

    return run


def _floor(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The dynamic layers' kernel aggregation and attention, each alone (see ``--floor``)."""
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, DynamicConv2d)]
    inputs: dict[nn.Module, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: inputs.__setitem__(mod, args[0])) for m in layers]
    with torch.inference_mode():
        model(x)
        pis = {m: m.attention(inputs[m], m.temperature) for m in layers}
    for h in hooks:
        h.remove()

    def aggregation() -> None:
        with torch.inference_mode():
            for m in layers:
                m.aggregate(pis[m])

    def attention() -> None:
        with torch.inference_mode():
            for m in layers:
                m.attention(inputs[m], m.temperature)

    return {"floor_aggregation": aggregation, "floor_attention": attention}


def bench_pair(static: str, dynamic: str, mode: str, args: argparse.Namespace) -> dict[str, Timing]:
    """Time static and dynamic networks, each contiguous and channels_last, side by side.

    With ``--baseline``, the dynamic network also runs channels_last with the baseline's
    DynamicConv2d (``baseline_cl``): before and after in one run.
    """
    train = mode == "train"
    batch, size = (args.train_batch, args.train_size) if train else (1, args.infer_size)
    cifar = train and args.cifar_variant
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 10 if cifar else 1000, (batch,))
    candidates = [(n + layout, preset, fmt) for n, preset in (("static", static), ("dynamic", dynamic))
                  for layout, fmt in (("", torch.contiguous_format), ("_cl", torch.channels_last))]
    if args.baseline is not None:
        candidates.append(("baseline_cl", dynamic, torch.channels_last))
    fns: dict[str, Callable[[], object]] = {}
    for name, preset, fmt in candidates:
        model = _build(preset, size, cifar)
        if fmt is torch.channels_last:
            to_channels_last(model)
        if name.startswith("baseline"):
            use_baseline(model, args.baseline)
        xin = x.contiguous(memory_format=fmt)
        fns[name] = _train_step(model, xin, target, args.fused_sgd) if train else _inference(model, xin)
        if args.floor and not train and name == "dynamic_cl":
            fns.update(_floor(model, xin))
        if args.compile and not train and name in ("static_cl", "dynamic_cl"):
            fns[name + "_compiled"] = _inference(torch.compile(model), xin)
            fns[name + "_compiled"]()  # compiles here, not in a timed round
    reference = ["static", "static_cl"] + (["static_cl_compiled"] if args.compile and not train else [])
    return compare(fns, reference, rounds=args.rounds, warmup=args.warmup, clock=args.clock)


def _table(rows: list[dict[str, object]]) -> str:
    names = list(dict.fromkeys(n for r in rows for n in r["timings"]))  # --floor: inference rows only
    ratios = [n for n in names if not n.startswith("static")]
    header = ["network", "mode", *(f"{n} ms" for n in names), *(f"{n} / static (best)" for n in ratios)]

    def cell(timings: dict, name: str, key: str, fmt: str) -> str:
        return format(timings[name][key], fmt) if name in timings else ""

    return markdown_table(header, [
        [r["network"], r["mode"], *(cell(r["timings"], n, "median_ms", ".2f") for n in names),
         *(cell(r["timings"], n, "ratio", ".3f") for n in ratios)]
        for r in rows
    ])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    what = p.add_argument_group("what")
    what.add_argument("--networks", nargs="+", default=[label for label, _, _ in PAIRS],
                      choices=[label for label, _, _ in PAIRS], metavar="NAME", help="pairs to run")
    what.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    what.add_argument("--infer-size", type=int, default=224, help="inference resolution (batch 1)")
    what.add_argument("--train-size", type=int, default=32, help="training resolution")
    what.add_argument("--train-batch", type=int, default=32, help="training batch size")
    what.add_argument("--cifar-variant", action="store_true",
                      help="train the CIFAR variant (stem stride 1, 10 classes) instead of the preset")
    what.add_argument("--fused-sgd", action="store_true", help="train with SGD(fused=True), not the for-loop SGD")
    what.add_argument("--compile", action="store_true",
                      help="also time both networks under torch.compile (inference; the compiled static one is a reference)")
    what.add_argument("--floor", action="store_true",
                      help="also time the dynamic network's kernel aggregation and attention alone (inference)")
    add_baseline_arg(what)
    add_output_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    threads = set_threads(args.threads)
    print(f"torch {torch.__version__}, threads {threads}, clock {args.clock}", flush=True)
    rows = []
    for label, static, dynamic in PAIRS:
        if label not in args.networks:
            continue
        for mode in args.modes:
            timings = bench_pair(static, dynamic, mode, args)
            rows.append({"network": label, "mode": mode,
                         "timings": {n: vars(t) for n, t in timings.items()}})
            print(f"{label} {mode}: " + ", ".join(f"{n} {t.median_ms:.2f} ms x{t.ratio:.3f}"
                                                  for n, t in timings.items()), flush=True)
    write_results(__file__, argv, args, rows, _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
