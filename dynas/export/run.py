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
from dynas.config import load_run_data, read_run_config, supernet_paths, train_config
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
    finetune_epochs: int | None = None,
    latency: bool = True,
) -> list[ExportedModel]:
    """Export trials of ``run_dir`` (``select`` or explicit ``trials`` numbers) to ``out_dir``.

    Weights come from the trial's kept checkpoint or, for a trial scored by a supernet
    (``fidelity`` ``supernet``), from the run's supernet file: the subnet extracted, its BatchNorm
    recalibrated as the search scored it (the run's ``calib_images`` and seed). With
    ``finetune_epochs`` those weights are then trained further on the full training set
    (training + validation split) at their inference temperature; with ``retrain_epochs`` the
    architecture is instead retrained from scratch there. Test top-1 is measured here on the
    dataset's test split (which the search itself never saw). Everything is checked before
    anything is written; a failure leaves ``out_dir`` as it was.
    """
    run_dir = Path(run_dir)
    frame = load_results(run_dir)
    rows = rows_for(frame, select, top, trials, run_dir)
    settings = read_run_config(run_dir)
    if retrain_epochs is not None and finetune_epochs is not None:
        raise DynasError(
            "`retrain_epochs` and `finetune_epochs` exclude each other (retrain from scratch, or train the "
            f"weights further), but got retrain_epochs={retrain_epochs!r}, finetune_epochs={finetune_epochs!r}."
        )
    for name, epochs in (("retrain_epochs", retrain_epochs), ("finetune_epochs", finetune_epochs)):
        if epochs is not None:
            _check_retrain(epochs, settings, run_dir, name)
    data = _run_data(run_dir, settings, full_train=False)
    supernet = None
    if retrain_epochs is None:  # check all weights exist before writing anything
        if any(row.get("fidelity") == "supernet" for row in rows):
            supernet = _run_supernet(run_dir, settings, data)
        for row in rows:
            if row.get("fidelity") != "supernet":
                checkpoint_path(run_dir, row)
    train_data = data if retrain_epochs is None and finetune_epochs is None else _run_data(run_dir, settings, True)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    how = _Weights(supernet, data, train_data, retrain_epochs, finetune_epochs)

    def export(row: dict, folder: Path) -> ExportedModel:
        return _export_one(run_dir, folder, row, settings, how, latency)

    return _write_all(out_dir, rows, export)


@dataclass(frozen=True)
class _Weights:
    """Where an export's weights come from: the supernet (for its rows), the data, any training."""

    supernet: Any
    data: Any  # the search's split: BN recalibration and the test split
    train_data: Any  # the full training set, when training
    retrain_epochs: int | None
    finetune_epochs: int | None


def _run_supernet(run_dir: Path, settings: dict, data: Any) -> list[tuple[str, Any]]:
    """The supernets that scored ``run_dir``'s trials (its config.yaml's ``supernet``: one file or
    several), each as ``(path, supernet)``, checked to be of the run's space, input size and class count."""
    from dynas.spaces import get_space
    from dynas.supernet import load_supernet

    paths, name = supernet_paths(settings.get("supernet")), settings.get("space")
    config = str(run_dir / "config.yaml")
    if not paths or not name or data is None:
        raise DynasError(
            f"the trials of run {str(run_dir)!r} were scored by a supernet, but config file {config!r} does not "
            f"name its `supernet` file, `space` and `dataset`; export them with --retrain-epochs N."
        )
    try:
        space = get_space(name, input_size=data.input_size, num_classes=data.num_classes)
        return [(str(path), load_supernet(path, space=space)) for path in paths]
    except DynasError as err:
        raise DynasError(f"config file {config!r}: {err}") from None


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


def _check_retrain(epochs: Any, settings: dict, run_dir: Path, name: str = "retrain_epochs") -> None:
    check_int(name, epochs, 1)
    if not settings.get("dataset"):
        raise DynasError(f"cannot train ({name}): run {str(run_dir)!r} has no config.yaml naming its dataset.")
    try:
        train_config(settings, epochs=epochs, quiet=True)  # the run's recipe, checked before anything is written
    except DynasError as err:
        raise DynasError(f"config file {str(run_dir / 'config.yaml')!r}: {err}") from None


def _export_one(run_dir: Path, folder: Path, row: dict, settings: dict, how: _Weights, latency: bool) -> ExportedModel:
    arch = ArchSpec.from_dict(json.loads(row["arch_json"]))
    data = how.data
    folder.mkdir()
    if how.retrain_epochs:
        model, temperature = _retrain(arch, row, settings, how.train_data, how.retrain_epochs)
        weights = f"retrained for {how.retrain_epochs} epochs on the full training set"
    else:
        if row.get("fidelity") == "supernet":
            model, weights = _supernet_model(how.supernet, arch, settings, data)
        else:
            model = _kept_model(run_dir, row, arch)
            weights = "the search trial's final weights"
        temperature = current_temperature(model)
        if how.finetune_epochs:
            _finetune(model, row, settings, how.train_data, how.finetune_epochs, temperature)
            weights += f", then fine-tuned for {how.finetune_epochs} epochs on the full training set at τ = {temperature:g}"
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
        onnx_latency_ms=onnx_ms, onnx_diff=diff, weights=weights, name=folder.name,
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


def _supernet_model(supernets: list[tuple[str, Any]], arch: ArchSpec, settings: dict, data: Any) -> tuple[nn.Module, str]:
    """The subnet's weights from the run's supernet with BatchNorm recalibrated as the search scored
    it, and where they came from. A trial scored by several supernets (the mean of their top-1s)
    takes the weights of the one that validates it best."""
    from dynas.supernet import recalibrate_bn
    from dynas.training import evaluate

    models = []
    for path, supernet in supernets:
        model = supernet.extract(arch)
        if data is not None:
            recalibrate_bn(model, data, settings.get("calib_images") or 2000, seed=settings.get("seed", 0), device="cpu")
        models.append((path, model.cpu().eval()))
    if len(models) == 1:
        path, model = models[0]
        return model, f"extracted from the supernet ({path}), BatchNorm recalibrated as scored"
    tops = [evaluate(model, data, "val", device="cpu") for _, model in models]
    best = max(range(len(models)), key=tops.__getitem__)
    scores = ", ".join(f"{path}: {top:.2f}%" for (path, _), top in zip(models, tops))
    return models[best][1], (
        f"extracted from the supernet {models[best][0]}, the best on validation of the {len(models)} that scored "
        f"this trial (the trial's score is their mean; {scores}), BatchNorm recalibrated as scored"
    )


def _finetune(model: nn.Module, row: dict, settings: dict, data: Any, epochs: int, temperature: float) -> None:
    """Train ``model``'s weights further with the run's recipe, τ held at ``temperature``."""
    from dynas.training import train_candidate

    config = train_config(
        settings, epochs=epochs, seed=settings.get("seed", 0) + int(row["trial"]), quiet=True,
        tau_start=temperature, tau_end=temperature,
    )
    train_candidate(model, data, config)
    model.cpu().eval()


def _latency(model: nn.Module, arch: ArchSpec) -> float:
    from dynas.latency import measure_latency

    return measure_latency(model, (arch.in_channels, arch.input_size, arch.input_size), device="cpu", batch_size=1)
