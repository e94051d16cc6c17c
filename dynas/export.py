"""Export the best architectures of a search as deployable models, and load them back.

``export_run(run_dir, ...)`` writes one folder per selected trial::

    trial_00012/
        arch.json     the canonical spec (with the dynas version); rebuilds the model
        model.pt      weights + spec + inference temperature; ``dynas.load_model(path)``
        model.ts      TorchScript (traced)
        model.onnx    ONNX with a dynamic batch axis
        card.md       MACs, params, CPU latency, val/test top-1, tau schedule, search settings

Each folder is written to a temporary name and renamed when complete, so a failed export leaves
nothing partial behind.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from dynas.builder import build_model
from dynas.errors import DynasError
from dynas.spec import ArchSpec
from dynas.temperature import set_temperature

__all__ = ["ExportedModel", "export_run", "load_model", "save_model", "select_trials"]

_SELECT = ("best", "top", "pareto")


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
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or "arch" not in payload or "state_dict" not in payload:
        raise DynasError(f"{str(path)!r} is not a dynas model file (it needs 'arch' and 'state_dict').")
    model = build_model(ArchSpec.from_dict(payload["arch"]))
    model.load_state_dict(payload["state_dict"])
    set_temperature(model, payload.get("temperature", 1.0))
    return model.eval()


@dataclass(frozen=True)
class ExportedModel:
    trial: int
    folder: Path
    onnx_max_abs_diff: float


def select_trials(frame: Any, select: str, top: int = 3) -> list[dict]:
    """Rows of the completed trials to export: the best, the top ``top``, or the Pareto front."""
    from dynas.search.results import pareto_front

    if select not in _SELECT:
        raise DynasError(f"`select` must be one of {_SELECT}, but got select={select!r}.")
    done = frame[frame["state"] == "complete"].sort_values("val_top1", ascending=False)
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
    architecture on the full training set of the run's dataset. Test top-1 is measured here on the
    dataset's test split (which the search itself never saw).
    """
    from dynas.search.report import load_results

    run_dir = Path(run_dir)
    frame = load_results(run_dir)
    rows = _rows_for(frame, select, top, trials)
    settings = _run_settings(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    if retrain_epochs is None:
        for row in rows:  # check all weights exist before writing anything
            _checkpoint_path(run_dir, row)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_export_one(run_dir, out_dir, row, settings, retrain_epochs, latency) for row in rows]


def _rows_for(frame: Any, select: str, top: int, trials: list[int] | None) -> list[dict]:
    if trials is None:
        return select_trials(frame, select, top)
    rows = []
    for number in trials:
        match = frame[(frame["trial"] == number) & (frame["state"] == "complete")]
        if match.empty:
            known = sorted(frame.loc[frame["state"] == "complete", "trial"].tolist())
            raise DynasError(f"trial {number} is not a completed trial of this run; completed trials: {known}.")
        rows.append(match.iloc[0].to_dict())
    return rows


def _run_settings(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _checkpoint_path(run_dir: Path, row: dict) -> Path:
    path = run_dir / row["checkpoint"] if row.get("checkpoint") else None
    if path is None or not path.is_file():
        raise DynasError(
            f"the weights of trial {row['trial']} were not kept (only the best trials keep theirs, "
            f"see --keep-weights); export it with --retrain-epochs N to retrain it."
        )
    return path


def _export_one(
    run_dir: Path, out_dir: Path, row: dict, settings: dict, retrain_epochs: int | None, latency: bool
) -> ExportedModel:
    arch = ArchSpec.from_dict(json.loads(row["arch_json"]))
    final = out_dir / f"trial_{int(row['trial']):05d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=out_dir))
    try:
        model, temperature, test_top1 = _weights(run_dir, row, arch, settings, retrain_epochs)
        (tmp / "arch.json").write_text(json.dumps(_arch_payload(arch), indent=2), encoding="utf-8")
        save_model(tmp / "model.pt", model, arch, temperature, trial=int(row["trial"]))
        example = torch.randn(1, arch.in_channels, arch.input_size, arch.input_size)
        torch.jit.trace(model, example).save(str(tmp / "model.ts"))
        diff = _export_onnx(model, example, tmp / "model.onnx")
        ms = _latency(model, arch) if latency else math.nan
        card = _card(arch, row, settings, temperature, test_top1, ms, diff, retrain_epochs, final.name)
        (tmp / "card.md").write_text(card, encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportedModel(int(row["trial"]), final, diff)


def _arch_payload(arch: ArchSpec) -> dict:
    from dynas import __version__

    return {"dynas_version": __version__, "arch": arch.to_dict(), "arch_str": arch.to_str()}


def _weights(
    run_dir: Path, row: dict, arch: ArchSpec, settings: dict, retrain_epochs: int | None
) -> tuple[nn.Module, float, float]:
    data = _test_data(settings, val_fraction=0.0 if retrain_epochs else None)
    if retrain_epochs:
        model, temperature = _retrain(arch, row, settings, data, retrain_epochs)
    else:
        model = load_model(_checkpoint_path(run_dir, row))
        temperature = _temperature(model)
    test_top1 = math.nan
    if data is not None:
        from dynas.training import evaluate

        test_top1 = evaluate(model, data, "test", device="cpu")
    return model.eval(), temperature, test_top1


def _temperature(model: nn.Module) -> float:
    from dynas.temperature import dynamic_layers

    layers = dynamic_layers(model)
    return layers[0][1].temperature if layers else 1.0


def _test_data(settings: dict, val_fraction: float | None) -> Any:
    """The run's dataset (for test top-1 and retraining), or None if the run has no settings."""
    if not settings.get("dataset"):
        return None
    from dynas.data import load_data

    return load_data(
        settings["dataset"],
        root=settings.get("data_root"),
        val_fraction=settings.get("val_fraction", 0.1) if val_fraction is None else val_fraction,
        input_size=settings.get("input_size"),
        seed=settings.get("seed", 0),
    )


def _retrain(arch: ArchSpec, row: dict, settings: dict, data: Any, epochs: int) -> tuple[nn.Module, float]:
    from dynas.training import TrainConfig, train_candidate

    if data is None:
        raise DynasError("cannot retrain: the run directory has no config.yaml naming its dataset.")
    config = TrainConfig(
        epochs=epochs,
        batch_size=settings.get("batch_size", 64),
        lr=settings.get("lr", 0.05),
        tau_start=float(row["tau_start"]) if not math.isnan(row["tau_start"]) else 30.0,
        anneal_fraction=float(row["anneal_fraction"]) if not math.isnan(row["anneal_fraction"]) else 0.1,
        seed=settings.get("seed", 0),
        quiet=True,
    )
    model = build_model(arch)
    train_candidate(model, data, config)
    return model.cpu(), config.tau_end


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> float:
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
        got = session.run(None, {"input": x.numpy()})[0]
        worst = max(worst, float(abs(got - expected).max()))
    return worst


def _latency(model: nn.Module, arch: ArchSpec) -> float:
    from dynas.latency import measure_latency

    return measure_latency(model, (arch.in_channels, arch.input_size, arch.input_size), device="cpu", batch_size=1)


def _card(
    arch: ArchSpec,
    row: dict,
    settings: dict,
    temperature: float,
    test_top1: float,
    latency_ms: float,
    onnx_diff: float,
    retrain_epochs: int | None,
    name: str,
) -> str:
    from dynas.counting import closed_form_macs, closed_form_params

    weights = f"retrained for {retrain_epochs} epochs on the full training set" if retrain_epochs else "the search trial's final weights"
    search = ", ".join(f"{k}={settings[k]}" for k in ("space", "engine", "sampler", "strategy", "max_macs", "dataset", "epochs", "trials") if k in settings)
    return f"""# {name}: `{arch.to_str()}`

| | |
|---|---|
| MACs (batch 1, {arch.input_size}×{arch.input_size}) | {closed_form_macs(arch):,} |
| parameters | {closed_form_params(arch):,} |
| CPU latency, batch 1 (median) | {latency_ms:.2f} ms |
| validation top-1 (search) | {row['val_top1']:.2f}% |
| test top-1 | {test_top1:.2f}% |
| dynamic blocks | {row['dynamic_blocks']} |
| τ schedule | {row['tau_start']:g} → 1 over the first {row['anneal_fraction']:.0%} of steps; inference at τ = {temperature:g} |
| weights | {weights} |
| ONNX vs PyTorch, max abs diff (batch 1 and 8) | {onnx_diff:.2e} |

Search: {search or 'unknown'}.

## Load it

```python
import dynas
model = dynas.load_model("{name}/model.pt")          # nn.Module, eval mode, trained τ
scripted = torch.jit.load("{name}/model.ts")         # TorchScript
# onnxruntime.InferenceSession("{name}/model.onnx")  # input "input": (batch, {arch.in_channels}, {arch.input_size}, {arch.input_size})
```

Rebuild untrained: `dynas.build_model(dynas.ArchSpec.from_dict(json.load(open("arch.json"))["arch"]))`.
"""
