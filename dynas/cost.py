"""Costs of an architecture from its spec alone: MACs and parameters in closed form, count strings.

Pure Python (no torch, fvcore or pandas), so a budget check costs microseconds and imports
nothing heavy. The convention is :mod:`dynas.counting`'s (one multiply-add is one MAC; what is
and is not counted is listed there); ``tests/test_counting.py`` holds the closed form equal to
fvcore's count on every preset and on samples of every registered search space.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dynas.spec import (
    ArchSpec,
    BlockSpec,
    dcd_factorized,
    dcd_hidden_channels,
    dcd_latent_channels,
    dcd_pooled_width,
    expanded_channels,
    odconv_hidden_channels,
    se_channels,
)

__all__ = ["closed_form_macs", "closed_form_params", "format_count", "input_shape", "parse_count"]

_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9}


def parse_count(text: str | int | float) -> int:
    """Parse a MAC or parameter count: ``5000000``, ``5e6``, ``5M``, ``300k``, ``1.5G``."""
    if isinstance(text, bool):
        raise ValueError(f"expected a count such as 5M or 5e6, but got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgG]?)\s*", str(text))
        if not match:
            raise ValueError(f"expected a count such as 5M or 5e6, but got {text!r}")
        value = float(match.group(1)) * _SUFFIXES.get(match.group(2).lower(), 1.0)
    if value <= 0:
        raise ValueError(f"a count must be > 0, but got {text!r}")
    return int(round(value))


def format_count(value: float) -> str:
    """Format a count with a K/M/G suffix and at most one decimal: ``12_345_678 -> '12.3M'``."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= threshold:
            return f"{value / threshold:.1f}".removesuffix(".0") + suffix
    return f"{value:g}"


def input_shape(input_size: int | tuple[int, ...], in_channels: int = 3) -> tuple[int, int, int]:
    """Return ``(channels, height, width)`` from a square size, an ``(H, W)`` or a ``(C, H, W)``.

    Args:
        input_size: ``32``, ``(32, 48)`` or ``(3, 32, 48)``.
        in_channels: channels when ``input_size`` does not give them.

    Raises:
        ValueError: ``input_size`` is none of those forms of positive ints.
    """
    sizes = (input_size,) * 2 if isinstance(input_size, int) else input_size
    if not (
        isinstance(sizes, tuple)
        and len(sizes) in (2, 3)
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes)
    ):
        raise ValueError(
            "`input_size` must be a positive int (square), (height, width) or "
            f"(channels, height, width) of positive ints, but got {input_size=!r}."
        )
    return (in_channels, *sizes) if len(sizes) == 2 else sizes


# ----------------------------------------------------------------------------- closed form
# The same count from the spec alone, mirroring dynas.builder layer by layer: every conv is
# "same"-padded (k // 2) and bias-free and is followed by BatchNorm (2 * Cout parameters).
# tests/test_counting.py holds it equal to count_macs on every preset and on samples of every
# registered search space.


@dataclass
class _Tally:
    """Running MACs and parameters, and the current feature map's height and width."""

    height: int
    width: int
    macs: int = 0
    params: int = 0


def _conv(
    tally: _Tally, arch: ArchSpec, cin: int, cout: int, kernel: int, stride: int = 1,
    groups: int = 1, num_kernels: int = 1, op: str = "dy", latent: int = 0,
) -> None:
    """Add a ``create_conv2d`` conv + BatchNorm, and move to its output resolution."""
    in_height, in_width = tally.height, tally.width
    in_pixels = in_height * in_width
    tally.height = (tally.height - 1) // stride + 1  # padding k // 2 with an odd k
    tally.width = (tally.width - 1) // stride + 1
    weight = cout * (cin // groups) * kernel * kernel
    tally.params += 2 * cout
    if op == "od":
        _odconv(tally, cin, cout, kernel, groups, num_kernels, in_pixels)
        return
    if op == "dcd":
        _dcd(tally, cin, cout, latent or dcd_latent_channels(cin, cout), arch.dcd_reduction, in_height, in_width)
        return
    tally.macs += weight * tally.height * tally.width
    tally.params += num_kernels * weight
    if num_kernels > 1:
        hidden = max(cin // arch.attention_reduction, arch.attention_min_hidden)
        # aggregation, then the attention: GAP of the input, FC1, FC2 (no conv bias to mix)
        tally.macs += num_kernels * weight + cin * in_pixels + cin * hidden + hidden * num_kernels
        tally.params += cin * hidden + hidden + hidden * num_kernels + num_kernels


def _odconv(tally: _Tally, cin: int, cout: int, kernel: int, groups: int, num_kernels: int, in_pixels: int) -> None:
    """An ``ODConv2d`` (no bias): conv, aggregation when K > 1, and the attention trunk and heads."""
    weight = cout * (cin // groups) * kernel * kernel
    hidden = odconv_hidden_channels(cin)
    depthwise = cin == groups == cout
    heads = cin + (0 if depthwise else cout) + (0 if kernel == 1 else kernel * kernel)  # channel, filter, spatial
    heads += 0 if num_kernels == 1 else num_kernels  # kernel
    tally.macs += weight * tally.height * tally.width + (num_kernels * weight if num_kernels > 1 else 0)
    tally.macs += cin * in_pixels + cin * hidden + hidden * heads  # GAP, FC, one FC for the heads
    tally.params += num_kernels * weight + cin * hidden + 2 * hidden + hidden * heads + heads  # kernels, FC, BN, heads


def _dcd(tally: _Tally, cin: int, cout: int, latent: int, reduction: int, in_height: int, in_width: int) -> None:
    """A ``DCDConv2d`` (1x1, no bias): pool, attention, and the factorized or merged conv it runs."""
    pooled = dcd_pooled_width(cin, cout)
    hidden = dcd_hidden_channels(pooled, latent, reduction)
    if pooled > cin:  # a 2x2 adaptive pool: four cells of ceil(H/2) x ceil(W/2)
        tally.macs += 4 * cin * ((in_height + 1) // 2) * ((in_width + 1) // 2)
    else:
        tally.macs += cin * in_height * in_width
    tally.macs += pooled * hidden + hidden * hidden + hidden * (latent * latent + cout)  # FC, gate, heads
    pixels = tally.height * tally.width
    if dcd_factorized(pixels, cin, cout, latent):
        tally.macs += pixels * ((cout + latent) * cin + latent * latent + latent * cout)
    else:
        tally.macs += cout * latent * (latent + cin) + pixels * cin * cout
    tally.params += cout * cin + latent * (cin + cout)  # W0, Q, P
    tally.params += pooled * hidden + hidden * hidden + hidden * (latent * latent + cout)  # FC, gate, heads


def _block(tally: _Tally, arch: ArchSpec, cin: int, block: BlockSpec) -> None:
    """Add an ``InvertedResidual``: expand, depthwise, squeeze-excite, project."""
    pw = {"num_kernels": block.num_kernels, "op": block.op, "latent": block.latent}
    dw = pw if block.dynamic_convs == "all" else {}
    mid = expanded_channels(cin, block.expansion)
    if block.expansion != 1:
        _conv(tally, arch, cin, mid, 1, **pw)
    _conv(tally, arch, mid, mid, block.kernel_size, block.stride, groups=mid, **dw)
    if block.se:
        squeeze = se_channels(mid)
        tally.macs += mid * tally.height * tally.width + 2 * mid * squeeze  # GAP, two 1x1 FCs
        tally.params += 2 * mid * squeeze + squeeze + mid
    _conv(tally, arch, mid, block.out_channels, 1, **pw)


def _head(tally: _Tally, arch: ArchSpec, cin: int) -> None:
    """Add the ``ClassifierHead``: 1x1 conv, GAP, optional hidden Linear, classifier."""
    _conv(tally, arch, cin, arch.head_channels, 1, num_kernels=arch.head_num_kernels, op=arch.head_op)
    tally.macs += arch.head_channels * tally.height * tally.width
    features = arch.head_channels
    if arch.head_hidden:
        tally.macs += features * arch.head_hidden
        tally.params += (features + 1) * arch.head_hidden
        features = arch.head_hidden
    tally.macs += features * arch.num_classes
    tally.params += (features + 1) * arch.num_classes


def _tally(arch: ArchSpec, input_size: int | tuple[int, int] | None) -> _Tally:
    if not isinstance(arch, ArchSpec):
        raise TypeError(f"`arch` must be an ArchSpec, but got {type(arch).__name__}: {arch!r}.")
    _, height, width = input_shape(arch.input_size if input_size is None else input_size)
    tally = _Tally(height, width)
    _conv(tally, arch, arch.in_channels, arch.stem_channels, 3, arch.stem_stride)
    channels = arch.stem_channels
    for stage in arch.stages:
        for block in stage.blocks:
            _block(tally, arch, channels, block)
            channels = block.out_channels
    _head(tally, arch, channels)
    return tally


def closed_form_macs(arch: ArchSpec, input_size: int | tuple[int, int] | None = None) -> int:
    """MACs of ``build_model(arch)`` on one image, from the spec alone (no model, no tracing).

    Equal to :func:`count_macs` under the module's convention, and thousands of times faster,
    so budget filters can check every candidate.

    Args:
        arch: the architecture.
        input_size: resolution (int or ``(height, width)``); ``None`` uses ``arch.input_size``.
    """
    return _tally(arch, input_size).macs


def closed_form_params(arch: ArchSpec) -> int:
    """Parameters of ``build_model(arch)`` from the spec alone (independent of the resolution)."""
    return _tally(arch, None).params
