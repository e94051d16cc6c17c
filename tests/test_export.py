"""Export of a search's best trials: folder contents, reloading, ONNX / TorchScript parity, errors.

One real tiny search (digits, 16x16, three dynamic candidates, one training step each, the best
two keeping their weights) is run once for the module and exported once with the CLI.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dynas
from dynas.cost import closed_form_macs
from dynas.counting import count_macs
from dynas.errors import DynasError
from dynas.export import export_run, select_trials
from dynas.models import load_model, save_model
from dynas.results import load_results
from dynas.results import ResultsTable, TrialRecord
from dynas.spec import ArchSpec
from dynas.temperature import dynamic_layers
from run_search import main
from dynas.spaces import get_space

ort = pytest.importorskip("onnxruntime")

TINY = [
    "--dataset", "digits", "--input-size", "16", "--train-subset", "200", "--epochs", "1",
    "--max-steps-per-epoch", "1", "--batch-size", "32", "--quiet", "--num-threads", "1",
]
FILES = {"arch.json", "model.pt", "model.ts", "model.onnx", "card.md"}
KEEP = 2
# Every kind of dynamic conv: depthwise and k x k (dy...all), strided, and a dynamic head.
DY_ALL = "r16_in3_stem8s1_relu6 / k3e4c16s2_relu6_se_dy4all k5e3c16s1_hswish_dy2all / head64_relu6_dy2_cls10_drop0"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two cores shared with other work: one thread is both faster and reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dynamic_candidates(count: int, max_macs: int) -> list[dict]:
    space = get_space("mobile_cifar", input_size=16)
    found = []
    for seed in range(1000):
        candidate = space.sample(seed=seed)
        dynamic = any(b.num_kernels > 1 for s in candidate.arch.stages for b in s.blocks)
        if dynamic and closed_form_macs(candidate.arch) <= max_macs:
            found.append(dict(candidate.params))
        if len(found) == count:
            return found
    raise AssertionError("no dynamic candidates under the budget")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    enqueue = folder / "enqueue.json"
    enqueue.write_text(json.dumps(_dynamic_candidates(3, 2_000_000)))
    run = folder / "run"
    argv = ["search", "--run-dir", str(run), *TINY, "--trials", "3", "--max-macs", "2M", "--sampler", "random", "--no-baselines",
            "--pruner", "none", "--keep-weights", str(KEEP), "--enqueue", str(enqueue)]
    assert main(argv) == 0
    return run


@pytest.fixture(scope="module")
def frame(run_dir):
    return load_results(run_dir)


@pytest.fixture(scope="module")
def done(frame):
    """Completed trials, best first (ties in finishing order, as the search ranks them)."""
    return frame[frame["state"] == "complete"].sort_values("val_top1", ascending=False, kind="stable")


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "out"
    assert main(["export", str(run_dir), "--top", str(KEEP), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def best(exported, done) -> Path:
    return exported / f"trial_{int(done.iloc[0]['trial']):05d}"


@pytest.fixture(scope="module")
def unkept(done) -> int:
    """The completed trial that ranked below the best ``KEEP`` and so kept no weights."""
    return int(done.iloc[KEEP]["trial"])


def _input_dependent_model(arch: ArchSpec) -> torch.nn.Module:
    """Random weights whose outputs are large and differ per sample and per tau.

    A freshly built (or one-step trained) net barely depends on its input: the classifier starts
    at std 0.01 and BatchNorm at identity, so parity at atol 1e-4 would prove little.
    """
    torch.manual_seed(0)
    model = dynas.build_model(arch)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):  # the classifier and the attention branches
            torch.nn.init.normal_(module.weight, std=0.5)
    with torch.no_grad():
        for _ in range(5):  # BatchNorm running statistics of such inputs
            model(_x(32, seed=9))
    return model.eval()


@pytest.fixture(scope="module")
def dy_all_run(tmp_path_factory) -> Path:
    """A hand-made run with one trial of DY_ALL (weights kept at tau = 2, no dataset)."""
    run = tmp_path_factory.mktemp("dy_all_run")
    arch = ArchSpec.from_str(DY_ALL)
    model = _input_dependent_model(arch)
    (run / "checkpoints").mkdir()
    dynas.set_temperature(model, 2.0)
    save_model(run / "checkpoints" / "trial_00000.pt", model, arch, temperature=2.0)
    record = TrialRecord(
        trial=0, engine="optuna", state="complete", arch=arch.to_str(), arch_json=json.dumps(arch.to_dict()),
        macs=closed_form_macs(arch), params=0, dynamic_blocks=2, val_top1=50.0, tau_start=30.0,
        anneal_fraction=0.1, checkpoint="checkpoints/trial_00000.pt",
    )
    ResultsTable(run).append(record)
    export_run(run, run / "export", latency=False)
    return run / "export" / "trial_00000"


def _card_value(folder: Path, row: str) -> str:
    match = re.search(rf"^\| {re.escape(row)}[^|]* \| ([^|]+) \|$", (folder / "card.md").read_text(), re.M)
    assert match, f"no row {row!r} in the card"
    return match.group(1).strip()


def _number(text: str) -> float:
    return float(re.match(r"[-\d.,na]+", text).group(0).replace(",", ""))


def _onnx(folder: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _x(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the run itself


def test_search_trials_are_dynamic(done):
    assert (done["dynamic_blocks"] > 0).all()


def test_only_the_best_trials_keep_weights(run_dir, done):
    kept = [bool(c) and (run_dir / c).is_file() for c in done["checkpoint"]]
    assert kept == [True] * KEEP + [False] * (len(done) - KEEP)


# ----------------------------------------------------------------------------- selection


def test_best_is_the_highest_val_top1(frame, done):
    assert [r["trial"] for r in select_trials(frame, "best")] == [done.iloc[0]["trial"]]


def test_top_k_are_the_k_highest_val_top1(frame, done):
    assert [r["trial"] for r in select_trials(frame, "top", top=2)] == done["trial"].head(2).tolist()


def test_pareto_is_the_nondominated_trials(frame, done):
    def dominated(a, b):  # b dominates a
        return b.val_top1 >= a.val_top1 and b.macs <= a.macs and (b.val_top1 > a.val_top1 or b.macs < a.macs)

    rows = list(done.itertuples())
    front = {r.trial for r in rows if not any(dominated(r, o) for o in rows)}
    assert {r["trial"] for r in select_trials(frame, "pareto")} == front


def test_cli_top_exports_the_top_k(exported, done):
    assert sorted(p.name for p in exported.iterdir()) == sorted(f"trial_{t:05d}" for t in done["trial"].head(KEEP))


def test_cli_best_exports_the_best(run_dir, done, tmp_path):
    assert main(["export", str(run_dir), "--best", "--no-latency", "--out", str(tmp_path / "o")]) == 0
    assert [p.name for p in (tmp_path / "o").iterdir()] == [f"trial_{int(done.iloc[0]['trial']):05d}"]


def test_select_rejects_unknown_mode(frame):
    with pytest.raises(DynasError, match=r"`select` must be one of .* but got select='paretto'. Did you mean 'pareto'\?"):
        select_trials(frame, "paretto")


def test_select_rejects_top_below_one(frame):
    with pytest.raises(DynasError, match=r"`top` must be an integer >= 1, but got top=0"):
        select_trials(frame, "top", top=0)


# ----------------------------------------------------------------------------- folder contents


def test_each_folder_holds_the_five_files(exported):
    assert {p.name: set(q.name for q in p.iterdir()) for p in exported.iterdir()} == {
        p.name: FILES for p in exported.iterdir()
    }


def test_arch_json_is_the_trials_spec(best, done):
    payload = json.loads((best / "arch.json").read_text())
    assert ArchSpec.from_dict(payload["arch"]) == ArchSpec.from_dict(json.loads(done.iloc[0]["arch_json"]))


def test_arch_json_records_the_dynas_version(best):
    assert json.loads((best / "arch.json").read_text())["dynas_version"] == dynas.__version__


def test_arch_json_rebuilds_the_model(best):
    model = dynas.build_model(ArchSpec.from_dict(json.loads((best / "arch.json").read_text())["arch"]))
    state = torch.load(best / "model.pt", weights_only=True)["state_dict"]
    assert model.load_state_dict(state).missing_keys == []


def test_model_pt_holds_the_trials_final_weights(run_dir, best, done):
    x = _x(8)
    assert torch.equal(_forward(load_model(best / "model.pt"), x), _forward(load_model(run_dir / done.iloc[0]["checkpoint"]), x))


def test_load_model_in_a_fresh_process_gives_identical_outputs(best, tmp_path):
    x = _x(8)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch, dynas; torch.set_num_threads(1); "
        "x = torch.load(sys.argv[2]); model = dynas.load_model(sys.argv[1]); "
        "torch.save(model(x).detach(), sys.argv[3])"
    )
    argv = [sys.executable, "-c", script, str(best / "model.pt"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")]
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    assert torch.equal(torch.load(tmp_path / "y.pt"), _forward(load_model(best / "model.pt"), x))


def test_loaded_model_is_at_the_trained_temperature(best):
    assert {layer.temperature for _, layer in dynamic_layers(load_model(best / "model.pt"))} == {1.0}


def test_load_model_rejects_a_file_that_is_not_a_model(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(DynasError, match=r"junk.pt' is not a dynas model file"):
        load_model(tmp_path / "junk.pt")


# ----------------------------------------------------------------------------- ONNX and TorchScript


@pytest.fixture(params=["searched", "dy_all"])
def dynamic_folder(request, best, dy_all_run) -> Path:
    return {"searched": best, "dy_all": dy_all_run}[request.param]


def test_exported_model_is_dynamic(dynamic_folder):
    assert dynamic_layers(load_model(dynamic_folder / "model.pt"))


@pytest.mark.parametrize("batch", [1, 8])
def test_onnx_matches_pytorch(dynamic_folder, batch):
    x = _x(batch)
    torch.testing.assert_close(_onnx(dynamic_folder, x), _forward(load_model(dynamic_folder / "model.pt"), x), atol=1e-4, rtol=0)


def test_hand_made_model_output_depends_on_each_input(dy_all_run):
    y = _forward(load_model(dy_all_run / "model.pt"), _x(8))
    assert (y - y.mean(dim=0)).abs().max() > 1e-3  # so that the parity tests can fail


def test_onnx_runs_at_the_trained_temperature_not_30(dy_all_run):
    x = _x(8)
    model = load_model(dy_all_run / "model.pt")
    dynas.set_temperature(model, 30.0)
    assert (_onnx(dy_all_run, x) - _forward(model, x)).abs().max() > 1e-3


@pytest.mark.parametrize("batch", [1, 8])
def test_torchscript_matches_pytorch(dynamic_folder, batch):
    x = _x(batch, seed=1)
    scripted = torch.jit.load(str(dynamic_folder / "model.ts"))
    torch.testing.assert_close(_forward(scripted, x), _forward(load_model(dynamic_folder / "model.pt"), x), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- the card


def test_card_macs_equal_the_counter(best):
    arch = ArchSpec.from_dict(json.loads((best / "arch.json").read_text())["arch"])
    assert _number(_card_value(best, "MACs")) == count_macs(arch).total_macs


def test_card_reports_a_measured_latency(best):
    assert _number(_card_value(best, "CPU latency")) > 0


def test_card_test_top1_is_the_models_accuracy_on_the_test_split(best):
    from dynas.data import load_data
    from dynas.training import evaluate

    data = load_data("digits", input_size=16, train_subset=200, val_fraction=0.1, seed=0)
    expected = evaluate(load_model(best / "model.pt"), data, "test", device="cpu")
    assert _card_value(best, "test top-1") == f"{expected:.2f}%"


def test_model_pt_records_the_normalisation_it_was_trained_with(best):
    from dynas.data import load_data

    data = load_data("digits", input_size=16, train_subset=200, val_fraction=0.1, seed=0)  # the search's split
    payload = torch.load(best / "model.pt", weights_only=True)
    assert (payload["mean"], payload["std"]) == (list(data.mean), list(data.std))


def test_card_reports_the_val_top1_of_the_search(best, done):
    assert _card_value(best, "validation top-1") == f"{done.iloc[0]['val_top1']:.2f}%"


def test_card_reports_the_tau_schedule(best, done):
    row = done.iloc[0]
    expected = f"{row['tau_start']:g} → 1 over the first {row['anneal_fraction']:.0%} of steps; inference at τ = 1"
    assert _card_value(best, "τ schedule") == expected


def test_card_reports_the_search_settings(best):
    assert "max_macs=2000000" in (best / "card.md").read_text()


def test_card_says_how_to_load_it(best, monkeypatch):
    import dynas

    card = (best / "card.md").read_text()
    line = f'model = dynas.create_model("{best.name}/model.pt")'
    assert line in card
    monkeypatch.chdir(best.parent)
    scope: dict = {"dynas": dynas}
    exec(line, scope)  # the card's own line loads the exported model
    assert not scope["model"].training


# ----------------------------------------------------------------------------- errors


def _not_a_run(run_dir, tmp_path, unkept):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", None, r"is not a dynas run directory \(no results.jsonl in it\)"


def _unknown_trial(run_dir, tmp_path, unkept):
    return run_dir, 99, r"`trial` must be a completed trial of run '.*', but got trial=99; completed trials: \d"


def _weights_not_kept(run_dir, tmp_path, unkept):
    return run_dir, unkept, rf"the weights of trial {unkept} of run '.*' were not kept .* --retrain-epochs"


ERRORS = [_not_a_run, _unknown_trial, _weights_not_kept]


@pytest.mark.parametrize("case", ERRORS)
def test_export_error_is_clear(case, run_dir, tmp_path, unkept):
    source, trial, match = case(run_dir, tmp_path, unkept)
    with pytest.raises(DynasError, match=match):
        export_run(source, tmp_path / "out", trials=None if trial is None else [trial])


@pytest.mark.parametrize("case", ERRORS)
def test_export_error_writes_nothing(case, run_dir, tmp_path, unkept):
    source, trial, _ = case(run_dir, tmp_path, unkept)
    with pytest.raises(DynasError):
        export_run(source, tmp_path / "out" / "nested", trials=None if trial is None else [trial])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ERRORS)
def test_cli_export_error_is_one_line_with_exit_2(case, run_dir, tmp_path, unkept, capsys):
    source, trial, match = case(run_dir, tmp_path, unkept)
    argv = ["export", str(source), "--out", str(tmp_path / "out")] + ([] if trial is None else ["--trial", str(trial)])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err


def test_output_folder_that_is_a_file_is_a_clear_error(run_dir, tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(DynasError, match=r"the output folder '.*out' must be a writable folder"):
        export_run(run_dir, tmp_path / "out", latency=False)


def test_failure_midway_leaves_the_output_folder_as_it_was(run_dir, done, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    first, second = (done.iloc[i] for i in range(2))
    (broken / second["checkpoint"]).write_bytes(b"truncated")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier export")
    with pytest.raises(DynasError, match="is not a dynas model file"):
        export_run(broken, out, trials=[int(first["trial"]), int(second["trial"])], latency=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ----------------------------------------------------------------------------- retraining


@pytest.fixture(scope="module")
def retrained(run_dir, unkept, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("retrained")
    assert main(["export", str(run_dir), "--trial", str(unkept), "--retrain-epochs", "1", "--no-latency", "--out", str(out)]) == 0
    return out / f"trial_{unkept:05d}"


def test_retrain_exports_a_trial_whose_weights_were_not_kept(retrained):
    assert {p.name for p in retrained.iterdir()} == FILES


def test_retrained_card_says_so(retrained):
    assert _card_value(retrained, "weights") == "retrained for 1 epochs on the full training set"


def test_retrained_model_is_at_the_trained_temperature(retrained):
    assert {layer.temperature for _, layer in dynamic_layers(load_model(retrained / "model.pt"))} == {1.0}


def test_retrained_test_top1_is_measured(retrained):
    assert not math.isnan(_number(_card_value(retrained, "test top-1")))


def test_the_card_has_eager_and_onnxruntime_latencies(best):
    card = (best / "card.md").read_text()
    eager = re.search(r"PyTorch eager .*\| ([\d.]+) ms \|", card)
    onnx = re.search(r"onnxruntime `model.onnx` .*\| ([\d.]+) ms \|", card)
    assert eager and onnx and float(eager.group(1)) > 0 and float(onnx.group(1)) > 0
