"""Export trials of a run directory: staged, checked, then renamed into place.

All folders of one export are written under a hidden staging folder and renamed into place only
when every one of them is complete, so a failed export leaves nothing partial behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynas.builder import build_model
from dynas.checks import check_int
from dynas.config import load_run_data, read_run_config, train_config
from dynas.errors import DynasError
from dynas.export.card import model_card
from dynas.export.formats import export_onnx, export_torchscript, onnx_latency_ms
from dynas.export.selection import checkpoint_path, rows_for
from dynas.models import load_model, save_model
from dynas.results import load_results
from dynas.spec import ArchSpec
from dynas.temperature import current_temperature

__all__ = ["ONNX_MISSING", "ExportedModel", "export_run"]

ONNX_MISSING = "ONNX export needs the onnx package: pip install 'dynas[export]', then export again"


@dataclass(frozen=True)
class ExportedModel:
    """One exported trial: its number, its folder, and how far ONNX lies from PyTorch."""

    trial: int
    folder: Path
    onnx_max_abs_diff: float


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
    run_dir = Path(run_dir)
    frame = load_results(run_dir)
    rows = rows_for(frame, select, top, trials, run_dir)
    settings = read_run_config(run_dir)
    if retrain_epochs is None:
        for row in rows:  # check all weights exist before writing anything
            checkpoint_path(run_dir, row)
    else:
        _check_retrain(retrain_epochs, settings, run_dir)
    data = _run_data(run_dir, settings, full_train=retrain_epochs is not None)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"

    def export(row: dict, folder: Path) -> ExportedModel:
        return _export_one(run_dir, folder, row, settings, data, retrain_epochs, latency)

    return _write_all(out_dir, rows, export)


def _run_data(run_dir: Path, settings: dict, full_train: bool) -> Any:
    """The run's data as its config.yaml names it (None without one); a bad record names the file."""
    if not settings.get("dataset"):
        return None
    try:
        return load_run_data(settings, full_train=full_train)
    except DynasError as err:
        raise DynasError(f"config file {str(run_dir / 'config.yaml')!r}: {err}") from None


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


def _check_retrain(epochs: Any, settings: dict, run_dir: Path) -> None:
    check_int("retrain_epochs", epochs, 1)
    if not settings.get("dataset"):
        raise DynasError(f"cannot retrain: run {str(run_dir)!r} has no config.yaml naming its dataset.")
    try:
        train_config(settings, epochs=epochs, quiet=True)  # the run's recipe, checked before anything is written
    except DynasError as err:
        raise DynasError(f"config file {str(run_dir / 'config.yaml')!r}: {err}") from None


def _export_one(
    run_dir: Path, folder: Path, row: dict, settings: dict, data: Any, retrain_epochs: int | None, latency: bool
) -> ExportedModel:
    arch = ArchSpec.from_dict(json.loads(row["arch_json"]))
    folder.mkdir()
    if retrain_epochs:
        model, temperature = _retrain(arch, row, settings, data, retrain_epochs)
    else:
        model = _kept_model(run_dir, row, arch)
        temperature = current_temperature(model)
    test_top1 = _test_top1(model, data)
    (folder / "arch.json").write_text(json.dumps(_arch_payload(arch), indent=2), encoding="utf-8")
    save_model(folder / "model.pt", model, arch, temperature, trial=int(row["trial"]), **_normalisation(data))
    example = torch.randn(1, arch.in_channels, arch.input_size, arch.input_size)
    name = f"trial {int(row['trial'])}"
    export_torchscript(model, folder / "model.ts", example, name=name)
    onnx = _have_onnx()
    diff = export_onnx(model, folder / "model.onnx", example, name=name) if onnx else math.nan
    ms = _latency(model, arch) if latency else math.nan
    onnx_ms = onnx_latency_ms(folder / "model.onnx", example) if latency and not math.isnan(diff) else math.nan
    card = model_card(
        arch, row, settings, data, temperature=temperature, test_top1=test_top1, latency_ms=ms,
        onnx_latency_ms=onnx_ms, onnx_diff=diff, retrain_epochs=retrain_epochs, name=folder.name,
    )
    if not onnx:
        card += f"\nmodel.onnx was not written: {ONNX_MISSING}.\n"
    (folder / "card.md").write_text(card, encoding="utf-8")
    return ExportedModel(int(row["trial"]), folder, diff)


def _have_onnx() -> bool:
    """Whether torch.onnx can export here (it needs the onnx package); without it the rest is exported."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def _kept_model(run_dir: Path, row: dict, arch: ArchSpec) -> nn.Module:
    """The trial's kept weights, refused when the file holds another architecture's (a swapped or stray file)."""
    path = checkpoint_path(run_dir, row)
    model = load_model(path)
    if model.arch != arch:
        raise DynasError(
            f"checkpoint {str(path)!r} holds the weights of {model.arch.to_str()!r}, not of trial "
            f"{int(row['trial'])}'s {arch.to_str()!r}; the run folder is damaged (export with --retrain-epochs N)."
        )
    return model


def _arch_payload(arch: ArchSpec) -> dict:
    from dynas import __version__

    return {"dynas_version": __version__, "arch": arch.to_dict(), "arch_str": arch.to_str()}


def _normalisation(data: Any) -> dict[str, Any]:
    return {} if data is None else {"mean": list(data.mean), "std": list(data.std)}


def _test_top1(model: nn.Module, data: Any) -> float:
    if data is None:
        return math.nan
    from dynas.training import evaluate

    return evaluate(model, data, "test", device="cpu")


def _retrain(arch: ArchSpec, row: dict, settings: dict, data: Any, epochs: int) -> tuple[nn.Module, float]:
    """Train ``arch`` from scratch with the run's recipe and the row's τ schedule (its seed, as the search did)."""
    from dynas.training import train_candidate

    schedule = {k: float(row[k]) for k in ("tau_start", "anneal_fraction") if not math.isnan(float(row[k]))}
    config = train_config(
        settings, epochs=epochs, seed=settings.get("seed", 0) + int(row["trial"]), quiet=True, **schedule
    )
    torch.manual_seed(config.seed)  # the initial weights, as the search's trial drew them
    model = build_model(arch)
    result = train_candidate(model, data, config)
    return model.cpu().eval(), result.tau_end


def _latency(model: nn.Module, arch: ArchSpec) -> float:
    from dynas.latency import measure_latency

    return measure_latency(model, (arch.in_channels, arch.input_size, arch.input_size), device="cpu", batch_size=1)
