from __future__ import annotations

from pathlib import Path

import pytest

from dynas.config import apply_config
from dynas.cost import parse_count
from dynas.errors import DynasError
from dynas.cli import DEFAULT_CONFIG, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [DEFAULT_CONFIG, *sorted((ROOT / "experiments").glob("*.yaml"))]


@pytest.mark.parametrize("text,value", [("5M", 5_000_000), ("300k", 300_000), ("5e6", 5_000_000), (1.5e9, 1_500_000_000), ("2.5m", 2_500_000)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["5X", "", "-3M", "0", "abc", True])
def test_parse_count_rejects(text):
    with pytest.raises(ValueError, match="count"):
        parse_count(text)


def _search_parser():
    return build_parser()._subparsers._group_actions[0].choices["search"]


def test_config_sets_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-macs: 7M\ntrials: 4\nsampler: random\nquiet: true\n")
    parser = _search_parser()
    apply_config(parser, cfg)
    args = parser.parse_args(["--trials", "9"])
    assert (args.max_macs, args.trials, args.sampler, args.quiet) == (7_000_000, 9, "random", True)


@pytest.mark.parametrize("body,paths", [("supernet: a.pt\n", ["a.pt"]), ("supernet: [a.pt, b.pt]\n", ["a.pt", "b.pt"])])
def test_config_list_option_takes_one_path_or_a_list(tmp_path, body, paths):
    """--supernet A B; a run's config.yaml holds the list (an older dynas's, one path), and reads back."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body)
    parser = _search_parser()
    apply_config(parser, cfg)
    assert parser.parse_args([]).supernet == paths
    assert parser.parse_args(["--supernet", "c.pt"]).supernet == ["c.pt"]  # a flag overrides the file


@pytest.mark.parametrize(
    "body,match",
    [
        ("max_mac: 5M\n", r"unknown key 'max_mac'\. Did you mean 'max_macs'\?"),
        ("trials: many\n", r"key 'trials': must be an integer, but got 'many'"),
        ("quiet: 3\n", r"key 'quiet': expected true or false, but got 3"),
        ("engine: keras\n", r"key 'engine': must be one of optuna, nni, but got 'keras'"),
        ("max_macs: -5M\n", r"key 'max_macs'.*count must be > 0"),
        ("- a\n- b\n", r"must be a mapping of option: value, but got list"),
        ("a: [\n", r"is not valid YAML"),
        ("supernet: []\n", r"key 'supernet': must be a non-empty list"),
        ("supernet: [a.pt, 3]\n", r"key 'supernet': must be a string, but got 3"),
        ("supernet: true\n", r"key 'supernet': expected a value, not a boolean"),
    ],
)
def test_config_errors_name_file_key_and_value(tmp_path, body, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(body)
    with pytest.raises(DynasError, match=match):
        apply_config(_search_parser(), cfg)


def test_cli_config_errors_exit_2_without_traceback(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("max_mac: 5M\n")
    assert main(["search", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'max_mac'" in err and "Traceback" not in err
    assert main(["search", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_bad_flag_value_exits_2(capsys):
    assert main(["search", "--max-macs", "lots"]) == 2
    err = capsys.readouterr().err
    assert "expected a count such as 5M" in err and "Traceback" not in err


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_experiment_config_is_valid_and_its_budget_feasible(path):
    from dynas.budget import Budget, ensure_feasible
    from dynas.spaces import get_space

    parser = _search_parser()
    apply_config(parser, path)
    args = parser.parse_args([])
    space = get_space(args.space, input_size=args.input_size, num_classes=10)
    ensure_feasible(space, Budget(max_macs=args.max_macs, max_params=args.max_params))


def test_default_job_runs_end_to_end_in_small(tmp_path, capsys):
    """``python run_search.py`` with its own config, cut to one short trial."""
    argv = ["search", "--config", str(DEFAULT_CONFIG), "--run-dir", str(tmp_path / "run"),
            "--trials", "1", "--epochs", "1", "--max-steps-per-epoch", "2", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "best architecture (trial" in out and "val top-1" in out
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "results.csv").is_file()


def test_the_run_record_never_holds_a_password(tmp_path):
    import argparse

    import yaml

    from dynas.config import write_resolved

    args = argparse.Namespace(storage="postgresql://dynas:s3cr@t@db-host:5432/dynas", trials=3)
    write_resolved(args, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "s3cr" not in text and yaml.safe_load(text)["storage"] == "postgresql://dynas@db-host:5432/dynas"
