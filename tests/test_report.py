from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

import optuna
import pytest
import yaml

from dynas import report
from dynas.errors import DynasError
from dynas.report import block_shares, entropy_table, optuna_plots, plot_blocks, plot_results, read_run, write_report
from dynas.results import ResultsTable, TrialRecord
from dynas.spec import ArchSpec, BlockSpec, StageSpec

FIGURES = ("results.png", "blocks.png", "entropy.png")


@pytest.fixture
def real_png():
    """Render figures for real: tests that look at the files ask for this."""


@pytest.fixture(autouse=True)
def _quick_png(request, monkeypatch):
    """Figures are drawn but not rendered (rendering is most of a report's time) unless a test asks for real_png."""
    if "real_png" not in request.fixturenames:
        monkeypatch.setattr(report, "_png", lambda fig: b"\x89PNG not rendered")


def _arch(kernels: tuple[int, ...]) -> ArchSpec:
    """Two stages of two blocks, block i with K = kernels[i] (1 = static)."""
    blocks = [BlockSpec(3, 4.0, c, stride=s, num_kernels=k) for (c, s), k in zip([(16, 1), (16, 1), (24, 2), (24, 1)], kernels)]
    stages = (StageSpec(tuple(blocks[:2])), StageSpec(tuple(blocks[2:])))
    return ArchSpec(stem_channels=8, stages=stages, head_channels=64, num_classes=10, input_size=16)


def _record(trial, kernels=(1, 1, 1, 1), top1=70.0, macs=1_000_000, state="complete", **fields) -> TrialRecord:
    arch = _arch(kernels)
    trained = state in ("complete", "pruned")
    history = [top1 - 10.0, top1] if trained else []
    entropy = {f"stages.{i // 2}.{i % 2}.expand.conv": 0.9 * math.log(k) for i, k in enumerate(kernels) if k > 1}
    values = dict(
        trial=trial, engine="optuna", state=state, arch=arch.to_str(), arch_json=json.dumps(arch.to_dict(), sort_keys=True),
        macs=macs, params=200_000, dynamic_blocks=sum(k > 1 for k in kernels), val_top1=history[-1] if trained else math.nan,
        tau_start=30.0, anneal_fraction=0.1, epochs=len(history), train_seconds=12.5, val_top1_history=history,
        attention_entropy=entropy if trained else {},
    )
    return TrialRecord(**{**values, **fields})


def _run(tmp_path, records, name="run", origins=None, **settings):
    """A run directory holding ``records`` (with an ``origin`` per row where given) and a config.yaml."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    table = ResultsTable(run_dir)
    for i, record in enumerate(records):
        if origins is None:
            table.append(record)
        else:
            with table.jsonl.open("a", encoding="utf-8") as f:
                f.write(json.dumps({**asdict(record), "origin": origins[i]}) + "\n")
    config = {"space": "tiny", "dataset": "digits", "input_size": 16, "max_macs": 2_000_000, "engine": "optuna",
              "sampler": "tpe", "pruner": "median", "objective": "top1", "trials": 5, **settings}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return run_dir


def _trials_in(section: str) -> list[str]:
    """The first column of the markdown table in ``section``."""
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    return [row.split("|")[1].strip() for row in rows]


def _sample(tmp_path, **settings):
    """Static 70, mixed 80 (best), all-dynamic 75, a pruned mixed one, a rejected one, and a static 90 over budget."""
    records = [
        _record(0, (1, 1, 1, 1), 70.0, 1_200_000),
        _record(1, (1, 4, 1, 2), 80.0, 1_500_000),
        _record(2, (4, 4, 4, 4), 75.0, 1_900_000),
        _record(3, (1, 1, 4, 1), 60.0, 1_300_000, state="pruned"),
        _record(4, (4, 4, 4, 4), macs=5_000_000, state="rejected", reason="macs 5M > max 2M"),
        _record(5, (1, 1, 1, 1), 90.0, 3_000_000),
    ]
    return _run(tmp_path, records, **settings)


def test_report_opens_with_settings_counts_and_the_gap(tmp_path):
    text = write_report(_sample(tmp_path, engine="nni", strategy="evolution"))
    head = text.split("## ")[0]
    for part in ("space `tiny`", "dataset `digits`", "input 16x16", "budget <= 2.00M MACs", "engine nni (strategy evolution)",
                 "objective top1", "5 trials asked", "Trials by state: complete 4, pruned 1, rejected 1"):
        assert part in head
    # The static 90% is over the budget: the comparison is at <= budget.
    assert "searched 80.00% (trial 1, 2/4 dynamic, 1.50M MACs, 0.200M params)" in head
    assert "all-static 70.00% (trial 0, 0/4 dynamic, 1.20M MACs" in head
    assert "all-dynamic 75.00% (trial 2, 4/4 dynamic, 1.90M MACs" in head
    assert "searched - all-static +10.00 points, searched - all-dynamic +5.00 points" in head
    assert "## Optuna" not in text  # an NNI run


def test_kinds_table_and_the_ranked_tables(tmp_path):
    text = write_report(_sample(tmp_path), top=2)
    kinds = text.split("## Static, mixed and all-dynamic")[1].split("##")[0]
    assert "| static      | 2         | 1                         | 70.00" in kinds  # trained 2, 1 within budget
    assert "| mixed       | 2         | 1                         | 80.00" in kinds
    assert _trials_in(text.split("## Top 2 by validation top-1")[1].split("##")[0]) == ["5", "1"]
    assert _trials_in(text.split("## Pareto front")[1]) == ["5", "1", "0"]


def test_baselines_count_as_all_static_or_dynamic_but_not_as_searched(tmp_path):
    records = [_record(0, (1, 4, 1, 1), 72.0), _record(1, (1, 1, 1, 1), 78.0), _record(2, (2, 2, 2, 2), 81.0)]
    run_dir = _run(tmp_path, records, origins=["search", "baseline-static", "baseline-dynamic"])
    text = write_report(run_dir)
    assert "by origin: search 1, baseline-static 1, baseline-dynamic 1" in text
    assert "searched 72.00% (trial 0" in text and "searched - all-static -6.00 points, searched - all-dynamic -9.00 points" in text


def test_over_budget_best_is_shown_apart(tmp_path):
    run_dir = _run(tmp_path, [_record(0, (1, 4, 1, 1), 72.0), _record(1, (4, 4, 4, 4), 85.0, macs=2_500_000)])
    text = write_report(run_dir)
    assert "all-dynamic none within budget, 85.00% (trial 1, 4/4 dynamic, 2.50M MACs" in text
    assert "searched - all-dynamic n/a" in text


def test_figures_are_written_and_linked(tmp_path, real_png):
    run_dir = _sample(tmp_path)
    text = write_report(run_dir)
    for name in FIGURES:
        assert (run_dir / name).read_bytes().startswith(b"\x89PNG") and (run_dir / name).stat().st_size > 1000
        assert f"![{name}]({name})" in text
    assert (run_dir / "report.md").read_text(encoding="utf-8") == text + "\n"


def test_overview_plots_every_trained_trial_and_pruned_at_their_last_epoch(tmp_path):
    run_dir = _sample(tmp_path)
    (run_dir / "results.jsonl").write_text(
        (run_dir / "results.jsonl").read_text().replace('"val_top1": 60.0', '"val_top1": NaN'), encoding="utf-8"
    )
    points = plot_results(read_run(run_dir)).data.set_index("trial")
    assert sorted(points.index) == [0, 1, 2, 3, 5]  # not the rejected one
    assert points.loc[3, "shown_top1"] == 60.0 and points.loc[3, "state"] == "pruned"  # from its history
    assert points["kind"].to_dict() == {0: "static", 1: "mixed", 2: "all-dynamic", 3: "mixed", 5: "static"}


def test_block_shares_compare_the_best_quarter_with_the_rest(tmp_path):
    records = [_record(i, (1, k, 1, 1), top1) for i, (k, top1) in enumerate([(4, 90), (2, 60), (1, 61), (1, 62), (4, 63), (1, 64), (2, 65), (4, 66)])]
    run = read_run(_run(tmp_path, records))
    shares = block_shares(run).set_index(["block", "group", "num_kernels"])
    assert shares.loc[("s1_b2", "best quarter", 4), "count"] == 2  # trials 0 (90%) and 7 (66%)
    assert shares.loc[("s1_b2", "rest", 2), "share"] == pytest.approx(2 / 6)
    assert shares.loc[("s1_b1", "rest", 1), "share"] == 1.0
    text = write_report(run.run_dir)
    assert "Dynamic more often in the best quarter than in the rest: s1_b2 (2/2 vs 3/6)." in text
    assert "Dynamic less often in the best quarter than in the rest: no block." in text
    assert plot_blocks(run).name == "blocks.png"


def test_entropy_of_the_best_trial_against_ln_k(tmp_path):
    record = _record(0, (1, 4, 1, 2), 80.0)
    record.attention_entropy = {"stages.0.1.expand.conv": 1.2, "stages.1.1.project.conv": 0.05}
    table, which = entropy_table(read_run(_run(tmp_path, [record, _record(1, (4, 4, 4, 4), 70.0)])))
    assert which == "trial 0, the best"
    assert table["num_kernels"].tolist() == [4, 2]
    assert table["uniform_nats"].tolist() == pytest.approx([math.log(4), math.log(2)])
    text = write_report(tmp_path / "run")
    section = text.split("## Attention entropy of trial 0, the best")[1].split("##")[0]
    assert "| stages.1.1.project.conv | 2   | 0.050            | 0.693          | collapsed |" in section


def test_entropy_falls_back_to_the_best_dynamic_trial(tmp_path):
    run_dir = _run(tmp_path, [_record(0, (1, 1, 1, 1), 80.0), _record(1, (1, 4, 1, 1), 70.0)])
    assert "## Attention entropy of trial 1, the best with dynamic layers (the best trial, 0, is all-static)" in write_report(run_dir)


def test_collapse_warning_names_the_collapsed_trials(tmp_path):
    healthy, collapsed = _record(0, (1, 4, 1, 1)), _record(1, (1, 4, 1, 4))
    healthy.attention_entropy = {"a.conv": 1.2, "b.conv": 0.9}
    collapsed.attention_entropy = {"a.conv": 1.3, "b.conv": 0.02}
    text = write_report(_run(tmp_path, [healthy, collapsed, _record(2)]))
    assert "in 1 of 2 trained dynamic candidates" in text and "trials 1)" in text


def test_no_collapse_warning_when_attention_is_spread(tmp_path):
    assert "collapsed" not in write_report(_run(tmp_path, [_record(0, (1, 4, 1, 1))]))


def _study(run_dir, values, rejected=()):
    """A journal study named after the run, one float parameter, ``values`` told in order."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / "study.log")))
    study = optuna.create_study(study_name=run_dir.name, storage=storage, direction="maximize")
    for number, value in enumerate(values):
        trial = study.ask({"tau_start": optuna.distributions.FloatDistribution(1, 50)})
        trial.set_user_attr("state", "rejected" if number in rejected else "complete")
        study.tell(trial, value)


def test_optuna_history_and_importance_without_rejected_trials(tmp_path):
    run_dir = _sample(tmp_path)
    _study(run_dir, [70.0, 0.0, 80.0, 75.0], rejected={1})
    plots, lines = optuna_plots(read_run(run_dir))
    assert lines == [] and [p.name for p in plots] == ["optuna_history.png", "optuna_importance.png"]
    assert plots[0].data.to_dict("list") == {"trial": [0, 2, 3], "value": [70.0, 80.0, 75.0]}  # not the rejected one
    text = write_report(run_dir)
    assert "![optuna_history.png](optuna_history.png)\n\n![optuna_importance.png](optuna_importance.png)" in text


def test_optuna_plots_of_a_multi_objective_study_use_val_top1(tmp_path):
    run_dir = _sample(tmp_path, objective="top1-macs")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / "study.log")))
    study = optuna.create_study(study_name="run", storage=storage, directions=["maximize", "minimize"])
    for top1 in (70.0, 80.0, 75.0):
        trial = study.ask({"tau_start": optuna.distributions.FloatDistribution(1, 50)})
        study.tell(trial, [top1, 1e6])
    plots, lines = optuna_plots(read_run(run_dir))
    assert lines == [] and len(plots) == 2 and plots[1].data["value"].tolist() == [70.0, 80.0, 75.0]


def test_optuna_figures_render(tmp_path, real_png):
    run_dir = _sample(tmp_path)
    _study(run_dir, [70.0, 80.0, 75.0])
    plots, _ = optuna_plots(read_run(run_dir))
    assert all(p.png.startswith(b"\x89PNG") and len(p.png) > 1000 for p in plots) and len(plots) == 2


def test_optuna_importance_of_one_trial_is_a_line(tmp_path):
    run_dir = _sample(tmp_path, study_name="other")  # the only study in the file is used
    _study(run_dir, [70.0])
    text = write_report(run_dir)
    assert "![optuna_history.png](optuna_history.png)" in text
    assert "(optuna_importance.png skipped: " in text and not (run_dir / "optuna_importance.png").exists()


def test_optuna_run_without_a_study_file_says_so(tmp_path):
    run_dir = _sample(tmp_path)
    assert f"Optuna plots skipped: no study file '{run_dir / 'study.log'}'." in write_report(run_dir)
    assert not (run_dir / "study.log").exists()  # not created by looking


def test_not_a_run_directory(tmp_path):
    with pytest.raises(DynasError, match=r"is not a dynas run directory \(no results.jsonl in it\)\."):
        write_report(tmp_path)


def test_run_with_no_completed_trial(tmp_path):
    run_dir = _run(tmp_path, [_record(0, state="rejected"), _record(1, state="failed", reason="NaN loss")])
    text = write_report(run_dir)
    assert "Trials by state: rejected 1, failed 1" in text
    assert "searched none; all-static none; all-dynamic none" in text
    assert "(results.png skipped: no trained trial has MACs and a val top-1 to plot.)" in text
    assert "(blocks.png skipped: the per-block picture needs at least 2 completed trials" in text
    assert "No entropies to show: no completed trial." in text and "(no completed trials)" in text
    assert not any((run_dir / name).exists() for name in FIGURES)


def test_run_with_only_pruned_trials(tmp_path):
    run_dir = _run(tmp_path, [_record(0, (1, 4, 1, 1), 50.0, state="pruned"), _record(1, top1=40.0, state="pruned")])
    text = write_report(run_dir)
    assert "Trials by state: pruned 2" in text and "![results.png](results.png)" in text
    assert len(plot_results(read_run(run_dir)).data) == 2


def test_empty_results_file(tmp_path):
    run_dir = _run(tmp_path, [])
    (run_dir / "results.jsonl").write_text("", encoding="utf-8")
    assert "Trials by state: none (results.jsonl has no rows)" in write_report(run_dir)


def test_bad_values_are_listed_and_left_out(tmp_path, real_png):
    run_dir = _sample(tmp_path)
    lines = (run_dir / "results.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    rows[0]["macs"] = "1.2M"  # a string where a number belongs
    rows[2]["val_top1"] = float("nan")  # a completed trial without accuracy
    rows[1]["attention_entropy"] = {"stages.0.1.expand.conv": "high"}
    rows[3]["arch"], rows[3]["arch_json"] = "garbage", "{"
    text = "\n".join([json.dumps(rows[0]), "{not json", "[1, 2]", *map(json.dumps, rows[1:])]) + "\n"
    (run_dir / "results.jsonl").write_text(text, encoding="utf-8")
    report = write_report(run_dir)
    problems = report.split("**Data problems**")[1].split("##")[0]
    assert "line 2 of results.jsonl is not a JSON row" in problems and "line 3 of results.jsonl" in problems
    assert "`macs` is not a finite number in 1 row(s) (trial 0: '1.2M'); read as missing." in problems
    assert "trials 0, 2 completed without a readable val_top1 or macs" in problems
    assert "the attention entropies of trial 1 are not numbers per layer" in problems
    assert "the arch of trial 3 cannot be read" in problems
    assert "searched 90.00% (trial 5" not in report and "searched 80.00% (trial 1, 2/4 dynamic" in report
    assert "all-static none within budget, 90.00% (trial 5" in report  # trial 0 has no MACs any more
    assert (run_dir / "results.png").stat().st_size > 1000


def test_damaged_config_and_budget(tmp_path):
    run_dir = _sample(tmp_path, max_macs="lots")
    assert "config.yaml: `max_macs` = 'lots' is not a count such as 5M" in write_report(run_dir)
    (run_dir / "config.yaml").write_text("space: [unclosed", encoding="utf-8")
    text = write_report(run_dir)
    assert "config.yaml could not be read" in text and "Settings unknown" in text and "Optuna plots skipped" in text


def test_budget_given_with_a_suffix(tmp_path):
    assert "**Best at <= 1.60M MACs:** searched 80.00%" in write_report(_sample(tmp_path, max_macs="1.6M"))


def test_figure_not_drawn_this_time_is_removed(tmp_path):
    run_dir = _sample(tmp_path)
    write_report(run_dir)
    rows = [r for r in ResultsTable(run_dir).records() if r["trial"] == 1]
    (run_dir / "results.jsonl").write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    write_report(run_dir)
    assert not (run_dir / "blocks.png").exists() and (run_dir / "results.png").exists()


def test_read_only_run_directory_prints_the_report(tmp_path):
    run_dir = _sample(tmp_path)
    run_dir.chmod(0o555)
    try:
        if os.access(run_dir, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable")
        text = write_report(run_dir)
    finally:
        run_dir.chmod(0o755)
    assert "searched - all-static +10.00 points" in text
    assert f"Could not write report.md and the figures into {str(run_dir)!r}" in text.splitlines()[-1]
    assert "![" not in text and "(results.png not written)" in text
    assert not (run_dir / "report.md").exists() and not (run_dir / "results.png").exists()


def test_unwritable_run_directory_prints_the_report(tmp_path, monkeypatch):
    """As the read-only test, for any user (root writes into read-only folders)."""
    run_dir = _sample(tmp_path)

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(report, "_write_atomic", refuse)
    text = write_report(run_dir)
    assert text.splitlines()[-1].startswith(f"Could not write report.md and the figures into {str(run_dir)!r} ([Errno 13] Permission denied")
    assert "![" not in text and "(blocks.png not written)" in text and "searched - all-static +10.00 points" in text
    assert not (run_dir / "report.md").exists()
