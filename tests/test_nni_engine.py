"""The NNI engine: label mapping, inactive-choice dedup, budget gate, table, reruns, loopback."""

from __future__ import annotations

import json
import math
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("nni")

from dynas.budget import Budget  # noqa: E402
from dynas.cost import closed_form_macs  # noqa: E402
from dynas.data import load_data  # noqa: E402
from dynas.errors import DynasError  # noqa: E402
from dynas.engines.evaluate import CandidateEvaluator  # noqa: E402
from dynas.engines.nni_engine import (  # noqa: E402
    STRATEGIES,
    DynasModelSpace,
    _bind_node_to,
    make_strategy,
    nni_choices,
    run_nni_search,
)
from dynas.results import ResultsTable  # noqa: E402
from dynas.spec import ArchSpec, BlockSpec, StageSpec  # noqa: E402
from dynas.training import TrainConfig  # noqa: E402
from dynas.spaces import get_space, list_spaces  # noqa: E402
from dynas.spaces import Candidate, Choice, SearchSpace  # noqa: E402

INPUT_SIZE = 16
NUM_CLASSES = 10


class TinySpace(SearchSpace):
    """36 samples, 24 distinct candidates of one block: small enough to train in a second, and to
    walk as a grid; ``num_kernels`` is inactive for static blocks, as in the mobile spaces."""

    name = "tiny_test"

    def choices(self) -> list[Choice]:
        return [
            Choice("kernel", (3, 5, 7)),
            Choice("dynamic", (False, True)),
            Choice("num_kernels", (2, 4, 8), depends_on=("dynamic",)),
            Choice("width", (8, 32)),
        ]

    def is_active(self, choice: Choice, params) -> bool:
        return choice.label != "num_kernels" or params.get("dynamic") is True

    def make_candidate(self, params) -> Candidate:
        block = BlockSpec(params["kernel"], 2, params["width"], 2, num_kernels=params.get("num_kernels", 1))
        arch = ArchSpec(8, (StageSpec((block,)),), 32, num_classes=NUM_CLASSES, input_size=INPUT_SIZE)
        return Candidate(arch, tau_start=30.0, anneal_fraction=0.1, params=params)

    def smallest(self) -> ArchSpec:
        return self.decode({"kernel": 3, "dynamic": False, "width": 8}).arch

    def largest(self) -> ArchSpec:
        return self.decode({"kernel": 7, "dynamic": True, "num_kernels": 8, "width": 32}).arch


@pytest.fixture(scope="module")
def data():
    return load_data("digits", input_size=INPUT_SIZE, train_subset=64, val_fraction=0.05, seed=0)


def _space(name: str = "mobile_cifar"):
    return get_space(name, input_size=INPUT_SIZE, num_classes=NUM_CLASSES)


def _evaluator(data, run_dir: Path, space) -> CandidateEvaluator:
    # A budget between the smallest and the largest architecture: some samples must be rejected.
    low, high = closed_form_macs(space.smallest()), closed_form_macs(space.largest())
    budget = Budget(max_macs=math.sqrt(low * high))
    config = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=1, device="cpu", quiet=True)
    return CandidateEvaluator(budget, data, config, ResultsTable(run_dir), keep_weights=0)


def _random_sample(space, rng: random.Random) -> dict:
    return {c.label: rng.choice(list(c.values)) for c in space.choices()}


@pytest.mark.parametrize("name", list_spaces())
def test_nni_labels_are_the_space_labels(name):
    space = _space(name)
    nni_space = DynasModelSpace(nni_choices(space)).simplify()
    assert list(nni_space) == [c.label for c in space.choices()]
    for choice in space.choices():
        assert list(nni_space[choice.label].values) == list(choice.values)


@pytest.mark.parametrize("name", list_spaces())
def test_samples_differing_only_in_inactive_choices_decode_equal(name):
    space = _space(name)
    if not any(c.depends_on for c in space.choices()):
        pytest.skip(f"space {name!r} has no conditional choices")
    rng = random.Random(0)
    flipped = 0
    for _ in range(50):
        params = _random_sample(space, rng)
        base = space.decode(params)
        for choice in space.choices():
            if space.is_active(choice, params) or len(choice.values) < 2:
                continue
            other = next(v for v in choice.values if v != params[choice.label])
            twin = space.decode({**params, choice.label: other})
            assert twin.arch == base.arch
            assert twin.arch.to_dict() == base.arch.to_dict()
            assert (twin.tau_start, twin.anneal_fraction) == (base.tau_start, base.anneal_fraction)
            flipped += 1
    assert flipped > 0, "no inactive choice was ever found to flip"


def test_unknown_strategy_names_the_valid_ones():
    with pytest.raises(DynasError, match=r"unknown strategy 'evolutoin'; choose one of random, evolution, tpe, grid\..*'evolution'"):
        make_strategy("evolutoin", _space(), n_trials=4, seed=0)


def test_unknown_execution_and_bad_trials(data, tmp_path):
    space = _space()
    evaluator = _evaluator(data, tmp_path, space)
    with pytest.raises(DynasError, match=r"unknown execution 'sequental'.*'sequential'"):
        run_nni_search(space, evaluator, n_trials=1, execution="sequental")
    with pytest.raises(DynasError, match=r"`trials` must be an integer >= 1, but got trials=0"):
        run_nni_search(space, evaluator, n_trials=0)
    assert not evaluator.results.jsonl.exists()


def test_grid_refuses_a_space_too_large_to_walk():
    space = _space()
    size = math.prod(len(c.values) for c in space.choices())
    if size <= 10_000:
        pytest.skip("space small enough for a grid")
    with pytest.raises(DynasError, match=r"grid strategy needs a space of at most 10000 points"):
        make_strategy("grid", space, n_trials=4, seed=0)


def _check_run(frame, evaluator: CandidateEvaluator, n_trials: int, first_trial: int) -> None:
    """The rows of one run: numbered on from the table, none trained over budget, counters agree.

    Rejections cost no training, so ``n_trials`` counts the admitted rows only.
    """
    assert (frame["state"] != "rejected").sum() == n_trials
    assert frame["trial"].tolist() == list(range(first_trial, first_trial + len(frame)))
    assert set(frame["engine"]) == {"nni"}
    over = frame["macs"] > evaluator.budget.max_macs
    assert (frame.loc[over, "state"] == "rejected").all()
    assert (frame.loc[over, "epochs"] == 0).all() and (frame.loc[over, "train_seconds"] == 0).all()
    assert (frame.loc[~over, "state"] != "rejected").all()
    states = frame["state"].value_counts().to_dict()
    c = evaluator.counters
    assert c.proposed == len(frame)
    assert c.rejected == states.get("rejected", 0)
    assert c.trained == states.get("complete", 0) + states.get("pruned", 0)
    assert c.duplicates == states.get("duplicate", 0)
    done = frame[frame["state"].isin(["complete", "duplicate"])]
    assert done["val_top1"].between(0, 100).all()


@pytest.mark.parametrize("strategy", ["random", "evolution"])
def test_tiny_search_respects_budget_and_reruns_append(data, tmp_path, strategy):
    space = TinySpace()
    first = _evaluator(data, tmp_path, space)
    frame = run_nni_search(space, first, n_trials=6, strategy=strategy, seed=3)
    _check_run(frame, first, 6, first_trial=0)
    assert (frame["state"] == "complete").any()
    assert first.results.csv.exists()

    # A rerun is a new NNI experiment on the same table: numbers go on, and the same seed
    # proposes the same candidates, whose results are reused instead of retrained.
    again = _evaluator(data, tmp_path, space)
    rerun = run_nni_search(space, again, n_trials=6, strategy=strategy, seed=3)
    _check_run(rerun, again, 6, first_trial=len(frame))
    assert again.counters.trained == 0
    assert set(rerun["state"]) <= {"rejected", "duplicate"}
    table = again.results.frame()
    assert len(table) == len(frame) + len(rerun) and table["trial"].is_unique
    earlier = table.set_index("trial")["val_top1"]
    for _, row in rerun[rerun["state"] == "duplicate"].iterrows():
        source = int(row["reason"].removeprefix("same as trial "))
        assert source < len(frame) and row["val_top1"] == earlier[source]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_completes(data, tmp_path, strategy):
    space = TinySpace()
    evaluator = _evaluator(data, tmp_path, space)
    frame = run_nni_search(space, evaluator, n_trials=4, strategy=strategy, seed=0)
    _check_run(frame, evaluator, 4, first_trial=0)


def test_grid_walks_every_sample_once(data, tmp_path):
    """NNI's grid covers all 36 samples (inactive labels included); they hold 24 candidates."""
    space = TinySpace()
    evaluator = _evaluator(data, tmp_path, space)
    evaluator.budget = Budget(max_macs=1)  # reject everything: the walk is what is tested here
    frame = run_nni_search(space, evaluator, n_trials=100, strategy="grid", seed=0)
    samples = {tuple(sorted(json.loads(p).items())) for p in frame["params_json"]}
    assert len(frame) == 36 and len(samples) == 24
    assert set(frame["state"]) == {"rejected"} and evaluator.counters.trained == 0


def test_registered_space_end_to_end(data, tmp_path):
    """The real conditional space (78 labels) through NNI: decoded, budget-gated, recorded."""
    space = _space()
    evaluator = _evaluator(data, tmp_path, space)
    frame = run_nni_search(space, evaluator, n_trials=3, strategy="random", seed=0)
    _check_run(frame, evaluator, 3, first_trial=0)
    for params_json in frame["params_json"]:
        assert set(json.loads(params_json)) <= {c.label for c in space.choices()}


def _listeners(port: int) -> list[str]:
    """Local addresses of TCP sockets listening on ``port``, from ``ss``."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node() -> str:
    import nni_node

    return str(Path(nni_node.__path__[0]) / "node")


def test_bind_script_puts_node_listeners_on_loopback(tmp_path):
    """The preload script given to NNI's Node manager: listen(port) lands on 127.0.0.1 only."""
    port = _free_port()
    script = (
        "const s = require('http').createServer();"
        f"s.listen({port}, () => {{ console.log(JSON.stringify(s.address())); s.close(); }});"
    )
    bare = subprocess.run([_node(), "-e", script], capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(bare.stdout)["address"] in ("::", "0.0.0.0")  # what NNI does unpatched
    with _bind_node_to("127.0.0.1", tmp_path):
        bound = subprocess.run([_node(), "-e", script], capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(bound.stdout)["address"] == "127.0.0.1"


def test_local_execution_refuses_a_busy_port(data, tmp_path):
    space = TinySpace()
    evaluator = _evaluator(data, tmp_path, space)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DynasError, match=rf"`port` must be free for NNI's manager, but got port={port}"):
            run_nni_search(space, evaluator, n_trials=1, execution="local", port=port)
    assert not (tmp_path / "nni" / "job.pkl").exists()
    assert not evaluator.results.jsonl.exists()


@pytest.mark.slow
def test_local_execution_listens_on_loopback_only(data, tmp_path):
    """NNI's manager and web UI (about a minute): loopback only, files under the run directory."""
    space = _space()
    evaluator = _evaluator(data, tmp_path, space)
    port = _free_port()
    seen: list[list[str]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if addresses := _listeners(port):
                seen.append(addresses)
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        frame = run_nni_search(space, evaluator, n_trials=3, strategy="random", seed=0, execution="local", port=port)
    finally:
        stop.set()
        watcher.join()
    assert seen, "the NNI manager never listened"
    assert all(addresses == ["127.0.0.1"] for addresses in seen)
    assert _listeners(port) == []
    _check_run(frame, evaluator, 3, first_trial=0)
    assert any((tmp_path / "nni").glob("*/db"))


def _kernel_of_first_block(candidate, trial) -> float:
    return float(candidate.arch.stages[0].blocks[0].kernel_size)


@pytest.mark.parametrize("strategy", ["random", "evolution", "tpe"])
def test_a_tight_budget_gets_in_budget_start_up_samples(data, tmp_path, strategy):
    """At 16x16 under 1.5M MACs most uniform samples are over budget (evolution used to propose
    500 rejections and stop with 2 trials of 10): the start-up samples are drawn within it."""
    space = _space()
    budget = Budget(max_macs=1.5e6)
    config = TrainConfig(epochs=1, device="cpu", quiet=True)
    evaluator = CandidateEvaluator(budget, data, config, ResultsTable(tmp_path), keep_weights=0, objective=_kernel_of_first_block)
    frame = run_nni_search(space, evaluator, n_trials=6, strategy=strategy, seed=0)
    start_up = {"random": 6, "evolution": 3, "tpe": 6}[strategy]  # all; the first population (6 // 2); TPE's first 20
    assert (frame["state"] != "rejected").sum() == 6
    assert (frame["state"].head(start_up) != "rejected").all(), frame["state"].tolist()
    assert (frame.loc[frame["state"] != "rejected", "macs"] <= budget.max_macs).all()


def test_start_up_samples_are_left_to_the_strategy_when_the_budget_is_out_of_reach():
    from dynas.engines.nni_engine import _InBudgetDraws

    space = _space()
    smallest = closed_form_macs(space.smallest())
    draws = _InBudgetDraws(space, Budget(max_macs=smallest), seed=0)  # only the very smallest fits
    assert draws() is None and draws() is None  # sample_within_budget gave up once: not asked again
    sample = _InBudgetDraws(space, Budget(max_macs=1.5e6), seed=0)()
    assert set(sample) == {c.label for c in space.choices()}  # every label, as NNI samples
    assert closed_form_macs(space.decode(sample).arch) <= 1.5e6


def test_trials_that_die_before_writing_a_row_count_as_failed(data, tmp_path, caplog):
    from dynas.engines.nni_engine import _count_failed_trials

    evaluator = _evaluator(data, tmp_path, TinySpace())
    _count_failed_trials(evaluator, admitted=3, written=1, logs=tmp_path / "exp")
    assert (evaluator.counters.proposed, evaluator.counters.failed) == (2, 2)
    assert f"2 of 3 NNI trials failed before writing a row; see their logs under {tmp_path / 'exp' / 'trials'}" in caplog.text


def test_local_execution_with_progress_bars_trains_every_trial(tmp_path, capsys):
    """Without --quiet the trial bar used to be pickled into NNI's trial processes, where every
    trial died loading it and the run said "0 trained" with exit code 0."""
    from dynas.cli import main

    argv = [
        "search", "--engine", "nni", "--execution", "local", "--port", str(_free_port()), "--strategy", "random",
        "--dataset", "digits", "--input-size", "16", "--train-subset", "64", "--epochs", "1", "--max-steps-per-epoch", "1",
        "--batch-size", "16", "--num-threads", "1", "--max-macs", "1.5M", "--trials", "2", "--no-baselines",
        "--run-dir", str(tmp_path / "run"),
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "2 trained (0 pruned, 0 failed)" in out, out + err
    assert "trials: 100%" in err and "2/2" in err  # the bar, in this process, saw both trials
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["state"] for r in rows if r["state"] != "rejected"] == ["complete", "complete"]
