"""Many workers on one Optuna study, in a real PostgreSQL server and in a journal file (the
default storage); crashes, interrupts, resume.

CI (.ci/run) starts a throw-away server and exports DYNAS_TEST_POSTGRES_URL; locally run
``source .ci/postgres.sh && pg_start`` first, or the PostgreSQL cases skip.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from dynas.engines.storage import make_storage

ROOT = Path(__file__).resolve().parents[1]

# A tiny, fast search: 16x16 digits, a few optimizer steps per candidate.
TINY = [
    "--space", "mobile_cifar", "--dataset", "digits", "--input-size", "16", "--train-subset", "300",
    "--epochs", "2", "--max-steps-per-epoch", "3", "--batch-size", "32", "--max-macs", "50M",
    "--sampler", "random", "--pruner", "none", "--quiet", "--num-threads", "1", "--heartbeat-interval", "1", "--grace-period", "4",
]


@pytest.fixture(scope="module")
def postgres_url() -> str:
    url = os.environ.get("DYNAS_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("DYNAS_REQUIRE_POSTGRES"):
            pytest.fail("DYNAS_REQUIRE_POSTGRES is set but DYNAS_TEST_POSTGRES_URL is not")
        pytest.skip("no PostgreSQL server: source .ci/postgres.sh && pg_start")
    return url


@pytest.fixture(params=["postgresql", "journal"])
def storage_url(request, tmp_path) -> str:
    if request.param == "journal":
        return str(tmp_path / "study.log")
    return request.getfixturevalue("postgres_url")


def _worker(run_dir: Path, url: str, study: str, trials: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "run_search.py"), "worker", "--storage", url, "--study-name", study,
           "--run-dir", str(run_dir), "--trials", str(trials), *TINY, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


@functools.cache
def _storage(url: str):
    return make_storage(url, heartbeat_interval=None)


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=_storage(url))


def _table(run_dir: Path) -> pd.DataFrame:
    return pd.read_json(run_dir / "results.jsonl", lines=True)


def _wait_for(predicate, timeout: float = 120, poll: float = 0.2) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError("condition not reached in time")


_OPEN = """
import os, sys, time
from dynas.engines.storage import make_storage
go = sys.argv[1]
for round_, url in enumerate(sys.argv[2:]):
    print("ready", flush=True)
    while not os.path.exists(f"{go}{round_}"):  # start together: the race is in the first milliseconds
        time.sleep(0.002)
    make_storage(url, heartbeat_interval=None)
"""


def test_workers_opening_a_fresh_database_together_all_succeed(tmp_path, postgres_url):
    # Workers started together on an empty database race to create Optuna's tables and enum
    # types; the losers must retry, not fail (CI saw "type studydirection already exists").
    import sqlalchemy

    from dynas.engines.storage import _with_driver

    server = sqlalchemy.create_engine(_with_driver(postgres_url), isolation_level="AUTOCOMMIT")
    base, names = postgres_url.rsplit("/", 1)[0], [f"fresh_{uuid.uuid4().hex[:10]}" for _ in range(5)]
    try:
        with server.connect() as conn:
            for name in names:
                conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
        go = str(tmp_path / "go")
        procs = [subprocess.Popen([sys.executable, "-c", _OPEN, go, *(f"{base}/{n}" for n in names)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(6)]
        for round_ in range(len(names)):
            for proc in procs:
                assert proc.stdout.readline().strip() == "ready", proc.communicate()[0]
            Path(f"{go}{round_}").touch()
        outs = [proc.communicate(timeout=120)[0] for proc in procs]
        assert all(proc.returncode == 0 for proc in procs), "\n".join(outs)
    finally:
        with server.connect() as conn:
            for name in names:
                conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        server.dispose()


def test_three_workers_complete_exactly_n_trials(tmp_path, storage_url):
    name, n = f"w3-{uuid.uuid4().hex[:8]}", 7
    run_dir = tmp_path / "run"
    procs = [_worker(run_dir, storage_url, name, n) for _ in range(3)]
    for proc in procs:
        _finish(proc)
    study = _study(storage_url, name)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert sum(t.user_attrs.get("state") != "rejected" for t in finished) == n  # rejections do not count
    table = _table(run_dir)
    counted = table[table["state"].isin(["complete", "pruned", "rejected", "duplicate"])]
    # one row per finished trial: nothing lost, nothing written twice
    assert sorted(counted["trial"]) == sorted(t.number for t in finished)
    assert table["trial"].is_unique


def test_killed_worker_trial_is_failed_and_retried(tmp_path, storage_url):
    name, n = f"kill-{uuid.uuid4().hex[:8]}", 3
    run_dir = tmp_path / "run"
    # Long enough trials that the kill lands mid-training.
    victim = _worker(run_dir, storage_url, name, n, "--max-steps-per-epoch", "40", "--epochs", "3")
    _wait_for(lambda: _has_running(storage_url, name))
    time.sleep(1.0)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed = [t.number for t in _study(storage_url, name).get_trials(states=(TrialState.RUNNING,))]
    assert killed, "the worker was killed outside a trial"
    _finish(_worker(run_dir, storage_url, name, n))
    study = _study(storage_url, name)
    assert len(_counted(study)) == n
    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed[0]].state == TrialState.FAIL
    retried = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed[0]]
    assert retried and retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retried[0].params == trials[killed[0]].params


def _counted(study: optuna.Study) -> list:
    """Finished trials that count towards the requested number (budget rejections do not)."""
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    return [t for t in finished if t.user_attrs.get("state") != "rejected"]


def _has_running(url: str, name: str) -> bool:
    try:
        return bool(_study(url, name).get_trials(states=(TrialState.RUNNING,)))
    except KeyError:  # the study does not exist yet
        return False


def test_interrupt_then_rerun_does_not_rerun_finished_trials(tmp_path, storage_url):
    name, n = f"int-{uuid.uuid4().hex[:8]}", 4
    run_dir = tmp_path / "run"
    slow = ("--max-steps-per-epoch", "30", "--epochs", "3")
    proc = _worker(run_dir, storage_url, name, n, *slow)
    # Interrupt mid-training: a running trial that has reported its first epoch.
    _wait_for(lambda: _finished_count(storage_url, name) >= 1 and _running_trained(storage_url, name))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "rerun the same command to continue" in out
    before = {t.number: t.datetime_complete for t in _study(storage_url, name).get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))}
    table = _table(run_dir)
    assert "interrupted" in set(table["state"])
    _finish(_worker(run_dir, storage_url, name, n, *slow))  # the same command again
    study = _study(storage_url, name)
    after = {t.number: t.datetime_complete for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))}
    assert len(_counted(study)) == n
    assert all(after[k] == v for k, v in before.items())  # finished trials untouched
    rows = _table(run_dir)
    for number in before:  # and not trained again
        assert (rows["trial"] == number).sum() == 1
    interrupted = int(rows.loc[rows["state"] == "interrupted", "trial"].iloc[0])
    retried = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == interrupted]
    assert retried and retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)


def _running_trained(url: str, name: str) -> bool:
    return any(t.intermediate_values for t in _study(url, name).get_trials(states=(TrialState.RUNNING,)))


def _finished_count(url: str, name: str) -> int:
    try:
        return len(_study(url, name).get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
    except KeyError:
        return 0
