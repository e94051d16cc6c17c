"""dynas command line: ``python run_search.py`` (or the ``dynas`` console script)."""

from __future__ import annotations

import sys

import torch

from dynas import DynamicConv2d


def main(argv: list[str] | None = None) -> int:
    layer = DynamicConv2d(24, 144, 1, num_kernels=4)
    out = layer(torch.randn(2, 24, 56, 56))
    print(f"{layer}\noutput {tuple(out.shape)}, attention {layer.last_attention.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
