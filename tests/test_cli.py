"""Bad input at the command line: one clear line naming what is wrong, exit code 2, nothing lost.

Each case is a row of the README's troubleshooting table.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from run_search import main
from dynas.spaces import get_space
from dynas.supernet import load_supernet

TINY = [
    "--dataset", "digits", "--input-size", "16", "--train-subset", "200", "--epochs", "1",
    "--max-steps-per-epoch", "1", "--batch-size", "32", "--quiet", "--num-threads", "1",
]


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _search(tmp_path, *extra: str) -> list[str]:
    return ["search", "--run-dir", str(tmp_path / "run"), *TINY, *extra]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--max-macs", "5M", "--storage", "/no/such/folder/study.log"], "`storage` '/no/such/folder/study.log' is a journal file path, but its folder '/no/such/folder' does not exist"),
        (["--max-macs", "5M", "--storage", "postgresql://dynas@127.0.0.1:1/none"], "cannot open storage 'postgresql://dynas@127.0.0.1:1/none'"),
        (["--max-macs=0"], "argument --max-macs: a count must be > 0, but got '0'"),
        (["--max-macs=-5M"], "argument --max-macs: a count must be > 0, but got '-5M'"),
        (["--max-macs", "1k"], "the smallest architecture of space 'mobile_cifar' needs"),
        (["--max-macs", "5M", "--tau-start", "0"], "argument --tau-start: must be a number > 0, but got 0"),
        (["--max-macs", "5M", "--sampler", "tpee"], "unknown sampler 'tpee'; choose one of tpe, random, nsga2, gp, grid. Did you mean 'tpe'?"),
        (["--max-macs", "5M", "--pruner", "hyperbnd"], "unknown pruner 'hyperbnd'"),
        (["--max-macs", "5M", "--engine", "nni", "--strategy", "evolutoin"], "unknown strategy 'evolutoin'; choose one of random, evolution, tpe, grid. Did you mean 'evolution'?"),
        (["--max-macs", "5M", "--space", "mobile_cifr"], "unknown search space 'mobile_cifr'.*Did you mean 'mobile_cifar'?"),
        (["--max-macs", "5M", "--engine", "keras"], "argument --engine: invalid choice: 'keras'"),
        (["--max-macs", "5M", "--dataset", "cifar10", "--data-root", "/no/such/folder"], "/no/such/folder"),
    ],
)
def test_bad_search_input(tmp_path, capsys, extra, match):
    import re

    err = _error(capsys, _search(tmp_path, *extra))
    assert re.search(match, err), err


def test_search_without_budget(tmp_path, capsys):
    assert "needs a MAC budget" in _error(capsys, _search(tmp_path))


def test_unwritable_run_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = _error(capsys, ["search", "--run-dir", str(blocker / "run"), *TINY, "--max-macs", "5M"])
    assert f"run directory '{blocker / 'run'}' is not writable" in err


def test_corrupt_data_folder_names_the_file(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"\x80\x04garbage")
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    err = _error(capsys, _search(tmp_path, "--max-macs", "5M", "--dataset", "cifar10", "--data-root", str(folder)))
    assert "data_batch_1" in err


def test_k_outside_the_space(tmp_path, capsys):
    params = dict(get_space("mobile_cifar", input_size=16).sample(seed=0).params)
    params["s1_b1_dynamic"] = True
    params["s1_b1_num_kernels"] = 3
    path = tmp_path / "enqueue.json"
    path.write_text(json.dumps(params))
    err = _error(capsys, _search(tmp_path, "--max-macs", "50M", "--enqueue", str(path)))
    assert "`s1_b1_num_kernels` must be one of (2, 4, 6, 8), but got s1_b1_num_kernels=3" in err


def test_study_of_another_budget_is_refused_and_nothing_lost(tmp_path, capsys):
    argv = _search(tmp_path, "--trials", "1", "--max-macs", "50M", "--sampler", "random")
    assert main(argv) == 0
    capsys.readouterr()
    table = (tmp_path / "run" / "results.jsonl").read_text()
    err = _error(capsys, _search(tmp_path, "--trials", "2", "--max-macs", "40M", "--sampler", "random"))
    assert "was created with budget" in err and "refusing to mix" in err
    assert (tmp_path / "run" / "results.jsonl").read_text() == table


@pytest.mark.parametrize("body,match", [
    ("max_mac: 5M\n", "unknown key 'max_mac'. Did you mean 'max_macs'?"),
    ("trials: many\n", "key 'trials'"),
    ("tau_start: 0\n", "key 'tau_start': must be a number > 0, but got 0"),
])
def test_bad_yaml(tmp_path, capsys, body, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body)
    assert match in _error(capsys, ["search", "--config", str(cfg)])


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert "is not a dynas run directory" in _error(capsys, ["report", str(tmp_path)])


def test_help_exits_0(capsys):
    assert main(["search", "--help"]) == 0
    assert "--max-macs" in capsys.readouterr().out


def test_train_writes_a_loadable_model_and_metrics(tmp_path, capsys):
    from dynas.models import load_model
    from dynas.temperature import dynamic_layers
    from dynas.presets import cifar_variant, get_preset

    arch = cifar_variant(get_preset("dy_mobilenetv2_035"), num_classes=10, input_size=16)
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps(arch.to_dict()))
    out = tmp_path / "train"
    assert main(["train", "--arch", str(arch_file), "--out", str(out), *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["arch"] == arch.to_str() and 0 <= metrics["test_top1"] <= 100
    assert len(metrics["val_top1_history"]) == 1 and metrics["attention_entropy"]
    model = load_model(out / "model.pt")
    assert model.training is False
    layers = dynamic_layers(model)
    assert layers and all(layer.temperature == 1.0 for _, layer in layers)  # annealed to the end


def test_train_refuses_an_arch_that_does_not_fit_the_data(tmp_path, capsys):
    err = _error(capsys, ["train", "--arch", "mobilenetv2_035", "--out", str(tmp_path / "t"), *TINY])
    assert "expects 224x224 inputs and 1000 classes" in err and "gives 16x16 and 10" in err
    assert not (tmp_path / "t").exists()


# ----------------------------------------------------------------------------- the package's CLI


def test_version_and_help_show_defaults(capsys):
    import dynas

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dynas {dynas.__version__}"
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.05)" in out and "(default: 3)" in out  # TrainConfig's lr and epochs


def test_python_dash_m_dynas_runs_the_cli(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "dynas", "spaces"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and "mobile_cifar:" in run.stdout, run.stderr


def test_verbose_logs_a_line_per_trial_and_train_takes_the_run_record(tmp_path, capsys):
    import yaml

    assert main(["-v", *_search(tmp_path, "--max-macs", "1.5M", "--trials", "2", "--sampler", "random")]) == 0
    out = capsys.readouterr().out + capsys.readouterr().err
    run = tmp_path / "run"
    record = yaml.safe_load((run / "config.yaml").read_text())
    assert record["max_macs"] == 1_500_000 and "verbose" not in record
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    arch = next(r["arch"] for r in rows if r["state"] == "complete")
    # train --config RUN_DIR/config.yaml: the search's recipe and data; search-only keys are skipped
    assert main(["train", "--config", str(run / "config.yaml"), "--arch", arch, "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "model.pt").is_file()
    trained = yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())
    assert {k: trained[k] for k in ("epochs", "train_subset", "input_size")} == {"epochs": 1, "train_subset": 200.0, "input_size": 16}


def test_a_refused_rerun_leaves_the_run_record_alone(tmp_path, capsys):
    assert main(_search(tmp_path, "--max-macs", "1.5M", "--trials", "1", "--sampler", "random")) == 0
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    err = _error(capsys, _search(tmp_path, "--max-macs", "2M", "--trials", "1", "--sampler", "random"))
    assert "refusing to mix them" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_refused_supernet_resume_leaves_the_run_folder_alone(tmp_path, capsys):
    sn = tmp_path / "sn"
    argv = ["supernet", "--run-dir", str(sn), *TINY, "--val-calib-images", "0"]
    assert main([*argv, "--kernel-bank", "independent"]) == 0
    before = {p.name: p.read_bytes() for p in sn.iterdir()}
    err = _error(capsys, argv)  # the default bank now: the checkpoint is of another supernet
    assert "`kernel_bank` must be 'residual'" in err and "use --kernel-bank independent" in err
    assert _error(capsys, [*argv, "--kernel-bank", "independent", "--epochs", "2"]).endswith("or another run_dir.")
    assert {p.name: p.read_bytes() for p in sn.iterdir()} == before  # config.yaml included


@pytest.mark.parametrize("flag", [[], ["--largest-static"], ["--static-twins"]])
def test_the_supernet_command_passes_the_sandwich_settings_on(tmp_path, monkeypatch, flag):
    import dynas.supernet

    seen = []
    monkeypatch.setattr(dynas.supernet, "train_supernet", lambda net, data, config, **kw: seen.append(config) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # stop at training: the config is what is checked
        main(["supernet", "--run-dir", str(tmp_path / "sn"), *TINY, "--num-random", "3", "--no-distill", *flag])
    (config,) = seen
    assert (config.num_random, config.distill) == (3, False)
    assert (config.largest_static, config.static_twins) == ("--largest-static" in flag, "--static-twins" in flag)


def test_supernet_train_then_search_with_it(tmp_path, capsys):
    sn = tmp_path / "sn"
    assert main(["supernet", "--run-dir", str(sn), *TINY, "--val-calib-images", "32"]) == 0
    assert load_supernet(sn / "supernet.pt").kernel_bank == "residual"  # the default bank
    argv = _search(tmp_path, "--max-macs", "1.5M", "--trials", "3", "--sampler", "random", "--evaluator", "supernet",
                   "--supernet", str(sn / "supernet.pt"), "--calib-images", "32")
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    done = [r for r in rows if r["state"] == "complete"]
    assert len(done) == 3 and {r["fidelity"] for r in rows} == {"supernet"}
    assert all(r["epochs"] == 0 and not r["checkpoint"] for r in done)  # scored, never trained
    # A supernet of another input size is refused before any trial.
    err = _error(capsys, ["search", "--run-dir", str(tmp_path / "other"), *TINY, "--input-size", "24", "--max-macs", "3M",
                          "--evaluator", "supernet", "--supernet", str(sn / "supernet.pt")])
    assert "supernet" in err and not (tmp_path / "other" / "results.jsonl").exists()
    assert "needs --supernet PATH" in _error(capsys, _search(tmp_path, "--max-macs", "1.5M", "--evaluator", "supernet"))
    # Export: the scored subnet's weights, as scored (its val top-1 again), and fine-tuned further.
    from dynas.config import load_run_data, read_run_config
    from dynas.models import load_model
    from dynas.training import evaluate

    run = tmp_path / "run"
    best = max(done, key=lambda r: r["val_top1"])
    assert main(["export", str(run), "--trial", str(best["trial"]), "--out", str(tmp_path / "ex"), "--no-latency"]) == 0
    folder = tmp_path / "ex" / f"trial_{best['trial']:05d}"
    exported = load_model(folder / "model.pt")
    data = load_run_data(read_run_config(run))
    assert evaluate(exported, data, "val", device="cpu") == pytest.approx(best["val_top1"], abs=1e-6)
    assert "extracted from the supernet" in (folder / "card.md").read_text()
    assert main(["export", str(run), "--trial", str(best["trial"]), "--out", str(tmp_path / "ft"), "--no-latency",
                 "--finetune-epochs", "1"]) == 0
    tuned = load_model(tmp_path / "ft" / folder.name / "model.pt")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), exported.state_dict().values()))
    assert "fine-tuned for 1 epochs" in (tmp_path / "ft" / folder.name / "card.md").read_text()
    # The supernet file gone: refused in one line, nothing written.
    (sn / "supernet.pt").rename(sn / "moved.pt")
    err = _error(capsys, ["export", str(run), "--trial", str(best["trial"]), "--out", str(tmp_path / "gone")])
    assert "supernet file" in err and "does not exist" in err and not (tmp_path / "gone").exists()


def test_search_with_two_supernets_scores_their_mean_and_exports_the_better(tmp_path, capsys):
    """--supernet A B: a candidate's score is the mean of both supernets' top-1s; export takes the better one's weights."""
    from dynas.config import load_run_data, read_run_config
    from dynas.models import load_model
    from dynas.supernet import score_subnet
    from dynas.training import evaluate

    paths = []
    for bank in ("residual", "separate"):
        sn = tmp_path / bank
        assert main(["supernet", "--run-dir", str(sn), *TINY, "--val-calib-images", "0", "--kernel-bank", bank]) == 0
        paths.append(str(sn / "supernet.pt"))
    argv = _search(tmp_path, "--max-macs", "1.5M", "--trials", "2", "--sampler", "random", "--no-baselines",
                   "--evaluator", "supernet", "--supernet", *paths, "--calib-images", "32")
    assert main(argv) == 0
    run = tmp_path / "run"
    settings = read_run_config(run)
    assert settings["supernet"] == paths  # the run's record holds both, and reads back with --config
    data = load_run_data(settings)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    done = [r for r in rows if r["state"] == "complete"]
    assert len(done) == 2
    nets = [load_supernet(p) for p in paths]
    row = done[0]
    scores = [score_subnet(net, row["arch"], data, calib_images=32, seed=settings["seed"], device="cpu").top1 for net in nets]
    assert scores[0] != scores[1] and row["val_top1"] == pytest.approx(sum(scores) / 2, abs=1e-6)
    assert main(["export", str(run), "--trial", str(row["trial"]), "--out", str(tmp_path / "ex"), "--no-latency"]) == 0
    folder = tmp_path / "ex" / f"trial_{row['trial']:05d}"
    exported = load_model(folder / "model.pt")
    assert evaluate(exported, data, "val", device="cpu") == pytest.approx(max(scores), abs=1e-6)
    card = (folder / "card.md").read_text()
    assert f"extracted from the supernet {paths[scores.index(max(scores))]}, the best on validation of the 2" in card
    # Resumed from its own record: the same two supernets, nothing trained again.
    assert main(["search", "--config", str(run / "config.yaml"), "--trials", "3"]) == 0
    assert len([line for line in (run / "results.jsonl").read_text().splitlines() if '"complete"' in line]) == 3
    # A supernet of another input size among them is refused before any trial, naming its file.
    other = tmp_path / "other24"
    assert main(["supernet", "--run-dir", str(other), *TINY, "--input-size", "24", "--val-calib-images", "0"]) == 0
    err = _error(capsys, ["search", "--run-dir", str(tmp_path / "mixed"), *TINY, "--max-macs", "1.5M", "--evaluator",
                          "supernet", "--supernet", paths[0], str(other / "supernet.pt")])
    assert "other24" in err and not (tmp_path / "mixed").exists()


def test_search_train_and_export_on_grayscale_npz(tmp_path, capsys):
    """1-channel data end to end: the space, the trained models and the exported files take 1 channel."""
    import numpy as np
    import torch

    from dynas.models import load_model

    rng = np.random.default_rng(0)
    path = tmp_path / "gray.npz"
    np.savez(path, x_train=rng.integers(0, 256, (120, 16, 16), dtype=np.uint8), y_train=np.arange(120) % 3,
             x_test=rng.integers(0, 256, (30, 16, 16), dtype=np.uint8), y_test=np.arange(30) % 3)
    data = ["--dataset", "npz", "--data-root", str(path), "--epochs", "1", "--max-steps-per-epoch", "1",
            "--batch-size", "16", "--quiet", "--num-threads", "1"]
    run = tmp_path / "run"
    assert main(["search", *data, "--max-macs", "1.5M", "--trials", "2", "--sampler", "random", "--run-dir", str(run)]) == 0
    arch = json.loads((run / "results.jsonl").read_text().splitlines()[0])["arch"]
    assert arch.startswith("r16_in1_")
    assert main(["train", "--config", str(run / "config.yaml"), "--arch", arch, "--out", str(tmp_path / "train")]) == 0
    assert main(["export", str(run), "--no-latency"]) == 0
    capsys.readouterr()
    for model_file in [tmp_path / "train" / "model.pt", *run.glob("export/*/model.pt")]:
        model = load_model(model_file)
        assert model.arch.in_channels == 1 and model(torch.zeros(2, 1, 16, 16)).shape == (2, 3)
