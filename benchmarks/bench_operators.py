"""Every dynamic operator side by side: DY-conv (K=4), ODConv 1x and 4x, DCD, each / static.

Two parts, each timed in one interleaved run (``_timing.compare``) against the static conv or
network in its faster layout (contiguous or channels_last):

* per layer: MobileNetV2 x1.0's 1x1 expand / project convs and 3x3 depthwise convs (DCD: 1x1
  only) at the map sizes they run on, as inference at batch 1 (224x224 network) and as a
  training step (forward + backward) at batch 32 (its CIFAR variant on 32x32);
* whole networks: ``mobilenetv2_100`` against ``dy_``, ``od1_``, ``od4_`` and ``dcd_mobilenetv2_100``,
  inference at batch 1 on 224x224 and a training step (forward + backward) at batch 32 on 32x32
  (the ``_cifar`` presets), in eval and train mode respectively.

Not in CI::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_operators.py --threads 2 --clock cpu --out operators.json --md operators.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from _report import add_output_args, add_run_args, markdown_table, write_results
from _timing import compare, set_threads
from dynas.builder import build_model, create_conv2d
from dynas.presets import get_preset

#: name -> create_conv2d keywords (DCD is 1x1 only: skipped on other convs).
OPERATORS: dict[str, dict[str, object]] = {
    "dy4": {"op": "dy", "num_kernels": 4},
    "od1": {"op": "od", "num_kernels": 1},
    "od4": {"op": "od", "num_kernels": 4},
    "dcd": {"op": "dcd"},
}
NETWORKS = {name: f"{prefix}_mobilenetv2_100" for name, prefix in (("dy4", "dy"), ("od1", "od1"), ("od4", "od4"), ("dcd", "dcd"))}

# (in, out, kernel, groups, map side): MobileNetV2 x1.0's layers at 224 (batch 1) and at 32 (batch 32)
LAYERS = {
    "infer224": [(24, 144, 1, 1, 56), (144, 24, 1, 1, 56), (144, 144, 3, 144, 56), (576, 96, 1, 1, 14),
                 (960, 160, 1, 1, 7), (960, 960, 3, 960, 7)],
    "train32": [(24, 144, 1, 1, 32), (144, 24, 1, 1, 32), (144, 144, 3, 144, 32), (384, 64, 1, 1, 8),
                (960, 160, 1, 1, 4), (960, 960, 3, 960, 4)],
}


def _call(module: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], object]:
    if train:
        module.train()
        x = x.detach().requires_grad_()

        def step() -> None:
            out = module(x)
            out.backward(torch.ones_like(out))
            module.zero_grad(set_to_none=True)

        return step
    module.eval()

    def forward() -> None:
        with torch.inference_mode():
            module(x)

    return forward


def _candidates(
    make: Callable[[str | None], nn.Module], x: torch.Tensor, names: Sequence[str], train: bool
) -> dict[str, Callable[[], object]]:
    """The static module in both layouts, then each operator's (channels_last input: their faster one)."""
    xcl = x.contiguous(memory_format=torch.channels_last)
    static_cl = make(None).to(memory_format=torch.channels_last)
    fns = {"static": _call(make(None), x, train), "static_cl": _call(static_cl, xcl, train)}
    for name in names:
        fns[name] = _call(make(name), xcl, train)
    return fns


def _timed(fns: dict[str, Callable[[], object]], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    timings = compare(fns, ["static", "static_cl"], rounds=args.rounds, warmup=args.warmup, clock=args.clock)
    return {n: vars(t) for n, t in timings.items()}


def bench_layer(layer: tuple[int, int, int, int, int], batch: int, train: bool, args: argparse.Namespace) -> dict[str, object]:
    cin, cout, k, groups, side = layer

    def make(name: str | None) -> nn.Module:
        torch.manual_seed(0)
        return create_conv2d(cin, cout, k, groups=groups, **(OPERATORS[name] if name else {}))

    names = [n for n, kw in OPERATORS.items() if kw["op"] != "dcd" or (k == 1 and groups == 1)]
    x = torch.randn(batch, cin, side, side)
    kind = "dw" if groups > 1 else ""
    return {"part": "layer", "what": f"{k}x{k}{kind} {cin}->{cout} @{side}", "batch": batch,
            "mode": "train" if train else "infer", "timings": _timed(_candidates(make, x, names, train), args)}


def bench_network(batch: int, train: bool, args: argparse.Namespace) -> dict[str, object]:
    suffix, size = ("_cifar", 32) if train else ("", 224)

    def make(name: str | None) -> nn.Module:
        torch.manual_seed(0)
        return build_model(get_preset(f"{NETWORKS[name] if name else 'mobilenetv2_100'}{suffix}"))

    x = torch.randn(batch, 3, size, size)
    return {"part": "network", "what": f"MobileNetV2 x1.0{suffix} @{size}", "batch": batch,
            "mode": "train" if train else "infer", "timings": _timed(_candidates(make, x, list(NETWORKS), train), args)}


def _table(rows: list[dict[str, object]]) -> str:
    header = ["part", "what", "batch", "mode", "static ms", *(f"{n} / static" for n in OPERATORS)]
    body = []
    for r in rows:
        t = r["timings"]
        best = min(t["static"]["median_ms"], t["static_cl"]["median_ms"])
        body.append([r["part"], r["what"], r["batch"], r["mode"], f"{best:.3f}",
                     *(f"{t[n]['ratio']:.2f}" if n in t else "-" for n in OPERATORS)])
    return markdown_table(header, body)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, rounds=9)
    what = p.add_argument_group("what")
    what.add_argument("--parts", nargs="+", default=["infer224", "train32", "networks"],
                      choices=["infer224", "train32", "networks"], help="which parts to run")
    add_output_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    threads = set_threads(args.threads)
    print(f"torch {torch.__version__}, threads {threads}, clock {args.clock}", flush=True)
    jobs: list[Callable[[], dict[str, object]]] = []
    for part, batch, train in (("infer224", 1, False), ("train32", 32, True)):
        if part in args.parts:
            jobs += [partial(bench_layer, layer, batch, train, args) for layer in LAYERS[part]]
    if "networks" in args.parts:
        jobs += [partial(bench_network, 1, False, args), partial(bench_network, 32, True, args)]
    rows = []
    for job in jobs:
        rows.append(job())
        print(f"{rows[-1]['what']} B{rows[-1]['batch']} {rows[-1]['mode']}: "
              + ", ".join(f"{n} x{v['ratio']:.2f}" for n, v in rows[-1]["timings"].items()), flush=True)
    write_results(__file__, argv, args, rows, _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
