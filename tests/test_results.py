from __future__ import annotations

import math

import pandas as pd
import pytest

from dynas.results import COLUMNS, ResultsTable, TrialRecord, pareto_front


def _record(trial, state="complete", macs=1_000_000, top1=50.0, arch="a", tau=30.0):
    return TrialRecord(
        trial=trial, engine="optuna", state=state, arch=arch, arch_json=f'{{"{arch}": 1}}',
        macs=macs, params=10, dynamic_blocks=1, val_top1=top1, tau_start=tau, anneal_fraction=0.1,
    )


def test_append_writes_jsonl_and_csv(tmp_path):
    table = ResultsTable(tmp_path / "run")
    table.append(_record(0))
    table.append(_record(1, state="rejected", top1=math.nan))
    frame = table.frame()
    assert list(frame.columns) == [*COLUMNS, "min_attention_entropy"]
    assert frame["trial"].tolist() == [0, 1]
    csv = pd.read_csv(table.csv)
    assert csv["state"].tolist() == ["complete", "rejected"]
    assert ResultsTable(tmp_path / "run").frame().shape == frame.shape  # survives a new process


def test_find_trained_matches_arch_and_temperature(tmp_path):
    table = ResultsTable(tmp_path)
    table.append(_record(0, state="pruned", arch="x"))
    table.append(_record(1, arch="x", tau=30.0))
    assert table.find_trained('{"x": 1}', 30.0, 0.1)["trial"] == 1
    assert table.find_trained('{"x": 1}', 10.0, 0.1) is None
    assert table.find_trained('{"y": 1}', 30.0, 0.1) is None


def test_bad_state():
    with pytest.raises(ValueError, match=r"`state` must be one of .* but got state='done'"):
        _record(0, state="done")


def test_pareto_front():
    frame = pd.DataFrame(
        [_record(0, macs=1, top1=50).__dict__, _record(1, macs=2, top1=60).__dict__,
         _record(2, macs=3, top1=55).__dict__, _record(3, macs=1, top1=40).__dict__,
         _record(4, state="rejected", macs=0, top1=99).__dict__]
    )
    assert pareto_front(frame)["trial"].tolist() == [1, 0]


def test_min_attention_entropy(tmp_path):
    table = ResultsTable(tmp_path / "run")
    healthy, collapsed = _record(0), _record(1, arch="b")
    healthy.attention_entropy = {"a.conv": 1.2, "b.conv": 0.9}
    collapsed.attention_entropy = {"a.conv": 1.3, "b.conv": 0.02}
    for record in (healthy, collapsed, _record(2, arch="static")):
        table.append(record)
    frame = table.frame()
    assert frame["min_attention_entropy"].tolist()[:2] == [0.9, 0.02]
    assert math.isnan(frame["min_attention_entropy"].iloc[2])
    assert pd.read_csv(table.csv)["min_attention_entropy"].tolist()[:2] == [0.9, 0.02]


def test_pareto_front_of_a_run_without_completed_trials(tmp_path):
    table = ResultsTable(tmp_path / "run")
    record = _record(0)
    record.state = "pruned"
    table.append(record)
    assert pareto_front(table.frame()).empty
