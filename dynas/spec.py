"""The canonical value of an architecture: frozen, validated dataclasses and their two forms.

An :class:`ArchSpec` is a stem, a tuple of :class:`StageSpec` (each a tuple of inverted-residual
:class:`BlockSpec`), and a classifier head. A spec holds actual channel counts (width multipliers
are applied by whoever makes the spec, once) and is rebuilt into a model by
:func:`dynas.builder.build_model`.

Two lossless forms:

* JSON: :meth:`ArchSpec.to_dict` / :meth:`ArchSpec.from_dict`, with ``"format_version": 1``;
* one line, for logs and tables: :meth:`ArchSpec.to_str` / :meth:`ArchSpec.from_str`::

      r32_in3_stem16s1_relu6 / k3e1c16s1_relu6 / k5e6c24s2_relu6_se_dy4pw k3e4.5c24s1_relu6 / head320_relu6_cls10_drop0.2

  Sections are separated by ``" / "``: the stem, one section per stage (its blocks separated by
  spaces), and the head. Within a section, tokens are joined by ``"_"``::

      stem   r{input_size}_in{in_channels}_stem{stem_channels}s{stem_stride}_{stem_activation}
      block  k{kernel_size}e{expansion}c{out_channels}s{stride}_{activation}[_se][_dy{K}{pw|all} | _od{K}{pw|all} | _dcd[{L}]]
      head   head{head_channels}_{head_activation}[_fc{head_hidden}][_dy{head_num_kernels} | _od{head_num_kernels} | _dcd]
             _cls{num_classes}_drop{dropout}[_att{attention_reduction}m{attention_min_hidden}][_dcdsq{dcd_reduction}]

  Bracketed tokens are written only when they differ from the default (no SE, static, no hidden
  FC, attention 4/4, DCD fc-squeeze 16; the operator token only for a dynamic block: ``dy``
  DY-conv, ``od`` ODConv, ``dcd`` DCD with the official latent width, ``dcd{L}`` with L). Floats
  are written in Python's shortest round-trip form (``e4.5``, ``e3.6666666666666665``), so every
  field round-trips exactly. Unknown, repeated, misplaced or
  missing tokens are errors.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from dynas.checks import check_choice as _check_choice
from dynas.checks import check_int as _check_int
from dynas.errors import DynasError, did_you_mean

__all__ = [
    "ACTIVATIONS",
    "DYNAMIC_CONVS",
    "FORMAT_VERSION",
    "OPS",
    "ArchSpec",
    "BlockSpec",
    "StageSpec",
    "dcd_factorized",
    "dcd_hidden_channels",
    "dcd_latent_channels",
    "dcd_pooled_width",
    "expanded_channels",
    "make_divisible",
    "odconv_hidden_channels",
    "se_channels",
]

#: Activation names a spec accepts (built by :func:`dynas.builder.create_act`).
ACTIVATIONS = ("relu", "relu6", "hswish")
#: Which convolutions of a dynamic block are dynamic: both 1x1 convs, or all three.
DYNAMIC_CONVS = ("pw", "all")
#: The operator of a block's dynamic convs: DY-conv (:class:`~dynas.ops.DynamicConv2d`, K = 1 is
#: static), ODConv (:class:`~dynas.ops.ODConv2d`, any K >= 1) or DCD (:class:`~dynas.ops.DCDConv2d`, 1x1 only).
OPS = ("dy", "od", "dcd")
#: Version of the JSON form written by ``to_dict``; ``from_dict`` reads this and older.
FORMAT_VERSION = 1

_T = TypeVar("_T")
_NUM = r"[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?"  # what _fmt_float writes


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor``, never below 90% of ``v`` (MobileNet's rule).

    >>> make_divisible(32 * 0.35), make_divisible(88.0), make_divisible(1280 * 0.75)
    (16, 88, 960)

    Args:
        v: the channel count to round (> 0).
        divisor: the multiple to round to (>= 1).
        min_value: the smallest result allowed (default: ``divisor``).
    """
    _check_int("divisor", divisor, 1)
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
        raise ValueError(f"`v` must be a finite number > 0, but got v={v!r}.")
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # rounding down must not remove more than 10% of the channels
        new_v += divisor
    return new_v


def expanded_channels(in_channels: int, expansion: float) -> int:
    """Channels inside an inverted residual: ``make_divisible(in * expansion, 8)``, or ``in`` at expansion 1."""
    return make_divisible(in_channels * expansion, 8) if expansion != 1 else in_channels


def se_channels(channels: int) -> int:
    """Squeeze width of a squeeze-excite on ``channels``: ``make_divisible(channels // 4, 8)``."""
    return make_divisible(channels // 4, 8)


# ----------------------------------------------------------------------------- operator width rules
# Pure functions shared by the operators (dynas.ops, which build the layers) and the closed-form
# counter (dynas.cost, which must not import torch), so that both read one rule.


def odconv_hidden_channels(in_channels: int, reduction: int = 16, min_hidden: int = 16) -> int:
    """ODConv's attention width: ``max(in // reduction, min_hidden)`` (the official r = 1/16, at least 16)."""
    return max(in_channels // reduction, min_hidden)


def dcd_pooled_width(in_channels: int, out_channels: int) -> int:
    """Width of DCD's pooled attention input: a 2x2 pool (4 per channel) for a widening conv, else GAP.

    The official DCD code (``DYModule``) pools a conv with ``in < out`` to 2x2.
    """
    return 4 * in_channels if in_channels < out_channels else in_channels


def dcd_latent_channels(in_channels: int, out_channels: int) -> int:
    """DCD's latent width L, the official code's rule (``DYModule``, liyunsheng13/dcd).

    ``L = min(pooled // r, out // r)`` with r = 8 for a widening conv (2 otherwise), r doubled
    until ``L**2 <= 2 * pooled``, and at least 4 (``pooled`` is :func:`dcd_pooled_width`).
    """
    pooled = dcd_pooled_width(in_channels, out_channels)
    reduction = 8 if in_channels < out_channels else 2
    latent = min(pooled // reduction, out_channels // reduction)
    while latent**2 > 2 * pooled:
        reduction *= 2
        latent = min(pooled // reduction, out_channels // reduction)
    return max(latent, 4)


def dcd_hidden_channels(pooled_width: int, latent: int, reduction: int = 16, min_hidden: int = 4) -> int:
    """DCD's attention width: ``max(pooled, L**2) // reduction``, at least ``min_hidden`` (official, fc-squeeze 16)."""
    return max(max(pooled_width, latent**2) // reduction, min_hidden)


def dcd_factorized(pixels: int, in_channels: int, out_channels: int, latent: int) -> bool:
    """Whether a DCD conv runs factorized (``Lambda * (W0 x) + P (Phi (Q^T x))``) rather than merged.

    The one with fewer MACs per sample: factorized costs ``pixels * (Cin*L + L*L + L*Cout)`` beyond
    the static conv, merged (one kernel ``Lambda W0 + P Phi Q^T`` per sample) ``Cout*L*(L + Cin)``.
    Both compute the same function; small maps run factorized, large ones merged.
    """
    factorized = pixels * (in_channels * latent + latent * latent + latent * out_channels)
    return factorized < out_channels * latent * (latent + in_channels)


# ----------------------------------------------------------------------------- validation helpers


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be a finite number, but got {name}={value!r}.")
    return float(value)


def _fmt_float(v: float) -> str:
    """Shortest exact form: ``6.0 -> '6'``, ``4.5 -> '4.5'`` (``float(s) == v`` always holds)."""
    return str(int(v)) if v.is_integer() and abs(v) < 1e16 else repr(v)


# ----------------------------------------------------------------------------- dict form helpers


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _required(cls: type) -> list[str]:
    missing = dataclasses.MISSING
    return [f.name for f in dataclasses.fields(cls) if f.default is missing and f.default_factory is missing]


def _check_keys(what: str, data: object, allowed: Sequence[str], required: Sequence[str]) -> None:
    """Reject a non-mapping, unknown keys (with a suggestion) and missing required keys."""
    if not isinstance(data, Mapping):
        raise DynasError(f"{what} must be a JSON object (dict), but got {type(data).__name__}: {data!r}.")
    for key in data:
        if key not in allowed:
            raise DynasError(
                f"unknown key {key!r} in {what}.{did_you_mean(key, allowed)} Known keys: {', '.join(allowed)}."
            )
    missing = [k for k in required if k not in data]
    if missing:
        raise DynasError(f"{what} is missing the required key(s) {', '.join(map(repr, missing))}.")


# ----------------------------------------------------------------------------- string form helpers


@dataclass(frozen=True)
class _Token:
    """One ``_``-separated token of a string section: its name, pattern and default presence."""

    name: str
    pattern: str
    required: bool = True


def _parse_tokens(section: str, what: str, tokens: Sequence[_Token], example: str) -> dict[str, re.Match[str]]:
    """Match ``section``'s tokens, in order, against ``tokens``; every token must be consumed."""
    parts = section.split("_")
    found: dict[str, re.Match[str]] = {}
    i = 0
    for tok in tokens:
        match = re.fullmatch(tok.pattern, parts[i]) if i < len(parts) else None
        if match:
            found[tok.name] = match
            i += 1
        elif tok.required:
            got = f"got {parts[i]!r}" if i < len(parts) else "the section ended"
            raise DynasError(
                f"cannot parse {what} {section!r}: expected the `{tok.name}` token ({tok.pattern}) at "
                f"position {i + 1}, but {got}. A valid {what} looks like {example!r}."
            )
    if i < len(parts):
        raise DynasError(
            f"cannot parse {what} {section!r}: unknown, repeated or misplaced token {parts[i]!r}. "
            f"A valid {what} looks like {example!r}."
        )
    return found


def _parse_int(match: re.Match[str], group: int = 1) -> int:
    return int(match.group(group))


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class BlockSpec:
    """One inverted residual: expand 1x1 -> depthwise kxk -> optional SE -> project 1x1.

    The residual is added when ``stride == 1`` and the block keeps its channel count. For static
    blocks (``op == "dy"`` and ``num_kernels == 1``) ``dynamic_convs`` has no effect and is
    normalised to ``"pw"``, so equal architectures compare (and hash) equal.

    ``op`` picks the operator of the dynamic convs: ``"dy"`` (DY-conv, dynamic when K >= 2),
    ``"od"`` (ODConv with K >= 1 kernels, dynamic even at K = 1) or ``"dcd"`` (DCD on the 1x1
    convs: K must be 1, ``dynamic_convs`` ``"pw"``; ``latent`` is its L, 0 = the official rule).
    """

    kernel_size: int  # depthwise kernel, odd, 1..9
    expansion: float  # expanded = make_divisible(in_channels * expansion, 8); 1 = no expand conv
    out_channels: int
    stride: int = 1  # of the depthwise conv, 1 or 2
    se: bool = False  # squeeze-excite on the expanded channels (MobileNetV3 style)
    activation: str = "relu6"  # after the expand and depthwise convs
    num_kernels: int = 1  # K: with op "dy", 1 = static and K >= 2 = DynamicConv2d; with "od", ODConv's K
    dynamic_convs: str = "pw"  # which convs are dynamic: "pw" (both 1x1s) or "all" (the depthwise too)
    op: str = "dy"  # operator of the dynamic convs: "dy", "od" or "dcd" (OPS)
    latent: int = 0  # DCD's latent width L for every DCD conv of the block; 0 = dcd_latent_channels'

    EXAMPLE: ClassVar[str] = "k5e6c40s2_hswish_se_dy4pw"
    _TOKENS: ClassVar[tuple[_Token, ...]] = (
        _Token("shape", rf"k([0-9]+)e({_NUM})c([0-9]+)s([0-9]+)"),
        _Token("activation", rf"({'|'.join(ACTIVATIONS)})"),
        _Token("se", r"se", required=False),
        _Token("op", rf"(?:(dy|od)([0-9]+)({'|'.join(DYNAMIC_CONVS)})|dcd([1-9][0-9]*)?)", required=False),
    )
    #: Fields written to the JSON form only when they differ from their default, so that a
    #: DY-conv or static block's JSON is byte-for-byte what it was before ODConv and DCD existed
    #: (a study's duplicate detection compares that JSON).
    _OMITTED_DEFAULTS: ClassVar[dict[str, object]] = {"op": "dy", "latent": 0}

    def __post_init__(self) -> None:
        ks = self.kernel_size
        if isinstance(ks, bool) or not isinstance(ks, int) or not (1 <= ks <= 9 and ks % 2 == 1):
            raise ValueError(f"`kernel_size` must be odd and in 1..9, but got kernel_size={ks!r}.")
        expansion = _as_float("expansion", self.expansion)
        if expansion < 1.0:
            raise ValueError(f"`expansion` must be >= 1, but got expansion={self.expansion!r}.")
        object.__setattr__(self, "expansion", expansion)  # 6 and 6.0 are one architecture
        _check_int("out_channels", self.out_channels)
        if self.stride not in (1, 2) or isinstance(self.stride, bool):
            raise ValueError(f"`stride` must be 1 or 2, but got stride={self.stride!r}.")
        if not isinstance(self.se, bool):
            raise TypeError(f"`se` must be a bool, but got se={self.se!r}.")
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_int("num_kernels", self.num_kernels)
        _check_choice("dynamic_convs", self.dynamic_convs, DYNAMIC_CONVS)
        _check_choice("op", self.op, OPS)
        _check_int("latent", self.latent, 0)
        if self.op == "dcd":
            if self.num_kernels != 1:
                raise ValueError(
                    f"`num_kernels` must be 1 for op='dcd' (DCD mixes no kernels; its width is `latent`), "
                    f"but got num_kernels={self.num_kernels!r}."
                )
            if self.dynamic_convs != "pw":
                raise ValueError(
                    f"`dynamic_convs` must be 'pw' for op='dcd' (DCD is a 1x1 operator), "
                    f"but got dynamic_convs={self.dynamic_convs!r}."
                )
        elif self.latent:
            raise ValueError(f"`latent` must be 0 unless op='dcd', but got latent={self.latent!r} with op={self.op!r}.")
        if not self.is_dynamic:
            object.__setattr__(self, "dynamic_convs", "pw")

    @property
    def is_dynamic(self) -> bool:
        """Whether the block has dynamic convs: DY-conv with K >= 2, or any ODConv or DCD block."""
        return self.op != "dy" or self.num_kernels > 1

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every field by name (``op`` and ``latent`` only when not their default)."""
        data = dataclasses.asdict(self)
        for key, default in self._OMITTED_DEFAULTS.items():
            if data[key] == default:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockSpec:
        """Inverse of :meth:`to_dict`; unknown keys are errors, missing optional keys take defaults."""
        _check_keys("a block", data, _field_names(cls), _required(cls))
        return _spec_error(f"block {dict(data)}", lambda: cls(**data))

    def to_str(self) -> str:
        """The one-token form, e.g. ``'k5e6c40s2_hswish_se_dy4pw'``."""
        s = f"k{self.kernel_size}e{_fmt_float(self.expansion)}c{self.out_channels}s{self.stride}_{self.activation}"
        if self.se:
            s += "_se"
        if self.op == "dcd":
            s += f"_dcd{self.latent or ''}"
        elif self.is_dynamic:
            s += f"_{self.op}{self.num_kernels}{self.dynamic_convs}"
        return s

    @classmethod
    def from_str(cls, s: str) -> BlockSpec:
        """Parse :meth:`to_str`'s form; raises :class:`DynasError` on anything else."""
        tok = _parse_tokens(s, "block", cls._TOKENS, cls.EXAMPLE)
        shape, op = tok["shape"], tok.get("op")
        name, k = (op.group(1), int(op.group(2))) if op is not None and op.group(1) else (None, 1)
        if name == "dy" and k < 2:
            raise DynasError(
                f"cannot parse block {s!r}: `dy{k}` asks for fewer than 2 kernels; "
                f"leave out the dy token for a static block, e.g. {cls.EXAMPLE!r}."
            )
        if name == "od" and k < 1:
            raise DynasError(f"cannot parse block {s!r}: `od{k}` asks for no kernels; ODConv needs K >= 1 (od1 is 1x).")
        return _spec_error(
            f"block {s!r}",
            lambda: cls(
                kernel_size=_parse_int(shape, 1),
                expansion=float(shape.group(2)),
                out_channels=_parse_int(shape, 3),
                stride=_parse_int(shape, 4),
                se="se" in tok,
                activation=tok["activation"].group(1),
                num_kernels=k,
                dynamic_convs=op.group(3) if name else "pw",
                op=name or ("dcd" if op is not None else "dy"),
                latent=int(op.group(4) or 0) if op is not None and not name else 0,
            ),
        )


def _spec_error(what: str, make: Callable[[], _T]) -> _T:
    """Call ``make()``; a validation error becomes a DynasError that names what was parsed."""
    try:
        return make()
    except (ValueError, TypeError) as err:
        raise DynasError(f"invalid {what}: {err}") from None


@dataclass(frozen=True)
class StageSpec:
    """A non-empty tuple of blocks (a list is accepted and stored as a tuple)."""

    blocks: tuple[BlockSpec, ...]

    def __post_init__(self) -> None:
        if isinstance(self.blocks, (list, tuple)):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        else:
            raise TypeError(f"`blocks` must be a tuple of BlockSpec, but got blocks={self.blocks!r}.")
        if not self.blocks:
            raise ValueError("`blocks` must hold at least one BlockSpec, but got blocks=().")
        for i, block in enumerate(self.blocks):
            if not isinstance(block, BlockSpec):
                raise TypeError(f"`blocks[{i}]` must be a BlockSpec, but got {type(block).__name__}: {block!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"blocks": [block dicts]}``."""
        return {"blocks": [b.to_dict() for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageSpec:
        """Inverse of :meth:`to_dict`."""
        _check_keys("a stage", data, ["blocks"], ["blocks"])
        if not isinstance(data["blocks"], (list, tuple)):
            raise DynasError(f"a stage's `blocks` must be a list, but got {data['blocks']!r}.")
        return cls(tuple(BlockSpec.from_dict(b) for b in data["blocks"]))

    def to_str(self) -> str:
        """The blocks' string forms separated by spaces."""
        return " ".join(b.to_str() for b in self.blocks)

    @classmethod
    def from_str(cls, s: str) -> StageSpec:
        """Parse :meth:`to_str`'s form."""
        parts = s.split()
        if not parts:
            raise DynasError(f"cannot parse an empty stage; a stage is one or more blocks such as {BlockSpec.EXAMPLE!r}.")
        return cls(tuple(BlockSpec.from_str(p) for p in parts))


@dataclass(frozen=True)
class ArchSpec:
    """A whole network: stem conv, stages of inverted residuals, classifier head.

    All channel counts are actual counts (multipliers already applied).
    """

    stem_channels: int
    stages: tuple[StageSpec, ...]
    head_channels: int  # the last 1x1 conv, before global pooling
    stem_stride: int = 2  # of the 3x3 stem conv, 1 or 2
    stem_activation: str = "relu6"
    head_activation: str = "relu6"
    head_hidden: int = 0  # 0 = none; else a hidden Linear (MobileNetV3's 1024) before the classifier
    head_num_kernels: int = 1  # K of the head 1x1 conv: with head_op "dy", 1 = static, K >= 2 = dynamic
    num_classes: int = 1000
    input_size: int = 224  # square input resolution the spec is meant (and counted) for
    in_channels: int = 3
    dropout: float = 0.2  # before the classifier, in [0, 1)
    attention_reduction: int = 4  # DynamicConv2d attention hidden = max(in // reduction, min_hidden)
    attention_min_hidden: int = 4
    head_op: str = "dy"  # operator of the head 1x1 conv when dynamic: "dy", "od" (any K) or "dcd" (K = 1)
    dcd_reduction: int = 16  # DCD attention hidden = max(max(pooled, L**2) // dcd_reduction, 4) (fc-squeeze)

    EXAMPLE: ClassVar[str] = (
        "r32_in3_stem16s1_relu6 / k3e1c16s1_relu6 / k5e6c24s2_relu6_se_dy4pw k3e4.5c24s1_relu6 "
        "/ head320_relu6_cls10_drop0.2"
    )
    _STEM_TOKENS: ClassVar[tuple[_Token, ...]] = (
        _Token("input_size", r"r([0-9]+)"),
        _Token("in_channels", r"in([0-9]+)"),
        _Token("stem", r"stem([0-9]+)s([0-9]+)"),
        _Token("stem_activation", rf"({'|'.join(ACTIVATIONS)})"),
    )
    _HEAD_TOKENS: ClassVar[tuple[_Token, ...]] = (
        _Token("head", r"head([0-9]+)"),
        _Token("head_activation", rf"({'|'.join(ACTIVATIONS)})"),
        _Token("head_hidden", r"fc([0-9]+)", required=False),
        _Token("head_op", r"(?:(dy|od)([0-9]+)|dcd)", required=False),
        _Token("num_classes", r"cls([0-9]+)"),
        _Token("dropout", rf"drop({_NUM})"),
        _Token("attention", r"att([0-9]+)m([0-9]+)", required=False),
        _Token("dcd_reduction", r"dcdsq([0-9]+)", required=False),
    )

    def __post_init__(self) -> None:
        for name in ("stem_channels", "head_channels", "num_classes", "input_size", "in_channels"):
            _check_int(name, getattr(self, name))
        for name in ("head_num_kernels", "attention_reduction", "attention_min_hidden", "dcd_reduction"):
            _check_int(name, getattr(self, name))
        _check_int("head_hidden", self.head_hidden, 0)
        if self.stem_stride not in (1, 2) or isinstance(self.stem_stride, bool):
            raise ValueError(f"`stem_stride` must be 1 or 2, but got stem_stride={self.stem_stride!r}.")
        _check_choice("stem_activation", self.stem_activation, ACTIVATIONS)
        _check_choice("head_activation", self.head_activation, ACTIVATIONS)
        _check_choice("head_op", self.head_op, OPS)
        if self.head_op == "dcd" and self.head_num_kernels != 1:
            raise ValueError(
                f"`head_num_kernels` must be 1 for head_op='dcd', but got head_num_kernels={self.head_num_kernels!r}."
            )
        dropout = _as_float("dropout", self.dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must lie in [0, 1), but got dropout={self.dropout!r}.")
        object.__setattr__(self, "dropout", dropout)
        self._check_stages()

    def _check_stages(self) -> None:
        if not isinstance(self.stages, (list, tuple)):
            raise TypeError(f"`stages` must be a tuple of StageSpec, but got stages={self.stages!r}.")
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise ValueError("`stages` must hold at least one StageSpec, but got stages=().")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, StageSpec):
                raise TypeError(f"`stages[{i}]` must be a StageSpec, but got {type(stage).__name__}: {stage!r}.")

    @property
    def blocks(self) -> tuple[BlockSpec, ...]:
        """All blocks, in order, across stages."""
        return tuple(b for stage in self.stages for b in stage.blocks)

    # --- JSON form

    @property
    def head_is_dynamic(self) -> bool:
        """Whether the head 1x1 conv is dynamic (DY-conv with K >= 2, or ODConv / DCD)."""
        return self.head_op != "dy" or self.head_num_kernels > 1

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON form: ``format_version`` plus every field (stages as nested dicts;
        ``head_op`` only when not ``"dy"``, like a block's ``op``)."""
        data: dict[str, Any] = {"format_version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = [s.to_dict() for s in value] if f.name == "stages" else value
        for key, default in (("head_op", "dy"), ("dcd_reduction", 16)):  # as BlockSpec's op and latent:
            if data[key] == default:  # a DY-conv or static arch keeps its exact JSON
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchSpec:
        """Inverse of :meth:`to_dict`. Reads every format version up to :data:`FORMAT_VERSION`.

        Raises:
            DynasError: unknown keys (with a close-match suggestion), missing required keys, a
                newer format version, or invalid values.
        """
        _check_keys("an arch spec", data, ["format_version", *_field_names(cls)], _required(cls))
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise DynasError(
                f"`format_version` must be an integer in 1..{FORMAT_VERSION} (this dynas reads up to "
                f"{FORMAT_VERSION}), but got format_version={version!r}."
            )
        fields = {k: v for k, v in data.items() if k != "format_version"}
        if not isinstance(fields["stages"], (list, tuple)):
            raise DynasError(f"an arch spec's `stages` must be a list, but got {fields['stages']!r}.")
        fields["stages"] = tuple(StageSpec.from_dict(s) for s in fields["stages"])
        return _spec_error("arch spec", lambda: cls(**fields))

    # --- one-line form

    def to_str(self) -> str:
        """The one-line form (see the module docstring for the grammar)."""
        stem = (
            f"r{self.input_size}_in{self.in_channels}_stem{self.stem_channels}s{self.stem_stride}_{self.stem_activation}"
        )
        head = f"head{self.head_channels}_{self.head_activation}"
        if self.head_hidden:
            head += f"_fc{self.head_hidden}"
        if self.head_op == "dcd":
            head += "_dcd"
        elif self.head_is_dynamic:
            head += f"_{self.head_op}{self.head_num_kernels}"
        head += f"_cls{self.num_classes}_drop{_fmt_float(self.dropout)}"
        if (self.attention_reduction, self.attention_min_hidden) != (4, 4):
            head += f"_att{self.attention_reduction}m{self.attention_min_hidden}"
        if self.dcd_reduction != 16:
            head += f"_dcdsq{self.dcd_reduction}"
        return " / ".join([stem, *(s.to_str() for s in self.stages), head])

    @classmethod
    def from_str(cls, s: str) -> ArchSpec:
        """Parse :meth:`to_str`'s form; raises :class:`DynasError` (showing a valid example) otherwise."""
        sections = [part.strip() for part in str(s).split("/")]
        if len(sections) < 3:
            raise DynasError(
                f"cannot parse arch {s!r}: expected 'stem / stage / ... / head' (at least 3 sections "
                f"separated by ' / '), but got {len(sections)}. A valid arch looks like {cls.EXAMPLE!r}."
            )
        stem = _parse_tokens(sections[0], "stem", cls._STEM_TOKENS, cls.EXAMPLE.split(" / ")[0])
        head = _parse_tokens(sections[-1], "head", cls._HEAD_TOKENS, cls.EXAMPLE.split(" / ")[-1])
        stages = tuple(StageSpec.from_str(part) for part in sections[1:-1])
        head_dy = head.get("head_op")
        head_op, head_k = (head_dy.group(1), int(head_dy.group(2))) if head_dy and head_dy.group(1) else (None, 1)
        if head_op == "dy" and head_k < 2:
            raise DynasError(f"cannot parse arch {s!r}: the head's `dy` token needs K >= 2; leave it out for a static head.")
        if head_op == "od" and head_k < 1:
            raise DynasError(f"cannot parse arch {s!r}: the head's `od` token needs K >= 1 (od1 is ODConv 1x).")
        att = head.get("attention")
        return _spec_error(
            "arch string",
            lambda: cls(
                stem_channels=_parse_int(stem["stem"], 1),
                stem_stride=_parse_int(stem["stem"], 2),
                stem_activation=stem["stem_activation"].group(1),
                stages=stages,
                head_channels=_parse_int(head["head"]),
                head_activation=head["head_activation"].group(1),
                head_hidden=_parse_int(head["head_hidden"]) if "head_hidden" in head else 0,
                head_num_kernels=head_k,
                head_op=head_op or ("dcd" if head_dy else "dy"),
                num_classes=_parse_int(head["num_classes"]),
                input_size=_parse_int(stem["input_size"]),
                in_channels=_parse_int(stem["in_channels"]),
                dropout=float(head["dropout"].group(1)),
                attention_reduction=_parse_int(att, 1) if att else 4,
                attention_min_hidden=_parse_int(att, 2) if att else 4,
                dcd_reduction=_parse_int(head["dcd_reduction"]) if "dcd_reduction" in head else 16,
            ),
        )
