"""Parameters and MACs of the paper backbones, static and dynamic, next to the papers' figures.

Usage::

    python experiments/paper_table.py                 # fvcore counts (the ground truth, slower)
    python experiments/paper_table.py --closed-form   # the closed-form counter (instant)

The presets are used exactly as users get them (:func:`dynas.presets.get_preset`). The layer rule
that reproduces the paper's DY-MobileNetV2 (Chen et al., CVPR 2020): MACs within 0.3% of the
paper at every width, parameters within 0.3% at x1.0 (+2.2%, +4.5%, +3.7% at x0.75, x0.5, x0.35,
0.1-0.2M; no rule that keeps the MACs matched removes that):

* dynamic (K = 4): both 1x1 convs of every block (expand and project) and the head's 1x1 conv;
* static: the stem 3x3 conv and the depthwise convs (making them dynamic too overshoots the
  paper's parameters by 12%), and the classifier;
* attention width ``max(Cin // 4, 4)`` (reduction 4, min hidden 4);
* MACs counted as in :mod:`dynas.counting`: convs, linear layers, kernel aggregation and global
  average pooling (the attention GAP included); BatchNorm folded; elementwise ops free.

The rule printed under the table is read from the presets' specs, not restated here.

A second table puts the ODConv and DCD presets (``od1_``, ``od4_``, ``dcd_``) next to their
sources, with the reason for every deviation over 2%:

* ODConv (Li, Zhou and Yao, ICLR 2022): the official README's MobileNetV2 table (OSVAI/ODConv,
  "Results and Models": params, MAdds, top-1). The presets are the official ``od_mobilenetv2``
  layer for layer (ODConv in all three convs of every block and in the head conv), so the
  parameters are equal. MACs: 1x within 1%; 4x is 2.9% under, because the README's 4x - 1x gap
  (15.3M) is 7 |W| -- K multiplies and K - 1 adds per kernel element of the aggregation -- where
  dynas counts K |W| MACs, as for DY-conv (whose paper it matches);
* DCD (Li et al., ICLR 2021, arXiv 2103.08756): the official README (liyunsheng13/dcd) has no
  table. The paper's x0.5 row (3.1M parameters, 70.2% top-1) is used; its MAdds, and its x1.0
  row, are not in the material this was built from, so the official code counted here
  (``mobilenetv2_dcd``) stands in: 5,720,028 parameters at x1.0 (fc-squeeze 16, the README's
  command) and 3,056,616 at x0.5 (fc-squeeze 8, the script's default, which gives the paper's 3.1M).
  The presets leave out the official dynamic classifier (``DYCls``, +179,840 parameters) and the
  BatchNorms inside the latent path (4 L per conv); the official code runs every DCD conv
  factorized (133.6M / 400.9M MACs at x0.5 / x1.0), the presets the cheaper form per conv.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from _args import run

from dynas.cost import closed_form_macs, closed_form_params, format_count
from dynas.counting import count_macs
from dynas.presets import get_preset, mobilenet_v3_small
from dynas.spec import ArchSpec

__all__ = ["OPERATORS", "PAPER", "OperatorRow", "PaperRow", "main", "operator_rows", "rows"]


@dataclass(frozen=True)
class PaperRow:
    """One backbone: its static and dynamic presets and the paper's (params, MACs) for each."""

    model: str
    static_preset: str
    dynamic_preset: str
    paper_static: tuple[float, float]
    paper_dynamic: tuple[float, float]


#: The paper's Table 1 figures: (params, MACs) of the static and the DY (K = 4) network.
PAPER = (
    PaperRow("MobileNetV2 x1.0", "mobilenetv2_100", "dy_mobilenetv2_100", (3.5e6, 300e6), (11.1e6, 312.9e6)),
    PaperRow("MobileNetV2 x0.75", "mobilenetv2_075", "dy_mobilenetv2_075", (2.6e6, 209e6), (7.0e6, 217.5e6)),
    PaperRow("MobileNetV2 x0.5", "mobilenetv2_050", "dy_mobilenetv2_050", (2.0e6, 97e6), (4.0e6, 101.4e6)),
    PaperRow("MobileNetV2 x0.35", "mobilenetv2_035", "dy_mobilenetv2_035", (1.7e6, 59.2e6), (2.8e6, 62.0e6)),
    PaperRow("MobileNetV3-Small", "mobilenetv3_small", "dy_mobilenetv3_small", (2.9e6, 66e6), (4.8e6, 68.5e6)),
)

@dataclass(frozen=True)
class OperatorRow:
    """A preset with another dynamic operator, its source's (params, MACs, top-1) and the source.

    A figure the source does not give is ``None``. ``unmodelled_params`` are parameters the official
    model has that the preset leaves out (DCD's dynamic classifier and latent BatchNorms).
    """

    model: str
    preset: str
    figures: tuple[float | None, float | None, float | None]
    source: str
    unmodelled_params: int = 0


_ODCONV = "ODConv README"
_DCD_CODE = "DCD official code, counted"
#: DCD's official extras left out of the presets: DYCls over a Linear(1280, 1000), and 4 L per conv.
_DCD_EXTRA = {"x1.0": 179_840 + 2_496, "x0.5": 179_840 + 1_760}

#: The ODConv and DCD rows (see the module docstring for the sources).
OPERATORS = (
    OperatorRow("MobileNetV2 x1.0", "mobilenetv2_100", (3.50e6, 300.8e6, 71.65), _ODCONV),
    OperatorRow("  + ODConv 1x", "od1_mobilenetv2_100", (4.94e6, 311.8e6, 74.74), _ODCONV),
    OperatorRow("  + ODConv 4x", "od4_mobilenetv2_100", (11.51e6, 327.1e6, 75.29), _ODCONV),
    OperatorRow("  + DCD", "dcd_mobilenetv2_100", (5_720_028, None, None), _DCD_CODE, _DCD_EXTRA["x1.0"]),
    OperatorRow("MobileNetV2 x0.5", "mobilenetv2_050", (1.97e6, 97.1e6, 64.30), _ODCONV),
    OperatorRow("  + ODConv 1x", "od1_mobilenetv2_050", (2.43e6, 101.8e6, 68.06), _ODCONV),
    OperatorRow("  + ODConv 4x", "od4_mobilenetv2_050", (4.44e6, 106.4e6, 70.23), _ODCONV),
    OperatorRow("  + DCD", "dcd_mobilenetv2_050", (3.1e6, None, 70.2), "DCD paper", _DCD_EXTRA["x0.5"]),
)

_COUNTERS: dict[str, Callable[[ArchSpec], tuple[int, int]]] = {
    "fvcore": lambda arch: (lambda r: (r.params, r.total_macs))(count_macs(arch)),
    "closed-form": lambda arch: (closed_form_params(arch), closed_form_macs(arch)),
}


def _cell(ours: int, paper: float) -> str:
    return f"{ours / 1e6:7.2f}M / {f'{paper / 1e6:g}M':<6} {100 * (ours - paper) / paper:+6.1f}%"


def rows(counter: str = "fvcore") -> list[list[str]]:
    """The table's rows: model, then params and MACs (ours / paper, deviation) static and DY."""
    count = _COUNTERS[counter]
    table = []
    for row in PAPER:
        (sp, sm), (dp, dm) = count(get_preset(row.static_preset)), count(get_preset(row.dynamic_preset))
        table.append(
            [
                row.model,
                _cell(sp, row.paper_static[0]),
                _cell(sm, row.paper_static[1]),
                _cell(dp, row.paper_dynamic[0]),
                _cell(dm, row.paper_dynamic[1]),
            ]
        )
    return table


def _figure_cell(ours: int, figure: float | None) -> str:
    if figure is None:
        return f"{ours / 1e6:7.2f}M / n/a"
    return f"{ours / 1e6:7.2f}M / {f'{figure / 1e6:.4g}M':<7} {100 * (ours - figure) / figure:+5.1f}%"


def operator_rows(counter: str = "fvcore") -> list[list[str]]:
    """The ODConv / DCD table's rows: model, preset, params and MACs (ours / source), source top-1, source."""
    count = _COUNTERS[counter]
    table = []
    for row in OPERATORS:
        params, macs = count(get_preset(row.preset))
        paper_params, paper_macs, top1 = row.figures
        cell = _figure_cell(params, paper_params)
        if row.unmodelled_params and paper_params:
            with_extras = params + row.unmodelled_params
            cell += f" ({100 * (with_extras - paper_params) / paper_params:+.1f}% with DYCls)"
        top1_cell = "n/a" if top1 is None else f"{top1:.2f}"
        table.append([row.model, row.preset, cell, _figure_cell(macs, paper_macs), top1_cell, row.source])
    return table


_OPERATOR_HEADER = ["model", "preset", "params (ours / source)", "MACs (ours / source)", "top-1 (source)", "source"]


def _format(table: list[list[str]], header: Sequence[str] | None = None) -> str:
    header = list(header or ["model", "params (static)", "MACs (static)", "params (DY, K=4)", "MACs (DY, K=4)"])
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in [header, *table]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _rule(arch: ArchSpec) -> str:
    """The layer rule of a dynamic preset, read from its spec."""
    kernels = {b.num_kernels for b in arch.blocks}
    which = {b.dynamic_convs for b in arch.blocks}
    convs = {"pw": "expand + project 1x1", "all": "expand, depthwise and project"}
    return (
        f"K={'/'.join(map(str, sorted(kernels)))} in {', '.join(convs[w] for w in sorted(which))} of every block; "
        f"head 1x1 K={arch.head_num_kernels}; stem static; attention hidden = "
        f"max(Cin // {arch.attention_reduction}, {arch.attention_min_hidden})"
    )


_CONVENTION = """\
Cells: ours / paper, and our deviation. One MAC = one multiply-add (fvcore's "flop"), at batch 1.
Counted: convs, linear layers, the kernel aggregation (K x |W| per sample) and global average
pooling (the attention GAP too). Not counted: BatchNorm (folded), activations, softmax, residual
adds, squeeze-excite multiplies (see dynas.counting).
MobileNetV2 x0.75-x0.35: MACs match within 0.3%, parameters are 0.1-0.2M above the paper; making
fewer convs dynamic to remove that would also remove 1-4M MACs the paper counts."""


_OPERATOR_NOTES = """\
ODConv: parameters equal the official models'; MACs of 4x are 2.9% (x1.0) and 2.4% (x0.5) under the
README's, whose 4x - 1x gap (15.3M at x1.0) is 7 |W|, K multiplies and K - 1 adds per kernel element,
where dynas counts the aggregation as K |W| MACs, as it does for DY-conv. DCD: the official model's dynamic classifier
(DYCls) and latent BatchNorms are not modelled; "with DYCls" adds their parameters back. The official
README has no table and the paper's MAdds are not given here (n/a); the official code runs every DCD
conv factorized (133.6M / 400.9M MACs at x0.5 / x1.0), the presets the cheaper of the two exact forms."""


def _v3_note() -> str:
    """Why MobileNetV3-Small differs, with every number counted here (closed form)."""
    static, dy = get_preset("mobilenetv3_small"), get_preset("dy_mobilenetv3_small")
    dw_too = mobilenet_v3_small(num_kernels=4, dynamic_convs="all")
    wide_fc = dataclasses.replace(static, head_hidden=1280)
    p, m = closed_form_params, closed_form_macs
    return (
        "MobileNetV3-Small: the static preset is torchvision's network, which the MobileNetV3 paper "
        f"itself reports as 2.5M / 56M (we count {format_count(p(static))} / {format_count(m(static))}). "
        "The DY-CNN paper's baseline row (2.9M / 66M) counts that network differently: a 1280-wide "
        f"hidden FC instead of 1024 would give {format_count(p(wide_fc))} parameters, and the extra "
        "~10M MACs are not convs, FCs or pooling. Compare the DY overhead instead: the paper adds "
        f"+2.5M MACs and +1.9M parameters; the preset adds +{format_count(m(dy) - m(static))} MACs and "
        f"+{format_count(p(dy) - p(static))} parameters; making the depthwise convs dynamic too would add "
        f"+{format_count(m(dw_too) - m(static))} MACs and +{format_count(p(dw_too) - p(static))} parameters."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table, the layer rule of the DY presets and the counting notes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--closed-form", action="store_true", help="count with the closed form instead of fvcore (instant)"
    )
    args = parser.parse_args(argv)
    counter = "closed-form" if args.closed_form else "fvcore"
    print(f"Parameters and MACs at 224x224 ({counter} count)\n")
    print(_format(rows(counter)))
    print(f"\nLayer rule of the DY presets: {_rule(get_preset('dy_mobilenetv2_100'))}.\n")
    print(_CONVENTION)
    print(f"\n{textwrap.fill(_v3_note(), width=100)}")
    print(f"\nODConv and DCD presets against their sources ({counter} count)\n")
    print(_format(operator_rows(counter), _OPERATOR_HEADER))
    print(f"\n{_OPERATOR_NOTES}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
