"""Deployed speed: exported dynamic network / exported static network, per runtime, before and after.

For each preset (DY network vs the same static network without ``dy_``) and batch size, at 224x224,
eval mode, tau = 1, three runtimes, each timed as its own interleaved group (``_timing.compare``):

* ``onnxruntime`` (CPU, ``--threads`` intra-op threads) and ``torchscript`` (the saved and
  reloaded file): ``static`` and ``dynamic`` as :mod:`dynas.export.formats` exports them now
  (BatchNorm folded, deployment form, dynamic batch axis); ``dynamic_fixed`` specialised to the
  batch size (``dynamic_batch=False``: a plain conv per layer); ``static_before`` /
  ``dynamic_before`` exported as before this change (no folding, the traced matmul form of the
  ``--baseline`` DynamicConv2d, by default ``git show HEAD:dynas/ops/dynamic_conv.py``); and
  ``mixing``: every dynamic layer's kernel mixing (``pi @ W``, which reads all K kernels) alone,
  in that runtime, at that batch size. ``static + mixing`` is the floor of exact dynamic
  convolution: a dynamic network cannot be faster than its static twin plus reading its kernels.
* ``eager``: PyTorch, contiguous and channels_last, and ``dynamic_before_cl`` with the baseline's
  DynamicConv2d (eager code is not what this benchmark changes; for reference).

Every exported graph is checked against PyTorch at the timed batch size (``max_abs_diff`` in the
JSON). Not in CI::

    python benchmarks/bench_deploy.py --batches 1 8 --out deploy.json --md deploy.md

On a CPU shared with other processes use ``--clock cpu`` with ``OMP_WAIT_POLICY=PASSIVE`` (idle
OpenMP threads sleep); onnxruntime's threads then do not spin either (``allow_spinning=0``).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from _baseline import use_baseline
from _report import add_output_args, add_run_args, markdown_table, write_results
from _timing import compare, set_threads
from dynas.export.formats import ONNX_OPSET, export_onnx, export_torchscript
from dynas.models import create_model
from dynas.ops import DynamicConv2d
from dynas.temperature import set_temperature

PRESETS = ("dy_mobilenetv2_100", "dy_mobilenetv3_small", "dy_mobilenetv2_050")
RUNTIMES = ("onnxruntime", "torchscript", "eager")
_REPO = Path(__file__).resolve().parent.parent


class Mixing(nn.Module):
    """Every dynamic layer's kernel mixing alone: ``pi @ W`` (B, K) x (K, Cout*Cin/g*kh*kw)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        kernels = [m.weight.detach().reshape(m.num_kernels, -1) for m in model.modules() if isinstance(m, DynamicConv2d)]
        self.kernels = nn.ParameterList([nn.Parameter(w.clone(), requires_grad=False) for w in kernels])

    def forward(self, pi: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.matmul(pi, w) for w in self.kernels)


def _build(preset: str, before: Path | None) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(preset).eval()
    set_temperature(model, 1.0)
    return use_baseline(model, before) if before is not None else model


def _head_baseline(folder: Path) -> Path:
    """HEAD's ``dynas/ops/dynamic_conv.py``, written into ``folder`` (read-only git)."""
    text = subprocess.run(["git", "show", "HEAD:dynas/ops/dynamic_conv.py"], cwd=_REPO, capture_output=True,
                          text=True, check=True).stdout
    path = folder / "dynamic_conv_head.py"
    path.write_text(text)
    return path


def _export_onnx_before(model: nn.Module, path: Path, x: torch.Tensor) -> None:
    """The export as it was: the model as it is (BatchNorm unfolded), traced, dynamic batch axis."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False)


def _export_ts_before(model: nn.Module, path: Path, x: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, x, check_trace=False).save(str(path))


def _export_mixing(model: nn.Module, folder: Path, batch: int, runtime: str) -> tuple[Path, torch.Tensor]:
    """The ``Mixing`` module of ``model`` exported for ``runtime``, and an attention input for it."""
    mixing = Mixing(model)
    pi = torch.softmax(torch.randn(batch, mixing.kernels[0].shape[0]), dim=1)  # (B, K)
    path = folder / f"mixing_b{batch}.{'onnx' if runtime == 'onnxruntime' else 'ts'}"
    if runtime == "onnxruntime":
        torch.onnx.export(mixing, (pi,), str(path), input_names=["pi"], dynamic_axes={"pi": {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False)
    else:
        torch.jit.trace(mixing, pi).save(str(path))
    return path, pi


def _ort_runner(path: Path, feed: dict[str, torch.Tensor], threads: int, spin: bool) -> Callable[[], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    arrays = {k: v.numpy() for k, v in feed.items()}
    return lambda: session.run(None, arrays)


#: Calls before timing a TorchScript module: its profiling executor runs the first few calls
#: unoptimised (about a second each for a MobileNet, compiling fused kernels) before it settles.
TORCHSCRIPT_WARMUP = 10


def _ort_profile(path: Path, feed: dict[str, torch.Tensor], threads: int, runs: int = 20) -> dict[str, float]:
    """onnxruntime's profiler (``SessionOptions.enable_profiling``): op type -> microseconds per run.

    Node kernel times only, summed per op type (fused ops under their fused names, NCHWc ops as
    ``Conv``, ``ReorderInput``, ...); the profiler adds a little to every node, so graphs with
    many small nodes read slower here than they run.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    arrays = {k: v.numpy() for k, v in feed.items()}
    for _ in range(runs + 5):
        session.run(None, arrays)
    events = json.loads(Path(session.end_profiling()).read_text())
    totals: collections.Counter[str] = collections.Counter()
    per_node: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]] += 1
            if per_node[e["name"]] > 5:  # the first runs allocate
                totals[e["args"]["op_name"]] += e["dur"]
    return {op: round(us / runs, 1) for op, us in totals.most_common()}


def _torch_runner(model: Callable[..., object], x: torch.Tensor, warmup: int = 0) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x)

    for _ in range(warmup):
        run()
    return run


def _max_diff(run: Callable[[], object], expected: torch.Tensor) -> float:
    out = run()
    out = torch.as_tensor(out[0] if isinstance(out, list) else out)
    return float((out - expected).abs().max())


def _candidates(
    preset: str, batch: int, runtime: str, folder: Path, args: argparse.Namespace
) -> tuple[dict[str, Callable[[], object]], dict[str, float], dict[str, dict[str, float]]]:
    """name -> call; name -> max abs diff to PyTorch at this batch; name -> onnxruntime profile (``--profile``)."""
    static, dynamic = _build(preset[3:], None), _build(preset, None)
    x = torch.randn(batch, 3, args.input_size, args.input_size)
    x1 = x[:1]
    if runtime == "eager":
        static_cl, dynamic_cl = (_channels_last(copy.deepcopy(m)) for m in (static, dynamic))
        before_cl = _channels_last(_build(preset, args.baseline))
        xcl = x.contiguous(memory_format=torch.channels_last)
        return {"static": _torch_runner(static, x), "static_cl": _torch_runner(static_cl, xcl),
                "dynamic": _torch_runner(dynamic, x), "dynamic_cl": _torch_runner(dynamic_cl, xcl),
                "dynamic_before_cl": _torch_runner(before_cl, xcl)}, {}, {}
    onnx = runtime == "onnxruntime"
    ext = "onnx" if onnx else "ts"
    paths = {name: folder / f"{preset}_b{batch}_{name}.{ext}" for name in
             ("static_before", "static", "dynamic_before", "dynamic", "dynamic_fixed")}
    before = _build(preset, args.baseline)
    export, export_before = (export_onnx, _export_onnx_before) if onnx else (export_torchscript, _export_ts_before)
    export_before(static, paths["static_before"], x1)
    export(static, paths["static"], x1)
    export_before(before, paths["dynamic_before"], x1)
    export(dynamic, paths["dynamic"], x1)
    export(dynamic, paths["dynamic_fixed"], x, dynamic_batch=False)
    fns: dict[str, Callable[[], object]] = {}
    for name, path in paths.items():
        if onnx:
            fns[name] = _ort_runner(path, {"input": x}, args.threads, spin=args.clock == "wall")
        else:
            fns[name] = _torch_runner(torch.jit.load(str(path)), x, TORCHSCRIPT_WARMUP)
    with torch.inference_mode():
        expected = {"static": static(x), "dynamic": dynamic(x)}
    diffs = {name: _max_diff(fns[name], expected[name.split("_")[0]]) for name in fns}
    profiles = {}
    if onnx and args.profile:
        profiles = {name: _ort_profile(path, {"input": x}, args.threads) for name, path in paths.items()}
    mixing, pi = _export_mixing(dynamic, folder, batch, runtime)
    fns["mixing"] = (_ort_runner(mixing, {"pi": pi}, args.threads, spin=args.clock == "wall") if onnx
                     else _torch_runner(torch.jit.load(str(mixing)), pi, TORCHSCRIPT_WARMUP))
    return fns, diffs, profiles


def _channels_last(model: nn.Module) -> nn.Module:
    """4-D parameters channels_last (``Module.to`` refuses the 5-D dynamic kernels)."""
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return model


def _derived(t: dict[str, dict[str, float]], runtime: str) -> dict[str, float]:
    """Ratios the goals are stated in (from medians where two candidates are summed)."""
    if runtime == "eager":
        return {"before": t["dynamic_before_cl"]["ratio"], "after": t["dynamic_cl"]["ratio"]}
    static, mixing = t["static"]["median_ms"], t["mixing"]["median_ms"]
    return {
        "before": t["dynamic_before"]["ratio"] / t["static_before"]["ratio"],  # both within-round, vs static
        "after": t["dynamic"]["ratio"],
        "fixed": t["dynamic_fixed"]["ratio"],
        "floor": 1 + mixing / static,
        "after_vs_floor": t["dynamic"]["median_ms"] / (static + mixing),
        "fixed_vs_floor": t["dynamic_fixed"]["median_ms"] / (static + mixing),
    }


def _table(rows: list[dict]) -> str:
    header = ["preset", "batch", "runtime", "static before ms", "static ms", "dynamic before ms", "dynamic ms",
              "dynamic fixed-batch ms",
              "mixing ms", "before / static", "after / static", "fixed-batch / static", "floor (static + mixing) / static",
              "after / floor", "fixed-batch / floor"]
    body = []
    for r in rows:
        t, d = r["timings"], r["derived"]

        def ms(name: str) -> str:
            return f"{t[name]['median_ms']:.2f}" if name in t else ""

        def ratio(key: str) -> str:
            return f"{d[key]:.3f}" if key in d else ""

        if r["runtime"] == "eager":
            cells = ["", ms("static_cl"), ms("dynamic_before_cl"), ms("dynamic_cl"), "", "", ratio("before"), ratio("after")]
        else:
            cells = [ms("static_before"), ms("static"), ms("dynamic_before"), ms("dynamic"), ms("dynamic_fixed"),
                     ms("mixing"), ratio("before"), ratio("after")]
        body.append([r["preset"], r["batch"], r["runtime"], *cells,
                     *(ratio(k) for k in ("fixed", "floor", "after_vs_floor", "fixed_vs_floor"))])
    return markdown_table(header, body)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    what = p.add_argument_group("what")
    what.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS, metavar="NAME",
                      help="dynamic presets, each against the static preset without dy_ (default: all)")
    what.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes (default 1 8)")
    what.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    what.add_argument("--input-size", type=int, default=224, help="square input resolution (default 224)")
    what.add_argument("--profile", action="store_true",
                      help="also run onnxruntime's profiler on every exported graph (op type -> us per run, in the JSON)")
    what.add_argument("--baseline", type=Path, default=None,
                      help="the 'before' dynamic_conv.py (default: git show HEAD:dynas/ops/dynamic_conv.py)")
    add_output_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    threads = set_threads(args.threads)
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, threads {threads}, "
          f"clock {args.clock}, opset {ONNX_OPSET}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        folder = Path(tmp)
        if args.baseline is None:
            args.baseline = _head_baseline(folder)
        for preset in args.presets:
            for batch in args.batches:
                for runtime in args.runtimes:
                    fns, diffs, profiles = _candidates(preset, batch, runtime, folder, args)
                    reference = ["static", "static_cl"] if runtime == "eager" else ["static"]
                    timings = {n: vars(t) for n, t in compare(fns, reference, rounds=args.rounds,
                                                             warmup=args.warmup, clock=args.clock).items()}
                    row = {"preset": preset, "static_preset": preset[3:], "batch": batch, "runtime": runtime,
                           "timings": timings, "max_abs_diff": diffs, "derived": _derived(timings, runtime)}
                    if profiles:
                        row["profile_us"] = profiles
                        for name, ops in profiles.items():
                            print(f"  profile {name}: " + ", ".join(f"{op} {us:.0f}" for op, us in list(ops.items())[:8]))
                    rows.append(row)
                    print(f"{preset} b{batch} {runtime}: " + ", ".join(
                        f"{n} {t['median_ms']:.2f} ms x{t['ratio']:.3f}" for n, t in timings.items())
                        + f"; max diff {max(diffs.values(), default=0):.1e}", flush=True)
        args.baseline = str(args.baseline) if args.baseline.parent != folder else "HEAD"
        write_results(__file__, argv, args, rows, _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
