"""Per-layer cost of DynamicConv2d (K=4) against nn.Conv2d of the same shape.

Two parts, each a ratio measured side by side (interleaved rounds, see ``_timing.compare``)
against the static conv in its faster layout (contiguous or channels_last):

* headline ops, forward (inference): a 1x1 24->144 conv and a 3x3 depthwise 144 conv, both on
  56x56 maps, at batch 1 and batch 32;
* every dynamic layer of DY-MobileNetV2 x1.0 (shapes read off the built network), at 224x224
  as inference at batch 1 and at 32x32 as a training step at batch 32 (forward + backward).

Not in CI::

    python benchmarks/bench_ops.py --threads 2 --out ops.json --md ops.md

See ``bench_networks.py`` for ``--clock cpu`` on a shared machine.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from _baseline import add_baseline_arg, use_baseline
from _report import add_output_args, add_run_args, markdown_table, write_results
from _timing import compare, set_threads
from dynas.builder import build_model
from dynas.ops import DynamicConv2d
from dynas.presets import get_preset


@dataclass(frozen=True)
class ConvShape:
    """One convolution and the map it runs on."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    groups: int
    height: int
    width: int

    def label(self) -> str:
        kind = "dw" if self.groups == self.in_channels > 1 else f"g{self.groups}" if self.groups > 1 else ""
        return (
            f"{self.kernel_size}x{self.kernel_size}{kind} s{self.stride} "
            f"{self.in_channels}->{self.out_channels} @{self.height}x{self.width}"
        )


HEADLINE = (ConvShape(24, 144, 1, 1, 1, 56, 56), ConvShape(144, 144, 3, 1, 144, 56, 56))


def network_shapes(preset: str, resolution: int) -> list[ConvShape]:
    """The distinct shapes of the dynamic convs of a preset network at one input resolution."""
    model = build_model(get_preset(preset)).eval()
    shapes: list[ConvShape] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        _, cin, h, w = inputs[0].shape
        shape = ConvShape(cin, module.out_channels, module.kernel_size[0], module.stride[0],
                          module.groups, h, w)
        if shape not in shapes:
            shapes.append(shape)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, DynamicConv2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, resolution, resolution))
    for h in hooks:
        h.remove()
    return shapes


def _layers(shape: ConvShape) -> tuple[nn.Conv2d, DynamicConv2d]:
    torch.manual_seed(0)
    args = (shape.in_channels, shape.out_channels, shape.kernel_size, shape.stride, shape.kernel_size // 2)
    static = nn.Conv2d(*args, groups=shape.groups, bias=False)
    dynamic = DynamicConv2d(*args, groups=shape.groups, bias=False, num_kernels=4)
    return static, dynamic


def _call(layer: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], object]:
    if train:
        x = x.detach().requires_grad_()

        def step() -> None:
            out = layer(x)
            out.backward(torch.ones_like(out))

        return step

    def forward() -> None:
        with torch.inference_mode():
            layer(x)

    return forward


def bench_shape(shape: ConvShape, batch: int, train: bool, args: argparse.Namespace) -> dict[str, object]:
    """Static and dynamic layer, each on a contiguous and a channels_last input."""
    static, dynamic = _layers(shape)
    static_cl = _layers(shape)[0].to(memory_format=torch.channels_last)
    x = torch.randn(batch, shape.in_channels, shape.height, shape.width)
    xcl = x.contiguous(memory_format=torch.channels_last)
    fns = {
        "static": _call(static, x, train),
        "static_cl": _call(static_cl, xcl, train),
        "dynamic": _call(dynamic, x, train),
        "dynamic_cl": _call(dynamic, xcl, train),
    }
    if args.baseline is not None:
        fns["baseline_cl"] = _call(use_baseline(_layers(shape)[1], args.baseline), xcl, train)
    timings = compare(fns, ["static", "static_cl"], rounds=args.rounds, warmup=args.warmup, clock=args.clock)
    return {"op": shape.label(), "shape": asdict(shape), "batch": batch, "mode": "train" if train else "infer",
            "timings": {n: vars(t) for n, t in timings.items()}}


def _table(rows: list[dict[str, object]]) -> str:
    ratios = [n for n in (rows[0]["timings"] if rows else []) if not n.startswith("static")]
    header = ["op", "batch", "mode", "static ms", "static_cl ms", *(f"{n} / static (best)" for n in ratios)]
    return markdown_table(header, [
        [r["op"], r["batch"], r["mode"], f"{r['timings']['static']['median_ms']:.3f}",
         f"{r['timings']['static_cl']['median_ms']:.3f}", *(f"{r['timings'][n]['ratio']:.2f}" for n in ratios)]
        for r in rows
    ])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    what = p.add_argument_group("what")
    what.add_argument("--parts", nargs="+", default=["headline", "infer224", "train32"],
                      choices=["headline", "infer224", "train32"], help="which parts to run")
    what.add_argument("--preset", default="dy_mobilenetv2_100", help="network whose layers are timed")
    add_baseline_arg(what)
    add_output_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    threads = set_threads(args.threads)
    print(f"torch {torch.__version__}, threads {threads}, clock {args.clock}", flush=True)
    jobs: list[tuple[ConvShape, int, bool]] = []
    if "headline" in args.parts:
        jobs += [(s, b, False) for s in HEADLINE for b in (1, 32)]
    if "infer224" in args.parts:
        jobs += [(s, 1, False) for s in network_shapes(args.preset, 224)]
    if "train32" in args.parts:
        jobs += [(s, 32, True) for s in network_shapes(args.preset, 32)]
    rows = []
    for shape, batch, train in jobs:
        rows.append(bench_shape(shape, batch, train, args))
        t = rows[-1]["timings"]
        print(f"{shape.label()} B{batch} {'train' if train else 'infer'}: "
              + ", ".join(f"{n} x{v['ratio']:.2f}" for n, v in t.items()), flush=True)
    write_results(__file__, argv, args, rows, _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
