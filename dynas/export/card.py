"""The model card (``card.md``) written beside every exported model."""

from __future__ import annotations

from typing import Any

import torch

from dynas.cost import closed_form_macs, closed_form_params
from dynas.export.formats import ONNX_OPSET
from dynas.spec import ArchSpec

__all__ = ["model_card"]


def _search_line(settings: dict) -> str:
    engine_keys = ("strategy",) if settings.get("engine") == "nni" else ("sampler", "pruner", "objective")
    keys = ("space", "engine", *engine_keys, "max_macs", "max_params", "max_latency_ms", "dataset", "epochs", "trials")
    return ", ".join(f"{k}={settings[k]}" for k in keys if settings.get(k) is not None)


def model_card(
    arch: ArchSpec,
    row: dict,
    settings: dict,
    data: Any,
    *,
    temperature: float,
    test_top1: float,
    latency_ms: float,
    onnx_latency_ms: float,
    onnx_diff: float,
    weights: str,
    name: str,
) -> str:
    """Markdown: costs, accuracy, τ schedule, where the weights come from (``weights``), inputs and how to load it."""
    if row.get("fidelity") == "supernet":
        schedule = "the supernet's own (the trial's τ choices play no part in a subnet)"
    else:
        schedule = f"{row['tau_start']:g} → 1 over the first {row['anneal_fraction']:.0%} of steps"
    size = f"{arch.in_channels}, {arch.input_size}, {arch.input_size}"
    inputs = "pixels scaled to [0, 1], then per channel (x - mean) / std"
    if data is not None:
        inputs += f" with mean {tuple(round(m, 4) for m in data.mean)}, std {tuple(round(s, 4) for s in data.std)}"
    return f"""# {name}: `{arch.to_str()}`

| | |
|---|---|
| MACs (batch 1, {arch.input_size}×{arch.input_size}) | {closed_form_macs(arch):,} |
| parameters | {closed_form_params(arch):,} |
| CPU latency, batch 1, PyTorch eager (median; torch threads: {torch.get_num_threads()}) | {latency_ms:.2f} ms |
| CPU latency, batch 1, onnxruntime `model.onnx` (median; intra-op threads: {torch.get_num_threads()}) | {onnx_latency_ms:.2f} ms |
| validation top-1 (search) | {row['val_top1']:.2f}% |
| test top-1 | {test_top1:.2f}% |
| dynamic blocks | {row['dynamic_blocks']} |
| τ schedule | {schedule}; inference at τ = {temperature:g} |
| weights | {weights} |
| inputs | float (batch, {size}), {inputs} |
| ONNX vs PyTorch, max abs diff (batch 1 and 8) | {onnx_diff:.2e} |

Search: {_search_line(settings) or 'unknown'}.

## Load it

```python
import dynas, torch
model = dynas.create_model("{name}/model.pt")        # nn.Module, eval mode, trained τ
scripted = torch.jit.load("{name}/model.ts")         # TorchScript, any batch size
# onnxruntime.InferenceSession("{name}/model.onnx")  # input "input": (batch, {size}), output "logits"
```

`model.onnx` takes any batch size, uses only standard ONNX ops at opset {ONNX_OPSET} with
BatchNorm folded into the convolutions, and matches PyTorch within 1e-4 at batch 1 and 8.

Rebuild untrained: `dynas.create_model("{name}/arch.json")`.
"""
