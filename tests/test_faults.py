"""Faults a run must survive (issue #14): full disks, torn last lines, corrupt files, leaked passwords."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from dynas.engines.storage import make_storage, redact_url, strip_password
from dynas.errors import DynasError
from dynas.results import ResultsTable, TrialRecord

optuna.logging.set_verbosity(optuna.logging.ERROR)


def _record(trial: int, history: int = 3) -> TrialRecord:
    return TrialRecord(
        trial=trial, engine="optuna", state="complete", arch=f"a{trial}", arch_json=f'{{"a": {trial}}}',
        macs=1000, params=10, dynamic_blocks=1, val_top1=50.0 + trial, val_top1_history=[1.0] * history,
    )


def _table(tmp_path: Path, rows: int = 2) -> ResultsTable:
    table = ResultsTable(tmp_path / "run")
    for trial in range(rows):
        table.append(_record(trial))
    return table


def _disk_full_after(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """``os.write`` writes ``budget`` more bytes, then fails as a full disk does."""
    real, left = os.write, [budget]

    def write(fd: int, data: bytes) -> int:
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = real(fd, bytes(data[: left[0]]))
        left[0] -= written
        return written

    monkeypatch.setattr(os, "write", write)


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.torn-*"))


# results.jsonl -------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", [b'{"trial": 2, "engine": "opt', b'{"trial": 2, "engi\n', b"\x00\x00\x00"])
def test_a_torn_last_row_is_cut_after_a_backup_and_the_next_row_parses(tmp_path, caplog, tail):
    table = _table(tmp_path)
    good = table.jsonl.read_bytes()
    table.jsonl.write_bytes(good + tail)
    assert [row["trial"] for row in table.records()] == [0, 1]
    assert "its last line was torn" in caplog.text and "results.jsonl" in caplog.text
    [backup] = _backups(table.jsonl)
    assert backup.read_bytes() == good + tail  # the file as it was, byte for byte
    assert table.jsonl.read_bytes() == good
    table.append(_record(2))
    assert [row["trial"] for row in ResultsTable(table.run_dir).records()] == [0, 1, 2]


def test_append_after_a_torn_row_does_not_glue_onto_it(tmp_path):
    table = _table(tmp_path)
    good = table.jsonl.read_bytes()
    table.jsonl.write_bytes(good + b'{"trial": 2, "eng')
    table.append(_record(3))  # no read in between
    assert [row["trial"] for row in table.records()] == [0, 1, 3]
    assert table.jsonl.read_bytes().startswith(good) and len(_backups(table.jsonl)) == 1


def test_a_complete_last_row_without_its_newline_is_kept(tmp_path, caplog):
    table = _table(tmp_path)
    table.jsonl.write_bytes(table.jsonl.read_bytes().rstrip(b"\n"))
    assert [row["trial"] for row in table.records()] == [0, 1]
    assert table.jsonl.read_bytes().endswith(b"}\n") and "lacked its newline (a crash mid-write): added it" in caplog.text


@pytest.mark.parametrize(
    "bad,match",
    [
        (b"GARBAGE\n", r"line 2 is not valid JSON \(Expecting value\): 'GARBAGE'"),
        (b'[1, 2]\n', r"line 2 is a JSON list, not an object: '\[1, 2\]'"),
        (b'{"trial": 9}\n', r"line 2 misses the keys \['engine', 'state', 'arch', 'arch_json', 'macs'"),
    ],
)
def test_a_bad_line_in_the_middle_is_refused_and_the_file_left_alone(tmp_path, bad, match):
    table = _table(tmp_path)
    first, second = table.jsonl.read_bytes().splitlines(keepends=True)
    table.jsonl.write_bytes(first + bad + second)
    before = table.jsonl.read_bytes()
    pattern = rf"every line of '.*run/results.jsonl' must be one JSON object, but {match}"
    with pytest.raises(DynasError, match=pattern):
        table.records()
    with pytest.raises(DynasError, match=pattern):
        table.append(_record(2))
    assert table.jsonl.read_bytes() == before and _backups(table.jsonl) == []


def test_a_last_row_that_is_json_but_not_a_row_is_refused(tmp_path):
    table = _table(tmp_path)
    table.jsonl.write_bytes(table.jsonl.read_bytes() + b'{"trial": 2}\n')
    with pytest.raises(DynasError, match=r"line 3 misses the keys \['engine'"):
        table.frame()


@pytest.mark.parametrize("budget", [0, 100])
def test_a_full_disk_while_appending_leaves_the_rows_before_intact(tmp_path, monkeypatch, budget):
    table = _table(tmp_path)
    before = table.jsonl.read_bytes()
    with monkeypatch.context() as patch:
        _disk_full_after(patch, budget)  # 100: half a row reaches the disk, then it is full
        with pytest.raises(DynasError, match=r"cannot write '.*results.jsonl': No space left on device; what it held"):
            table.append(_record(2))
    assert table.jsonl.read_bytes() == before
    table.append(_record(3))
    assert [row["trial"] for row in table.records()] == [0, 1, 3]


def test_a_full_disk_while_writing_the_csv_keeps_the_row_and_the_old_csv(tmp_path, monkeypatch):
    table = _table(tmp_path)
    csv = table.csv.read_bytes()

    def to_csv(self, path, **kwargs):
        Path(path).write_bytes(b"trial,eng")  # half written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    with pytest.raises(DynasError, match=r"cannot write '.*results.csv': No space left on device"):
        table.append(_record(2))
    assert table.csv.read_bytes() == csv and list(table.run_dir.glob("*.tmp")) == []
    assert [row["trial"] for row in table.records()] == [0, 1, 2]


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 KiB tmpfs (needs root and a kernel that lets this container mount)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_never_leaves_a_half_row(tiny_disk):
    table = ResultsTable(tiny_disk / "run")
    appended = 0
    with pytest.raises(DynasError, match=r"cannot write '.*results\.(jsonl|csv)': No space left on device") as err:
        for trial in range(1000):
            table.append(_record(trial, history=100))
            appended += 1
    kept = table.records()  # the CSV failing after its row reached results.jsonl keeps that row
    assert len(kept) == appended + ("results.csv" in str(err.value))
    assert [row["trial"] for row in kept] == list(range(len(kept)))
    assert table.jsonl.read_bytes().endswith(b"}\n")


# study.log (Optuna's journal) ----------------------------------------------------------------


def _journal(tmp_path: Path, trials: int = 3) -> Path:
    path = tmp_path / "study.log"
    study = optuna.create_study(storage=make_storage(str(path)), study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=trials)
    return path


def test_a_torn_journal_is_cut_after_a_backup_and_the_study_goes_on(tmp_path, caplog):
    path = _journal(tmp_path)
    torn = path.read_bytes()[:-20]  # the last entry (trial 2 finishing) lost its end
    path.write_bytes(torn)
    study = optuna.load_study(storage=make_storage(str(path)), study_name="s")
    assert "study.log: its last line was torn" in caplog.text
    [backup] = _backups(path)
    assert backup.read_bytes() == torn
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)  # appends after the cut
    states = [t.state for t in optuna.load_study(storage=make_storage(str(path)), study_name="s").trials]
    assert states == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING, TrialState.COMPLETE]


def test_a_journal_torn_while_creating_the_study_starts_afresh(tmp_path):
    path = tmp_path / "study.log"
    path.write_bytes(b'{"op_code":0,"worker_id":"ab')
    optuna.create_study(storage=make_storage(str(path)), study_name="s")
    assert [b.read_bytes() for b in _backups(path)] == [b'{"op_code":0,"worker_id":"ab']
    assert optuna.load_study(storage=make_storage(str(path)), study_name="s").trials == []


@pytest.mark.parametrize(
    "bad,match",
    [(b"GARBAGE\n", r"line 2 is not valid JSON"), (b'{"x": 1}\n', r"line 2 is not an Optuna journal entry")],
)
def test_a_bad_journal_line_in_the_middle_is_refused_and_the_file_left_alone(tmp_path, bad, match):
    path = _journal(tmp_path, trials=1)
    first, *rest = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(first + bad + b"".join(rest))
    before = path.read_bytes()
    with pytest.raises(DynasError, match=rf"every line of '.*study.log' must be one JSON object, but {match}"):
        make_storage(str(path))
    assert path.read_bytes() == before and _backups(path) == []


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask() outside optimize()
@pytest.mark.parametrize("budget", [0, 30])
def test_a_full_disk_while_optuna_appends_leaves_the_journal_intact(tmp_path, monkeypatch, budget):
    path = _journal(tmp_path, trials=1)
    before = path.read_bytes()
    study = optuna.load_study(storage=make_storage(str(path)), study_name="s")
    with monkeypatch.context() as patch:
        _disk_full_after(patch, budget)
        with pytest.raises(DynasError, match=r"cannot write '.*study.log': No space left on device"):
            study.ask()
    assert path.read_bytes() == before and not Path(f"{path}.lock").exists()
    study = optuna.load_study(storage=make_storage(str(path)), study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2


def test_journal_entries_are_written_as_optuna_writes_them(tmp_path):
    path = _journal(tmp_path, trials=1)
    lines = path.read_bytes().splitlines()
    assert lines and all(json.dumps(json.loads(line), separators=(",", ":")).encode() == line for line in lines)


# passwords -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,redacted,stripped",
    [
        ("postgresql://u:secret@host/db", "postgresql://u:***@host/db", "postgresql://u@host/db"),
        ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db", "postgresql://u@host/db"),
        ("postgresql://u:p@ss@host:5432/db", "postgresql://u:***@host:5432/db", "postgresql://u@host:5432/db"),
        ("postgresql://u:p:s/s?x@host/db", "postgresql://u:***@host/db", "postgresql://u@host/db"),
        ("mysql+pymysql://u:p@/ss@host/db", "mysql+pymysql://u:***@host/db", "mysql+pymysql://u@host/db"),
        ("postgresql://u:p%40ss@host/db", "postgresql://u:***@host/db", "postgresql://u@host/db"),
        ("postgresql://u:@host/db", "postgresql://u:***@host/db", "postgresql://u@host/db"),
        ("postgresql://:pw@host/db", "postgresql://:***@host/db", "postgresql://@host/db"),
        ("postgresql://u:p@ss@host:port/db", "postgresql://u:***@host:port/db", "postgresql://u@host:port/db"),
        ("postgresql://u@host/db", "postgresql://u@host/db", "postgresql://u@host/db"),
        ("sqlite:///study.db", "sqlite:///study.db", "sqlite:///study.db"),
        ("sqlite:////home/me@work/a b.db", "sqlite:////home/me@work/a b.db", "sqlite:////home/me@work/a b.db"),
        ("runs/default/study.log", "runs/default/study.log", "runs/default/study.log"),
    ],
)
def test_passwords_are_masked_and_stripped(url, redacted, stripped):
    assert redact_url(url) == redacted
    assert strip_password(url) == stripped


def test_a_password_with_an_at_sign_stays_out_of_the_error(tmp_path):
    with pytest.raises(DynasError, match=r"cannot open storage 'postgresql://u:\*\*\*@127.0.0.1:1/db'") as err:
        make_storage("postgresql://u:p@ss@127.0.0.1:1/db")
    assert "p@ss" not in str(err.value) and "ss@" not in str(err.value)


def test_a_password_with_an_at_sign_reaches_the_database_whole(monkeypatch):
    import sqlalchemy

    given = []
    monkeypatch.setattr(optuna.storages, "RDBStorage", lambda url, **kwargs: given.append(url))
    make_storage("postgresql+psycopg2://u:p@ss@host:5432/db")
    make_storage("postgresql+psycopg2://u:secret@host/db")
    assert given == ["postgresql+psycopg2://u:p%40ss@host:5432/db", "postgresql+psycopg2://u:secret@host/db"]
    parsed = sqlalchemy.engine.make_url(given[0])
    assert (parsed.username, parsed.password, parsed.host, parsed.port) == ("u", "p@ss", "host", 5432)
