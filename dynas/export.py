"""Export the best architectures of a search as deployable models, and load them back.

``export_run(run_dir, ...)`` writes one folder per selected trial::

    trial_00012/
        arch.json     the canonical spec (with the dynas version); rebuilds the model
        model.pt      weights + spec + inference temperature; ``dynas.load_model(path)``
        model.ts      TorchScript (traced)
        model.onnx    ONNX with a dynamic batch axis
        card.md       MACs, params, CPU latency, val/test top-1, tau schedule, search settings

All folders of one export are written under a hidden staging folder and renamed into place only
when every one of them is complete, so a failed export leaves nothing partial behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from dynas.builder import build_model
from dynas.errors import DynasError, did_you_mean
from dynas.spec import ArchSpec
from dynas.temperature import current_temperature, set_temperature

__all__ = ["EXPORT_ATOL", "ExportedModel", "export_run", "load_model", "save_model", "select_trials"]

_SELECT = ("best", "top", "pareto")

EXPORT_ATOL = 1e-4
"""An export fails unless TorchScript's and onnxruntime's outputs lie this close to PyTorch's."""


def save_model(path: str | Path, model: nn.Module, arch: ArchSpec, temperature: float, **extra: Any) -> None:
    """Save ``model``'s weights with its spec and inference temperature (loadable by load_model)."""
    from dynas import __version__

    payload = {
        "arch": arch.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "temperature": float(temperature),
        "dynas_version": __version__,
        **extra,
    }
    torch.save(payload, path)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by dynas (export or a search trial) in eval mode, at its trained tau."""
    path = Path(path)
    if not path.is_file():
        raise DynasError(f"model file {str(path)!r} does not exist.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a foreign pickle, a truncated file, not a torch file at all
        raise DynasError(f"{str(path)!r} is not a dynas model file: torch.load failed ({err}).") from None
    if not isinstance(payload, dict) or "arch" not in payload or "state_dict" not in payload:
        raise DynasError(f"{str(path)!r} is not a dynas model file (it needs 'arch' and 'state_dict').")
    model = build_model(ArchSpec.from_dict(payload["arch"]))
    model.load_state_dict(payload["state_dict"])
    set_temperature(model, payload.get("temperature", 1.0))
    return model.eval()


@dataclass(frozen=True)
class ExportedModel:
    """One exported trial: its number, its folder, and how far ONNX lies from PyTorch."""

    trial: int
    folder: Path
    onnx_max_abs_diff: float


def select_trials(frame: Any, select: str, top: int = 3) -> list[dict]:
    """Rows of the completed trials to export: the best, the top ``top``, or the Pareto front."""
    from dynas.search.results import pareto_front

    if select not in _SELECT:
        raise DynasError(f"`select` must be one of {_SELECT}, but got {select=!r}.{did_you_mean(select, _SELECT)}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise DynasError(f"`top` must be an integer >= 1, but got {top=!r}.")
    done = frame[frame["state"] == "complete"].sort_values("val_top1", ascending=False, kind="stable")
    if done.empty:
        raise DynasError("the run has no completed trial to export.")
    if select == "pareto":
        chosen = pareto_front(frame)
    else:
        chosen = done.head(1 if select == "best" else top)
    return chosen.to_dict("records")


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    select: str = "best",
    top: int = 3,
    trials: list[int] | None = None,
    retrain_epochs: int | None = None,
    latency: bool = True,
) -> list[ExportedModel]:
    """Export trials of ``run_dir`` (``select`` or explicit ``trials`` numbers) to ``out_dir``.

    Weights come from the trial's kept checkpoint, or, with ``retrain_epochs``, from retraining the
    architecture on the full training set (training + validation split) of the run's dataset.
    Test top-1 is measured here on the dataset's test split (which the search itself never saw).
    Everything is checked before anything is written; a failure leaves ``out_dir`` as it was.
    """
    from dynas.search.report import load_results

    run_dir = Path(run_dir)
    frame = load_results(run_dir)
    rows = _rows_for(frame, select, top, trials, run_dir)
    settings = _run_settings(run_dir)
    if retrain_epochs is None:
        for row in rows:  # check all weights exist before writing anything
            _checkpoint_path(run_dir, row)
    else:
        _check_retrain(retrain_epochs, settings, run_dir)
    data = _run_data(settings, full_train=retrain_epochs is not None)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"

    def export(row: dict, folder: Path) -> ExportedModel:
        return _export_one(run_dir, folder, row, settings, data, retrain_epochs, latency)

    return _write_all(out_dir, rows, export)


def _write_all(out_dir: Path, rows: list[dict], export: Callable[[dict, Path], ExportedModel]) -> list[ExportedModel]:
    """Export every row into a staging folder, then rename each folder into ``out_dir``."""
    created = _first_missing(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    except OSError as err:
        raise DynasError(f"the output folder {str(out_dir)!r} must be a writable folder, but: {err.strerror}.") from None
    try:
        staged = [export(row, staging / _folder_name(row)) for row in rows]
    except BaseException:
        shutil.rmtree(created if created is not None else staging, ignore_errors=True)
        raise
    exported = []
    for item in staged:
        final = out_dir / item.folder.name
        if final.exists():
            shutil.rmtree(final)
        item.folder.rename(final)
        exported.append(dataclasses.replace(item, folder=final))
    shutil.rmtree(staging, ignore_errors=True)
    return exported


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (removed again on failure)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _folder_name(row: dict) -> str:
    return f"trial_{int(row['trial']):05d}"


def _rows_for(frame: Any, select: str, top: int, trials: list[int] | None, run_dir: Path) -> list[dict]:
    if trials is None:
        return select_trials(frame, select, top)
    known = sorted(int(t) for t in frame.loc[frame["state"] == "complete", "trial"])
    rows = []
    for number in dict.fromkeys(trials):  # a trial named twice is exported once
        match = frame[(frame["trial"] == number) & (frame["state"] == "complete")]
        if match.empty:
            raise DynasError(
                f"`trial` must be a completed trial of run {str(run_dir)!r}, but got trial={number}; "
                f"completed trials: {', '.join(map(str, known)) or 'none'}."
            )
        rows.append(match.iloc[0].to_dict())
    return rows


def _run_settings(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _checkpoint_path(run_dir: Path, row: dict) -> Path:
    path = run_dir / row["checkpoint"] if row.get("checkpoint") else None
    if path is None or not path.is_file():
        raise DynasError(
            f"the weights of trial {row['trial']} of run {str(run_dir)!r} were not kept (only the best "
            f"trials keep theirs, see --keep-weights); export it with --retrain-epochs N to retrain it."
        )
    return path


def _check_retrain(epochs: Any, settings: dict, run_dir: Path) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise DynasError(f"`retrain_epochs` must be an integer >= 1, but got retrain_epochs={epochs!r}.")
    if not settings.get("dataset"):
        raise DynasError(f"cannot retrain: run {str(run_dir)!r} has no config.yaml naming its dataset.")


def _export_one(
    run_dir: Path, folder: Path, row: dict, settings: dict, data: Any, retrain_epochs: int | None, latency: bool
) -> ExportedModel:
    arch = ArchSpec.from_dict(json.loads(row["arch_json"]))
    folder.mkdir()
    if retrain_epochs:
        model, temperature = _retrain(arch, row, settings, data, retrain_epochs)
    else:
        model = load_model(_checkpoint_path(run_dir, row))
        temperature = current_temperature(model)
    test_top1 = _test_top1(model, data)
    (folder / "arch.json").write_text(json.dumps(_arch_payload(arch), indent=2), encoding="utf-8")
    save_model(folder / "model.pt", model, arch, temperature, trial=int(row["trial"]), **_normalisation(data))
    example = torch.randn(1, arch.in_channels, arch.input_size, arch.input_size)
    with warnings.catch_warnings():  # the operators' input checks are constant in a trace
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        _export_torchscript(model, example, folder / "model.ts", int(row["trial"]))
        diff = _export_onnx(model, example, folder / "model.onnx", int(row["trial"]))
    ms = _latency(model, arch) if latency else math.nan
    card = _card(arch, row, settings, data, temperature, test_top1, ms, diff, retrain_epochs, folder.name)
    (folder / "card.md").write_text(card, encoding="utf-8")
    return ExportedModel(int(row["trial"]), folder, diff)


def _arch_payload(arch: ArchSpec) -> dict:
    from dynas import __version__

    return {"dynas_version": __version__, "arch": arch.to_dict(), "arch_str": arch.to_str()}


def _run_data(settings: dict, full_train: bool) -> Any:
    """The run's dataset split as the search split it, or None if the run has no settings.

    The same split (and train subset) as the search, so the kept weights are evaluated with the
    normalisation they were trained with; for retraining, the validation split and any subset are
    folded back into the training split (the full training set).
    """
    if not settings.get("dataset"):
        return None
    from dynas.data import load_data

    subset = settings.get("train_subset")
    data = load_data(
        settings["dataset"],
        root=settings.get("data_root"),
        val_fraction=settings.get("val_fraction", 0.1),
        train_subset=None if full_train or subset is None else (int(subset) if subset >= 1 else subset),
        input_size=settings.get("input_size"),
        seed=settings.get("seed", 0),
    )
    return _with_full_train(data) if full_train else data


def _with_full_train(data: Any) -> Any:
    from dynas.data import Split, channel_stats

    train = Split(torch.cat([data.train.images, data.val.images]), torch.cat([data.train.labels, data.val.labels]))
    mean, std = channel_stats(train.images)
    return dataclasses.replace(data, train=train, mean=mean, std=std)


def _normalisation(data: Any) -> dict[str, Any]:
    return {} if data is None else {"mean": list(data.mean), "std": list(data.std)}


def _test_top1(model: nn.Module, data: Any) -> float:
    if data is None:
        return math.nan
    from dynas.training import evaluate

    return evaluate(model, data, "test", device="cpu")


def _retrain(arch: ArchSpec, row: dict, settings: dict, data: Any, epochs: int) -> tuple[nn.Module, float]:
    from dynas.training import TrainConfig, train_candidate

    config = TrainConfig(
        epochs=epochs,
        batch_size=settings.get("batch_size", 64),
        lr=settings.get("lr", 0.05),
        weight_decay=settings.get("weight_decay", 4e-5),
        label_smoothing=settings.get("label_smoothing", 0.1),
        tau_start=_or_default(row["tau_start"], settings.get("tau_start", 30.0)),
        anneal_fraction=_or_default(row["anneal_fraction"], settings.get("anneal_fraction", 0.1)),
        seed=settings.get("seed", 0) + int(row["trial"]),
        num_threads=settings.get("num_threads"),
        quiet=True,
    )
    model = build_model(arch)
    result = train_candidate(model, data, config)
    return model.cpu().eval(), result.tau_end


def _or_default(value: Any, default: float) -> float:
    return float(default) if value is None or math.isnan(float(value)) else float(value)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, trial: int) -> None:
    """Trace at batch 1 and check the traced module at batch 8 (no shape may bake the batch in)."""
    traced = torch.jit.trace(model, example, check_trace=False)  # checked below, at another batch
    x = torch.randn(8, *example.shape[1:])
    with torch.no_grad():
        diff = float((traced(x) - model(x)).abs().max())
    _check_close(diff, "TorchScript", trial, 8)
    traced.save(str(path))


def _check_close(diff: float, what: str, trial: int, batch: int) -> None:
    if not diff <= EXPORT_ATOL:
        raise DynasError(
            f"the {what} export of trial {trial} must match PyTorch within {EXPORT_ATOL:g}, "
            f"but got a max abs difference of {diff:.3g} at batch {batch}."
        )


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, trial: int) -> float:
    """Export with a dynamic batch axis; return the max |ONNX - PyTorch| at batch 1 and 8."""
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    try:
        import onnxruntime as ort
    except ImportError:
        return math.nan
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (1, 8):
        x = torch.randn(batch, *example.shape[1:])
        with torch.no_grad():
            expected = model(x).numpy()
        diff = float(abs(session.run(None, {"input": x.numpy()})[0] - expected).max())
        _check_close(diff, "ONNX (onnxruntime)", trial, batch)
        worst = max(worst, diff)
    return worst


def _latency(model: nn.Module, arch: ArchSpec) -> float:
    from dynas.latency import measure_latency

    return measure_latency(model, (arch.in_channels, arch.input_size, arch.input_size), device="cpu", batch_size=1)


def _card(
    arch: ArchSpec,
    row: dict,
    settings: dict,
    data: Any,
    temperature: float,
    test_top1: float,
    latency_ms: float,
    onnx_diff: float,
    retrain_epochs: int | None,
    name: str,
) -> str:
    from dynas.counting import closed_form_macs, closed_form_params

    weights = f"retrained for {retrain_epochs} epochs on the full training set" if retrain_epochs else "the search trial's final weights"
    engine_keys = ("strategy",) if settings.get("engine") == "nni" else ("sampler", "pruner", "objective")
    keys = ("space", "engine", *engine_keys, "max_macs", "max_params", "max_latency_ms", "dataset", "epochs", "trials")
    search = ", ".join(f"{k}={settings[k]}" for k in keys if settings.get(k) is not None)
    size = f"{arch.in_channels}, {arch.input_size}, {arch.input_size}"
    inputs = "pixels scaled to [0, 1], then per channel (x - mean) / std"
    if data is not None:
        inputs += f" with mean {tuple(round(m, 4) for m in data.mean)}, std {tuple(round(s, 4) for s in data.std)}"
    return f"""# {name}: `{arch.to_str()}`

| | |
|---|---|
| MACs (batch 1, {arch.input_size}×{arch.input_size}) | {closed_form_macs(arch):,} |
| parameters | {closed_form_params(arch):,} |
| CPU latency, batch 1 (median; torch threads: {torch.get_num_threads()}) | {latency_ms:.2f} ms |
| validation top-1 (search) | {row['val_top1']:.2f}% |
| test top-1 | {test_top1:.2f}% |
| dynamic blocks | {row['dynamic_blocks']} |
| τ schedule | {row['tau_start']:g} → 1 over the first {row['anneal_fraction']:.0%} of steps; inference at τ = {temperature:g} |
| weights | {weights} |
| inputs | float (batch, {size}), {inputs} |
| ONNX vs PyTorch, max abs diff (batch 1 and 8) | {onnx_diff:.2e} |

Search: {search or 'unknown'}.

## Load it

```python
import dynas, torch
model = dynas.load_model("{name}/model.pt")          # nn.Module, eval mode, trained τ
scripted = torch.jit.load("{name}/model.ts")         # TorchScript
# onnxruntime.InferenceSession("{name}/model.onnx")  # input "input": (batch, {size}), output "logits"
```

Rebuild untrained: `dynas.build_model(dynas.ArchSpec.from_dict(json.load(open("{name}/arch.json"))["arch"]))`.
"""
