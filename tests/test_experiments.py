"""The scripts in experiments/: the paper table's figures and the static-vs-dynamic comparison."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

from dynas.cost import closed_form_macs, closed_form_params
from dynas.presets import get_preset

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _script(name: str) -> ModuleType:
    if str(EXPERIMENTS) not in sys.path:  # as `python experiments/NAME.py` does: its siblings (_args) import
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_mobilenetv2_x1_matches_the_paper_within_2_percent():
    (row,) = [r for r in _script("paper_table").PAPER if r.model == "MobileNetV2 x1.0"]
    for preset, (params, macs) in ((row.static_preset, row.paper_static), (row.dynamic_preset, row.paper_dynamic)):
        arch = get_preset(preset)
        assert closed_form_params(arch) == pytest.approx(params, rel=0.02)
        assert closed_form_macs(arch) == pytest.approx(macs, rel=0.02)


@pytest.mark.parametrize("model", ["MobileNetV2 x0.75", "MobileNetV2 x0.5", "MobileNetV2 x0.35"])
def test_narrow_mobilenetv2_macs_match_the_paper_within_half_a_percent(model):
    (row,) = [r for r in _script("paper_table").PAPER if r.model == model]
    assert closed_form_macs(get_preset(row.dynamic_preset)) == pytest.approx(row.paper_dynamic[1], rel=0.005)


def test_paper_table_prints_every_row(capsys):
    assert _script("paper_table").main(["--closed-form"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("MobileNetV2 x1.0", "MobileNetV2 x0.35", "MobileNetV3-Small"))
    assert "Layer rule of the DY presets" in out


@pytest.mark.parametrize("width", [0.35, 0.5, 1.0])
def test_matched_pair_is_static_vs_dynamic_at_nearly_equal_macs(width):
    static, dynamic = _script("static_vs_dynamic").matched_pair(width)
    assert all(b.num_kernels == 1 for b in static.blocks) and all(b.num_kernels == 4 for b in dynamic.blocks)
    assert closed_form_macs(dynamic) == pytest.approx(closed_form_macs(static), rel=0.05)


def test_static_vs_dynamic_runs_and_writes_results(cifar10_mini, tmp_path, capsys):
    argv = ["--data-root", str(cifar10_mini), "--width", "0.35", "--epochs", "1", "--max-steps-per-epoch", "2",
            "--batch-size", "32", "--num-threads", "1", "--quiet", "--out", str(tmp_path)]
    assert _script("static_vs_dynamic").main(argv) == 0
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    static, dynamic = summary["static"], summary["dy"]
    assert dynamic["params"] > 2 * static["params"] and dynamic["macs"] == pytest.approx(static["macs"], rel=0.05)
    assert all(0 <= t <= 100 for t in static["test_top1"] + dynamic["test_top1"]) and static["seeds"] == [0]
    assert "x static" in capsys.readouterr().out


@pytest.mark.parametrize("width", [0.35, 0.5])
def test_every_operator_is_matched_to_the_static_macs(width):
    archs = _script("static_vs_dynamic").matched_archs(width, ("static", "dy", "od1", "od4", "dcd"))
    target = closed_form_macs(archs["static"])
    assert {b.op for b in archs["od4"].blocks} == {"od"} and {b.num_kernels for b in archs["od4"].blocks} == {4}
    assert {b.op for b in archs["dcd"].blocks[1:]} == {"dcd"}
    for op, arch in archs.items():  # the nearest width the channel rounding (multiples of 8) allows
        assert closed_form_macs(arch) == pytest.approx(target, rel=0.1), op


def test_operator_comparison_resumes_seed_by_seed(tmp_path, capsys):
    script = _script("static_vs_dynamic")
    argv = ["--dataset", "digits", "--input-size", "16", "--width", "0.35", "--ops", "static,od1", "--epochs", "1",
            "--max-steps-per-epoch", "1", "--batch-size", "16", "--num-threads", "1", "--quiet", "--out", str(tmp_path)]
    assert script.main([*argv, "--seeds", "0"]) == 0
    first = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert script.main([*argv, "--seeds", "0,1"]) == 0  # seed 0 is read back, only seed 1 trains
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["runs"][:2] == first and [(r["op"], r["seed"]) for r in results["runs"][2:]] == [("static", 1), ("od1", 1)]
    assert results["summary"]["od1"]["seeds"] == [0, 1]
    assert script.main([*argv, "--ops", "static", "--seeds", "0"]) == 0  # fewer operators: nothing dropped
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == results["runs"]
    with pytest.raises(SystemExit):
        script.main([*argv, "--ops", "static,odd"])
    assert "must be distinct names from static, dy, od1, od4, dcd" in capsys.readouterr().err


def test_search_vs_baselines_retrains_searched_and_baselines(tmp_path, capsys):
    script = _script("search_vs_baselines")
    argv = ["--dataset", "digits", "--input-size", "16", "--max-macs", "1.5M", "--trials", "3", "--proxy-epochs", "1",
            "--retrain-epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "16", "--seeds", "0,1",
            "--num-threads", "1", "--quiet", "--out", str(tmp_path)]
    assert script.main(argv) == 0
    table = pd.read_csv(tmp_path / "retrain.csv")
    assert {"baseline-static", "baseline-dynamic", "searched", "random-best"} <= set(table["role"])
    assert table["arch"].is_unique and (tmp_path / "retrain.png").stat().st_size > 0
    runs = (tmp_path / "retrain.jsonl").read_text().splitlines()
    assert len(runs) == 2 * len(table)  # every pick, every seed
    assert script.main(argv) == 0  # a rerun resumes: nothing retrained again
    assert (tmp_path / "retrain.jsonl").read_text().splitlines() == runs
    assert "| baseline-static" in capsys.readouterr().out


def test_odconv_presets_match_the_official_readme():
    for row in _script("paper_table").OPERATORS:
        params, macs, _ = row.figures
        arch = get_preset(row.preset)
        if row.source == "ODConv README":
            assert closed_form_params(arch) == pytest.approx(params, rel=0.005), row.preset
            if not row.preset.startswith("od4_"):
                assert closed_form_macs(arch) == pytest.approx(macs, rel=0.01), row.preset


@pytest.mark.parametrize("width", ["100", "050"])
def test_odconv_4x_macs_differ_from_the_readme_by_its_counting_of_the_aggregation(width):
    """The README's 4x counts K - 1 adds per kernel element on top of dynas' K |W|: with them, 4x is off as 1x is."""
    from dynas.builder import build_model
    from dynas.ops import ODConv2d

    rows = {r.preset: r for r in _script("paper_table").OPERATORS}
    one, four = rows[f"od1_mobilenetv2_{width}"], rows[f"od4_mobilenetv2_{width}"]
    model = build_model(get_preset(four.preset))
    kernel_elements = sum(m.weight[0].numel() for m in model.modules() if isinstance(m, ODConv2d))
    offset_1x = closed_form_macs(get_preset(one.preset)) / one.figures[1]
    with_adds = (closed_form_macs(get_preset(four.preset)) + 3 * kernel_elements) / four.figures[1]
    assert abs(closed_form_macs(get_preset(four.preset)) / four.figures[1] - 1) > 0.02  # the deviation explained
    assert with_adds == pytest.approx(offset_1x, abs=0.005)


def test_dcd_presets_match_the_official_model_but_its_classifier_and_latent_norms():
    for row in _script("paper_table").OPERATORS:
        if row.preset.startswith("dcd_"):
            params = closed_form_params(get_preset(row.preset))
            assert params + row.unmodelled_params == pytest.approx(row.figures[0], rel=0.02), row.preset
            assert abs(params / row.figures[0] - 1) > 0.02  # hence the stated reason


def test_paper_table_prints_the_operator_table(capsys):
    assert _script("paper_table").main(["--closed-form"]) == 0
    out = capsys.readouterr().out
    assert "ODConv and DCD presets against their sources" in out
    assert all(preset in out for preset in ("od1_mobilenetv2_100", "od4_mobilenetv2_050", "dcd_mobilenetv2_050"))


def test_anneal_length_trains_each_fraction_and_the_static_twin(tmp_path, capsys):
    script = _script("anneal_length")
    argv = ["--networks", "dynamic", "--epochs", "1", "--max-steps-per-epoch", "1", "--seeds", "0",
            "--anneal-fractions", "0.1,1", "--num-threads", "1", "--out", str(tmp_path)]
    assert script.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["K"], r["anneal_fraction"]) for r in rows] == [(4, 0.1), (4, 1.0), (1, None)]
    assert "static (K = 1)" in capsys.readouterr().out
    static = script.with_kernels(script.networks("mobile_cifar", 16, 10, 1.5e6)["dynamic"], 1)
    assert {b.num_kernels for b in static.blocks} == {1} and closed_form_macs(static) < 1.5e6


_TWIN_ARGS = ["--dataset", "digits", "--input-size", "16", "--train-subset", "300", "--batch-size", "32",
              "--max-steps-per-epoch", "2", "--num-subnets", "16", "--strata", "2", "--mac-band", "0.8M:2.5M",
              "--calib-images", "64", "--num-threads", "1", "--quiet"]


def test_twin_gap_trains_each_twin_per_length_in_the_ranking_runs_rows(tmp_path, capsys):
    script = _script("twin_gap")
    assert script.main([*_TWIN_ARGS, "--pairs", "2", "--epochs", "1,2", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["epochs"] for r in rows] == [1, 1, 2, 2]
    runs = [json.loads(line) for line in (tmp_path / "standalone.jsonl").read_text().splitlines()]
    assert len(runs) == 8 and {r["setting"]["epochs"] for r in runs} == {1, 2}
    top1 = {(r["arch"], r["setting"]["epochs"]): r["top1"] for r in runs}
    for r in rows:
        assert r["gap_points"] == pytest.approx(top1[(r["dynamic_arch"], r["epochs"])] - top1[(r["static_arch"], r["epochs"])])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["2"]["pairs"] == 2 and summary["2"]["mean_gap_points"] == pytest.approx(
        sum(r["gap_points"] for r in rows if r["epochs"] == 2) / 2)
    assert "mixed - static" in capsys.readouterr().out
    # The rows are the ranking experiment's: one of its runs with the same recipe reuses them.
    ranking = _script("supernet_ranking").build_parser().parse_args([*_TWIN_ARGS, "--epochs", "2"])
    assert [r["setting"] for r in runs if r["setting"]["epochs"] == 2][0] == _script("supernet_ranking").standalone_setting(ranking)
    # A rerun trains nothing more.
    assert script.main([*_TWIN_ARGS, "--pairs", "2", "--epochs", "1,2", "--out", str(tmp_path)]) == 0
    assert len((tmp_path / "standalone.jsonl").read_text().splitlines()) == 8


def test_twin_gap_writes_the_results_when_another_shard_finished_an_earlier_length_late(tmp_path, monkeypatch, capsys):
    script = _script("twin_gap")
    argv = [*_TWIN_ARGS, "--pairs", "1", "--epochs", "1,2"]
    assert script.main([*argv, "--out", str(tmp_path / "all")]) == 0
    rows = (tmp_path / "all" / "standalone.jsonl").read_text().splitlines()
    other = [rows[1], rows[3]]  # shard 1/2's runs: the second network of each length
    shard = tmp_path / "shard"
    shard.mkdir()
    (shard / "standalone.jsonl").write_text(other[1] + "\n")  # shard 1 had its 2-epoch run ...
    train = script._standalone
    calls = []

    def late(*args, **kwargs):
        done = train(*args, **kwargs)
        if not calls:  # ... and finished its 1-epoch one only after shard 0 had read that length's rows
            with (shard / "standalone.jsonl").open("a") as out:
                out.write(other[0] + "\n")
        calls.append(1)
        return done

    monkeypatch.setattr(script, "_standalone", late)
    assert script.main([*argv, "--shard", "0/2", "--out", str(shard)]) == 0
    assert "mixed - static" in capsys.readouterr().out
    assert len((shard / "standalone.jsonl").read_text().splitlines()) == 4  # its two runs, the other shard's two
    assert [json.loads(r)["epochs"] for r in (shard / "results.jsonl").read_text().splitlines()] == [1, 2]


def test_twin_gap_spreads_the_pairs_over_the_band():
    spread = _script("twin_gap").spread
    assert spread(list(range(10)), 4) == [0, 3, 6, 9] and spread(list(range(10)), 3) == [0, 4, 9]
    assert spread(list(range(5)), 1) == [2] and spread(list(range(3)), None) == spread(list(range(3)), 7) == [0, 1, 2]


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("supernet_ranking", ["--shard", "2/2"], "`--shard` must be I/N with 0 <= I < N, such as 0/2, but got '2/2'."),
        ("supernet_ranking", ["--mac-band", "5M:1M"], "`--mac-band` must be LOW:HIGH MACs with LOW < HIGH"),
        ("supernet_ranking", ["--supernet-anneal-fraction", "1.5"],
         "`--supernet-anneal-fraction` must be a finite number in [0, 1], but got --supernet-anneal-fraction=1.5."),
        ("supernet_ranking", ["--anneal-fraction", "-0.1"], "`anneal_fraction` must be"),
        ("supernet_ranking", ["--score-calib-images", "1"],
         "`--score-calib-images` must be an integer >= 2, but got --score-calib-images=1."),
        ("twin_gap", ["--pairs", "0"], "`--pairs` must be an integer >= 1, but got pairs=0."),
        ("twin_gap", ["--epochs", "20,0"], "`--epochs` must be integers >= 1, but got epochs=20,0."),
        ("twin_gap", ["--lr", "-1"], "`lr` must be"),
        ("static_vs_dynamic", ["--dataset", "npz", "--data-root", "{missing}"], "npz file '{missing}' does not exist."),
        ("anneal_length", ["--dataset", "npz", "--data-root", "{missing}"], "npz file '{missing}' does not exist."),
        ("search_vs_baselines", ["--dataset", "npz", "--data-root", "{missing}", "--max-macs", "1M"],
         "npz file '{missing}' does not exist."),
    ],
)
def test_a_script_refuses_bad_input_in_one_line_and_writes_nothing(script, argv, message, tmp_path):
    import subprocess

    missing = str(tmp_path / "missing.npz")
    out = tmp_path / "out"
    argv = [a.format(missing=missing) for a in argv] + ["--out", str(out)]
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / f"{script}.py"), *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()  # one line, no traceback
    assert line.startswith(f"dynas: error: {message.format(missing=missing)}"), line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def _ranking_rows(folder: Path, scores: list[float], truth: list[float]) -> Path:
    folder.mkdir(parents=True)
    rows = [{"arch": f"a{i}", "kind": "static" if i % 2 else "dynamic", "macs": 1000 + i, "draw": -1,
             "supernet_top1": s, "score_seconds": 1.0, "standalone_top1": [t, t], "standalone_top1_mean": t,
             "standalone_seconds": [9.0, 9.0]} for i, (s, t) in enumerate(zip(scores, truth))]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_supernet_ensemble_ranks_by_the_mean_of_the_supernets_scores(tmp_path, capsys):
    script = _script("supernet_ensemble")
    truth = [1.0, 2.0, 3.0, 4.0]
    # Each alone misorders one pair; their mean orders all four as the truth does.
    a = _ranking_rows(tmp_path / "a", [1.0, 2.2, 2.1, 4.0], truth)
    b = _ranking_rows(tmp_path / "b", [2.0, 1.0, 3.0, 4.0], truth)
    assert script.main([str(a), str(b), "--out", str(tmp_path / "t.jsonl")]) == 0
    table = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    by = {"+".join(r["supernets"]): r for r in table}
    assert by["a"]["kendall_tau_supernet"] == pytest.approx(4 / 6) == by["b"]["kendall_tau_supernet"]
    assert by["a+b"]["kendall_tau_supernet"] == pytest.approx(1.0)
    assert by["a+b"]["seconds_per_scored_subnet"] == pytest.approx(2.0)  # both supernets score each subnet
    assert "| a + b | +1.00" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: [_ranking_rows(t / "a", [1, 2, 3], [1, 2, 3]), _ranking_rows(t / "b", [1, 2, 3], [1, 2, 4])],
         "has stand-alone top-1 4 for 'a2', but"),
        (lambda t: [_ranking_rows(t / "a", [1, 2, 3], [1, 2, 3]), _ranking_rows(t / "b", [1, 2], [1, 2])],
         "holds other subnets than"),
        (lambda t: [_ranking_rows(t / "a", [1, 2, 3], [1, 2, 3]), t / "none"], "has no results.jsonl"),
    ],
)
def test_supernet_ensemble_refuses_runs_of_another_truth(tmp_path, make, message):
    import subprocess

    folders = [str(f) for f in make(tmp_path)]
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / "supernet_ensemble.py"), *folders, "--out",
                           str(tmp_path / "t.jsonl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("dynas: error: ") and message in line, line
    assert not (tmp_path / "t.jsonl").exists()
