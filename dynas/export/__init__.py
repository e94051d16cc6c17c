"""Export the best architectures of a search as deployable models.

``export_run(run_dir, ...)`` writes one folder per selected trial::

    trial_00012/
        arch.json     the canonical spec (with the dynas version); rebuilds the model
        model.pt      weights + spec + inference temperature; ``dynas.load_model(path)``
        model.ts      TorchScript (traced)
        model.onnx    ONNX with a dynamic batch axis (BatchNorm folded, standard ops, opset 17)
        card.md       MACs, params, CPU latency, val/test top-1, tau schedule, search settings

One concern per module: :mod:`~dynas.export.selection` (which trials of a run),
:mod:`~dynas.export.formats` (TorchScript and ONNX, each checked against PyTorch),
:mod:`~dynas.export.card` (the model card), :mod:`~dynas.export.run` (a run folder's export,
staged and renamed into place). Model files (``model.pt``) live in :mod:`dynas.models`.
"""

from dynas.export.formats import EXPORT_ATOL, ONNX_OPSET, export_onnx, export_torchscript, fold_batchnorm, onnx_latency_ms
from dynas.export.run import ExportedModel, export_run
from dynas.export.selection import select_trials

__all__ = [
    "EXPORT_ATOL",
    "ONNX_OPSET",
    "ExportedModel",
    "export_onnx",
    "export_run",
    "export_torchscript",
    "fold_batchnorm",
    "onnx_latency_ms",
    "select_trials",
]
