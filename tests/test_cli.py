"""Bad input at the command line: one clear line naming what is wrong, exit code 2, nothing lost.

Each case is a row of the README's troubleshooting table.
"""

from __future__ import annotations

import json
import pickle

import pytest

from run_search import main
from search_spaces import get_space

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
    from dynas.export import load_model
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
